"""The profile's seconds axis: a row's SAM and non-SAM steps timed apart, mixed at its SAM share."""

import math

import pytest

from keras_aesam.bench import noisy_labels, noisy_labels_plan as plan, step_timing


def test_a_row_is_its_non_sam_and_sam_steps_mixed_at_its_sam_share():
    timing = {"plain": 0.004, "sam": 0.007}
    assert step_timing.seconds_per_step(timing, 0.0) == 0.004
    assert step_timing.seconds_per_step(timing, 1.0) == 0.007
    assert math.isclose(step_timing.seconds_per_step(timing, 0.25), 0.75 * 0.004 + 0.25 * 0.007)


def test_a_share_the_timing_never_saw_has_no_seconds():
    assert step_timing.seconds_per_step({"plain": 0.004, "sam": None}, 0.1) is None
    assert step_timing.seconds_per_step({"plain": None, "sam": 0.007}, 0.9) is None
    assert step_timing.seconds_per_step({"plain": 0.004, "sam": None}, 0.0) == 0.004


def test_split_means_averages_each_kind_of_step():
    plain, sam = step_timing.split_means([1.0, 3.0, 2.0, 6.0], [False, True, False, True])
    assert (plain, sam) == (1.5, 4.5)
    assert step_timing.split_means([1.0, 3.0], [False, False]) == (2.0, None)


def test_the_sam_flag_of_each_step_is_read_from_the_running_mean():
    timer = step_timing.StepTimer()
    timer.on_epoch_begin(0)
    flags = [True, False, False, True, True]
    count = 0
    for i, flag in enumerate(flags):
        count += flag
        timer.on_train_batch_begin(i)
        timer.on_train_batch_end(i, {"sam_fraction": count / (i + 1)})
    assert timer.sam == flags
    with pytest.raises(RuntimeError, match="running mean"):
        timer.on_train_batch_end(5, {"sam_fraction": 0.0})  # the count fell: not a running mean


def test_rho_rows_share_one_timing_and_erm_comes_first(tmp_path):
    assert plan.timing_key("sam_rho0.2") == "sam" and plan.timing_key("msam_rho1.5") == "msam"
    assert plan.timing_key("ss_sam@ae") == "ss_sam@ae"
    for spec in (*plan.rho_specs(0.4), *plan.main_specs(0.4, 0, 0.2)):
        noisy_labels.write_json(tmp_path / "runs" / f"{plan.run_id(spec)}.json", {"spec": spec})
    specs = noisy_labels.timing_specs(tmp_path)
    keys = [plan.timing_key(s["label"]) for s in specs]
    assert keys[0] == "erm" and sorted(keys[1:]) == ["ae_looksam", "ae_sam", "looksam", "sam"]


def test_rows_not_run_yet_are_timed_from_the_plan(tmp_path):
    """The CNN regime's seed 0 with its main runs stored: the matched rows and the rivals are timed too."""
    cnn = noisy_labels.REGIMES["cnn"]
    noisy_labels.write_json(tmp_path / "profile.json", noisy_labels.profile_record(cnn))
    noisy_labels.write_json(tmp_path / "rho_noise40.json", {"rho": 0.05})
    noisy_labels.write_json(tmp_path / "msam_rho_noise40.json", {"rho": 1.0})
    for spec in noisy_labels.main_specs(0.4, 0, 0.05, regime=cnn):
        noisy_labels.write_json(tmp_path / "runs" / f"{noisy_labels.run_id(spec)}.json",
                                {"spec": spec, "sam_fraction": 0.3})
    specs = {noisy_labels.timing_key(s["label"]): s for s in noisy_labels.timing_specs(tmp_path)}
    assert set(specs) == {"erm", "sam", "ae_sam", "looksam", "ae_looksam", "ss_sam@ae", "quantile_sam@ae",
                          "msam", "looksam_k2", "looksam_k10", "esam"}
    assert specs["ss_sam@ae"]["hyperparameters"]["target_sam_fraction"] == 0.3  # AE-SAM's realised budget
    assert specs["msam"]["hyperparameters"]["rho"] == 1.0 and specs["erm"]["network"] == "bn_cnn"


def test_rows_are_timed_against_erm_in_one_process():
    specs = plan.main_specs(0.4, 0, 0.1)
    specs = [{**s, "train_size": 1024} for s in specs if s["label"] in ("erm", "sam_rho0.1")]
    rows = step_timing.time_rows(specs, noisy_labels.compiled_model, steps=4, rounds=2, warmup=1,
                                 stream=open("/dev/null", "w"))
    erm, sam = rows["erm"], rows["sam_rho0.1"]
    assert erm["plain_ratio"] == 1.0 and erm["sam"] is None and erm["plain_rounds"] == 2
    assert sam["plain"] is None and sam["sam"] > 0 and sam["sam_rounds"] == 2  # SAM: every step a SAM step


def test_the_first_row_must_be_erm():
    with pytest.raises(ValueError, match="ERM"):
        step_timing.time_rows(plan.main_specs(0.4, 0, 0.1)[1:2], noisy_labels.compiled_model)


def test_a_row_that_took_no_sam_step_while_timed_borrows_its_directions_sam_step():
    from keras_aesam.bench import noisy_labels_report as report

    timing = {"rows": {"ae_looksam": {"plain": 0.010, "sam": None}, "looksam": {"plain": 0.011, "sam": 0.020},
                       "sam": {"plain": None, "sam": 0.019}, "ae_sam": {"plain": 0.009, "sam": None}}}
    assert math.isclose(report._seconds(timing, "ae_looksam", 0.1), 0.9 * 0.010 + 0.1 * 0.020)  # LookSAM's
    assert math.isclose(report._seconds(timing, "ae_sam", 0.5), 0.5 * 0.009 + 0.5 * 0.019)  # SAM's
    summary = [{"label": "ae_looksam", "sam_fraction": 0.1, "seconds_per_step": 0.011},
               {"label": "looksam", "sam_fraction": 0.2, "seconds_per_step": 0.0128}]
    assert report.borrowing_rows(timing, summary) == ["ae_looksam"]
