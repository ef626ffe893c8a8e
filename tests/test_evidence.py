"""The noisy-labels evidence profile: its plan, its choices, its report."""

import json

import numpy as np
import pytest

from keras_aesam import bench
from keras_aesam.bench import noisy_labels, noisy_labels_plan as plan, noisy_labels_report
from keras_aesam.bench.progress import is_degenerate


# --------------------------------------------------------------------------
# The plan
# --------------------------------------------------------------------------
def test_rho_is_searched_on_the_rho_seeds_only():
    specs = plan.rho_specs(0.4)
    assert {s["hyperparameters"]["rho"] for s in specs} == set(plan.MLP.rho_grid)
    assert {s["seed"] for s in specs} == set(plan.RHO_SEEDS)
    assert all(s["method"] == "sam" for s in specs)


def test_main_stage_matches_rivals_to_the_seeds_ae_budgets():
    specs = plan.main_specs(0.4, 3, 0.2, zeta=0.41, zeta_look=0.17)
    by_label = {s["label"]: s for s in specs}
    for method in ("ss_sam", "rst", "late_sam", "quantile_sam"):
        assert by_label[f"{method}@ae"]["hyperparameters"] == {"rho": 0.2, "target_sam_fraction": 0.41}
    for method in ("late_sam", "quantile_sam"):
        spec = by_label[f"{method}+looksam@ae"]
        assert spec["direction_from"] == "looksam"
        assert spec["hyperparameters"]["target_sam_fraction"] == 0.17
    assert all(s["hyperparameters"].get("rho", 0.2) == 0.2 for s in specs)  # one rho for every method
    assert {s["seed"] for s in specs} == {3}


def test_sam_at_the_chosen_rho_is_shared_between_the_search_and_the_main_stage():
    search = {plan.run_id(s): s for s in plan.rho_specs(0.4)}
    main = {plan.run_id(s): s for s in plan.main_specs(0.4, 0, 0.1)}
    shared = set(search) & set(main)
    assert shared == {"noise40__sam_rho0.1__s0"}
    assert all(search[k] == main[k] for k in shared)


def test_budget_stage_covers_every_budgeted_policy_at_every_budget():
    specs = plan.budget_specs(0.4, 0, 0.2)
    pairs = {(s["method"], s["hyperparameters"]["target_sam_fraction"]) for s in specs}
    assert pairs == {(m, f) for m in plan.BUDGETED for f in plan.BUDGETS}


def test_planned_runs_counts_each_run_once():
    n = plan.planned_runs((0.4,), (0, 1, 2), (0,))
    per_seed = len(plan.main_specs(0.4, 0, 0.1, zeta=0.5, zeta_look=0.2))
    per_seed += len(plan.rival_specs(0.4, 0, 0.1, 1.0))
    search = (len(plan.MLP.rho_grid) + len(plan.MLP.msam_rho_grid)) * len(plan.RHO_SEEDS)
    # SAM and MSAM at their chosen ρ on seeds 0 and 1 are search runs too
    assert n == search + 3 * per_seed - 2 * 2 + len(plan.BUDGETS) * len(plan.BUDGETED)


def test_policy_and_direction_come_from_their_methods():
    import keras

    inner = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2)])
    specs = {s["label"]: s for s in plan.main_specs(0.4, 0, 0.2, zeta=0.3, zeta_look=0.2)}
    model = noisy_labels.build_model(specs["quantile_sam+looksam@ae"], inner, total_steps=100)
    assert type(model.policy).__name__ == "Quantile"
    assert type(model.direction).__name__ == "LookSAM"
    assert model.policy.target_sam_fraction == 0.2 and model.direction.rho == 0.2
    assert model.direction.max_age == plan.MAX_AGE  # the rivals get the bounded direction too


def test_every_looksam_direction_row_but_looksams_own_bounds_the_age_of_g_v():
    import keras

    specs = {s["label"]: s for s in plan.main_specs(0.4, 0, 0.2, zeta=0.3, zeta_look=0.12)}
    ages = {}
    for label in ("ae_looksam", "late_sam+looksam@ae", "quantile_sam+looksam@ae", "looksam", "looksam@ae",
                  "ae_looksam_unbounded"):
        inner = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2)])
        ages[label] = noisy_labels.build_model(specs[label], inner, total_steps=100).direction.max_age
    assert ages == {"ae_looksam": 10, "late_sam+looksam@ae": 10, "quantile_sam+looksam@ae": 10,
                    "looksam": None, "looksam@ae": None, "ae_looksam_unbounded": None}


def test_rivals_stage_msam_at_its_own_rho_looksam_periods_and_esam():
    import keras

    specs = {s["label"]: s for s in plan.rival_specs(0.6, 2, 0.2, msam_rho=0.6)}
    assert set(specs) == {"msam_rho0.6", "looksam_k2", "looksam_k10", "esam"}
    search = {plan.run_id(s) for s in plan.msam_rho_specs(0.6)}
    assert plan.run_id({**specs["msam_rho0.6"], "seed": 0}) in search  # shared with the search
    built = {}
    for label, spec in specs.items():
        inner = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2)])
        model = noisy_labels.build_model(spec, inner, total_steps=100)
        built[label] = (type(model.policy).__name__, type(model.direction).__name__, model.direction.rho)
    assert built == {"msam_rho0.6": ("Never", "MSAM", 0.6), "looksam_k2": ("Periodic", "LookSAM", 0.2),
                     "looksam_k10": ("Periodic", "LookSAM", 0.2), "esam": ("Always", "ESAM", 0.2)}


def test_looksam_at_ae_looksams_budget_takes_the_nearest_period():
    specs = {s["label"]: s for s in plan.main_specs(0.4, 0, 0.2, zeta=0.3, zeta_look=0.13)}
    assert specs["looksam@ae"]["hyperparameters"] == {"rho": 0.2, "k": 8}
    assert specs["looksam@ae"]["budget"] == "ae_looksam"
    assert [plan.looksam_k(z) for z in (0.2, 0.11, 0.15, 0.9)] == [5, 9, 7, 1]


# --------------------------------------------------------------------------
# Choices and flags
# --------------------------------------------------------------------------
def _result(rho, val, seed=0):
    return {"spec": {"hyperparameters": {"rho": rho}, "seed": seed}, "val_accuracy": val}


def test_rho_is_chosen_on_validation_accuracy_never_test():
    results = [_result(0.05, 0.70), _result(0.05, 0.72, 1), _result(0.1, 0.80), _result(0.1, 0.60, 1),
               _result(0.2, 0.74), _result(0.2, 0.73, 1)]
    for r in results:
        r["test_accuracy"] = 1.0 if r["spec"]["hyperparameters"]["rho"] == 0.05 else 0.0  # must not matter
    assert noisy_labels.choose_rho(results) == 0.2


@pytest.mark.parametrize(
    "accuracy, loss, degenerate",
    [(0.10, 2.30, True), (0.115, 2.2, True), (0.50, 1.2, False), (0.90, float("nan"), True)],
)
def test_chance_level_runs_are_flagged(accuracy, loss, degenerate):
    assert is_degenerate({"test_accuracy": accuracy, "test_loss": loss, "num_classes": 10}) is degenerate


def test_bench_hands_the_noisy_labels_profile_its_own_arguments():
    assert bench._noisy_labels_argv(["--profile", "noisy-labels", "--output", "x"]) == ["--output", "x"]
    assert bench._noisy_labels_argv(["--output", "x", "--profile=noisy-labels"]) == ["--output", "x"]
    assert bench._noisy_labels_argv(["--profile", "quick"]) is None


def test_reverse_seeds_runs_the_last_seed_first(monkeypatch, tmp_path):
    seen = {}
    monkeypatch.setattr(noisy_labels, "run_profile", lambda out, **kw: seen.update(kw))
    noisy_labels.main(["--output", str(tmp_path), "--seeds", "3", "--label-noise", "0.6", "--reverse-seeds"])
    assert seen["seeds"] == (2, 1, 0) and seen["settings"] == (0.6,)
    noisy_labels.main(["--output", str(tmp_path), "--seeds", "3", "--budget-seeds"])
    assert seen["seeds"] == (0, 1, 2) and seen["budget_seeds"] == ()


def test_the_profile_takes_label_noise_settings_under_the_shared_name():
    parser = noisy_labels.build_parser()
    assert parser.parse_args(["--output", "x", "--label-noise", "0.4", "0.0"]).noise == [0.4, 0.0]
    assert parser.parse_args(["--output", "x"]).noise is None  # the regime's settings
    assert "--noise" not in parser.format_help()


# --------------------------------------------------------------------------
# The report, from stored runs
# --------------------------------------------------------------------------
def _fake_runs(out, rng):
    """Run files for two seeds: SAM 5 points above ERM, AE-SAM between."""
    base = {"erm": 0.70, "sam_rho0.1": 0.75, "ae_sam": 0.74, "ss_sam@ae": 0.72}
    frac = {"erm": 0.0, "sam_rho0.1": 1.0, "ae_sam": 0.45, "ss_sam@ae": 0.46}
    (out / "runs").mkdir(parents=True)
    for seed in (0, 1, 2):
        for label, acc in base.items():
            method = label.split("@")[0].replace("_rho0.1", "")
            hp = {"rho": 0.1, **({"target_sam_fraction": 0.45} if "@" in label else {})}
            spec = {**plan._spec(0.4, seed, label, method, hp), "label": label}
            run = {"run_id": plan.run_id(spec), "spec": spec,
                   "test_accuracy": acc + rng.normal(0, 0.002), "test_loss": 1.0, "val_accuracy": acc,
                   "train_accuracy": 0.9, "steps": 100, "sam_steps": int(100 * frac[label]),
                   "sam_fraction": frac[label], "grad_evals": 100 + int(100 * frac[label]),
                   "curve": [[5, acc - 0.01], [10, acc]], "sharpness": 0.1, "num_classes": 10,
                   "run_seconds": 10.0, "finished_at": "2026-01-01T00:00:00"}
            (out / "runs" / f"{run['run_id']}.json").write_text(json.dumps(run))
    (out / "rho_noise40.json").write_text(json.dumps({"rho": 0.1}))


def test_report_reads_the_runs_and_tests_the_claims(tmp_path):
    _fake_runs(tmp_path, np.random.default_rng(0))
    summary = noisy_labels_report.write_report(tmp_path)
    cells = {r["label"]: r for r in summary}
    assert cells["sam_rho0.1"]["acc_mean"] == pytest.approx(0.75, abs=0.003)
    assert cells["ae_sam"]["evals_ratio"] == pytest.approx(1.45)
    text = (tmp_path / "report.md").read_text()
    assert "ρ = 0.1" in text and "AE-SAM better than SS-SAM at equal budget" in text
    tests = list(csv_rows(tmp_path / "tests.csv"))
    sam_vs_erm = next(t for t in tests if t["a"] == "sam_rho0.1" and t["b"] == "erm")
    assert float(sam_vs_erm["mean_diff"]) == pytest.approx(0.05, abs=0.005)
    assert float(sam_vs_erm["p"]) < 0.01
    for name in ("results.csv", "summary.csv", "pareto_noise40.png", "curves_noise40.png"):
        assert (tmp_path / name).is_file()


def _add_run(out, label, method, hp, seed, acc, frac=0.0):
    spec = plan._spec(0.4, seed, label, method, hp)
    run = {"run_id": plan.run_id(spec), "spec": spec, "test_accuracy": acc, "test_loss": 1.0,
           "val_accuracy": acc, "train_accuracy": 0.9, "steps": 100, "sam_steps": int(100 * frac),
           "sam_fraction": frac, "grad_evals": 100 + int(100 * frac), "curve": [[5, acc]], "sharpness": 0.1,
           "num_classes": 10, "run_seconds": 10.0, "finished_at": "2026-01-01T00:00:00"}
    (out / "runs" / f"{run['run_id']}.json").write_text(json.dumps(run))


def test_report_names_incomplete_rows_and_keeps_msams_rho_search_out_of_the_comparisons(tmp_path):
    _fake_runs(tmp_path, np.random.default_rng(0))
    for seed, acc in ((0, 0.76), (1, 0.77), (2, 0.78)):
        _add_run(tmp_path, "msam_rho1", "msam", {"rho": 1.0}, seed, acc)
    for seed in (0, 1):
        _add_run(tmp_path, "msam_rho0.3", "msam", {"rho": 0.3}, seed, 0.70)
    (tmp_path / "msam_rho_noise40.json").write_text(json.dumps({"rho": 1.0}))
    noisy_labels_report.write_report(tmp_path)
    text = (tmp_path / "report.md").read_text()
    incomplete = next(line for line in text.splitlines() if line.startswith("> **Incomplete rows**"))
    assert "ERM 3/5 seeds" in incomplete and "AE-LookSAM 0/5 seeds" in incomplete
    assert "MSAM (ρ=1) 3/5 seeds" in incomplete and "MSAM (ρ=0.3)" not in incomplete  # its 2 search seeds ran
    assert "MSAM's ρ chosen on validation: 1." in text
    assert "| MSAM (ρ=0.3) (ρ search) | 2 |" in text
    pairs = {(t["a"], t["b"]) for t in csv_rows(tmp_path / "tests.csv")}
    assert ("msam_rho1", "sam_rho0.1") in pairs and ("msam_rho0.3", "sam_rho0.1") not in pairs


def test_the_report_names_the_commands_that_filled_the_folder(tmp_path):
    _fake_runs(tmp_path, np.random.default_rng(0))
    noisy_labels_report.write_report(tmp_path)
    assert f"`keras-aesam bench --profile noisy-labels --output {tmp_path}` (not recorded" in (
        (tmp_path / "report.md").read_text())
    noisy_labels.record_command(tmp_path, ["--output", str(tmp_path), "--label-noise", "0.4", "--budget-seeds"])
    noisy_labels.record_command(tmp_path, ["--output", str(tmp_path), "--seeds", "2"])
    noisy_labels_report.write_report(tmp_path)
    text = (tmp_path / "report.md").read_text()
    first = text.index(f"--profile noisy-labels --output {tmp_path} --label-noise 0.4 --budget-seeds  # 20")
    assert first < text.index(f"--profile noisy-labels --output {tmp_path} --seeds 2  # 20")
    assert "not recorded" not in text


def test_pareto_front_keeps_only_runs_nobody_beats_on_cost_and_accuracy():
    rows = [{"evals_ratio": 1.0, "acc_mean": 0.70}, {"evals_ratio": 1.2, "acc_mean": 0.69},
            {"evals_ratio": 1.5, "acc_mean": 0.74}, {"evals_ratio": 2.0, "acc_mean": 0.73}]
    assert [r["acc_mean"] for r in noisy_labels_report.pareto_front(rows)] == [0.70, 0.74]


def csv_rows(path):
    import csv

    with open(path) as f:
        yield from csv.DictReader(f)


# --------------------------------------------------------------------------
# Several processes on one folder, damaged result files
# --------------------------------------------------------------------------
def _fake_run_one(calls):
    def run_one(spec, stream):
        calls.append(plan.run_id(spec))
        return {"val_accuracy": 0.5, "test_accuracy": 0.5, "sam_fraction": 0.0}
    return run_one


def test_a_run_another_process_is_doing_is_waited_for_not_run_twice(monkeypatch, tmp_path):
    import io
    import threading

    from keras_aesam.cli.run_lock import RunLock

    calls = []
    monkeypatch.setattr(noisy_labels, "run_one", _fake_run_one(calls))
    spec = plan.main_specs(0.4, 0, 0.1)[0]
    run = plan.run_id(spec)
    other = RunLock.acquire(tmp_path / "locks" / run, "the other process")  # a second open file: flock conflicts
    stream, done = io.StringIO(), {}
    progress = noisy_labels.Progress(1, stream, name=plan.run_id)
    worker = threading.Thread(target=lambda: done.update(
        r=noisy_labels._run_once(tmp_path, spec, stream, 0.0, poll_seconds=0.05)))
    worker.start()
    worker.join(0.5)
    assert worker.is_alive() and "waiting" in stream.getvalue() and "the other process" in stream.getvalue()
    stored = {"run_id": run, "spec": spec, "test_accuracy": 0.75, "sam_fraction": 0.0}
    noisy_labels.write_json(tmp_path / "runs" / f"{run}.json", stored)
    other.release()
    worker.join(10)
    assert done["r"] == (stored, False) and calls == []  # the holder's result, not a second run
    assert noisy_labels.run_specs(tmp_path, [spec], progress, stream) == [stored]


def test_a_run_another_process_holds_is_put_off_and_the_next_ones_run_first(monkeypatch, tmp_path):
    import io
    import threading

    from keras_aesam.cli.run_lock import RunLock

    calls = []
    monkeypatch.setattr(noisy_labels, "run_one", _fake_run_one(calls))
    specs = plan.main_specs(0.4, 0, 0.1)[:3]
    held = plan.run_id(specs[0])
    other = RunLock.acquire(tmp_path / "locks" / held, "the other process")
    stream, done = io.StringIO(), {}
    progress = noisy_labels.Progress(3, stream, name=plan.run_id)
    worker = threading.Thread(target=lambda: done.update(
        r=noisy_labels.run_specs(tmp_path, specs, progress, stream, poll_seconds=0.05)))
    worker.start()
    worker.join(5)  # the two free runs are done while the first is held
    assert calls == [plan.run_id(s) for s in specs[1:]]
    assert f"put off {held}" in stream.getvalue()
    stored = {"run_id": held, "spec": specs[0], "test_accuracy": 0.75, "sam_fraction": 0.0}
    noisy_labels.write_json(tmp_path / "runs" / f"{held}.json", stored)
    other.release()
    worker.join(30)
    assert not worker.is_alive() and len(calls) == 2  # the held run was not run a second time
    assert done["r"][0] == stored and [r["test_accuracy"] for r in done["r"][1:]] == [0.5, 0.5]  # in spec order


def test_methods_runs_only_those_methods_and_reads_the_rest(monkeypatch, tmp_path):
    import io

    calls = []
    monkeypatch.setattr(noisy_labels, "run_one", _fake_run_one(calls))
    monkeypatch.setattr(noisy_labels.noisy_labels_report, "write_report", lambda out: None)
    for spec in noisy_labels.rho_specs(0.4):  # SAM's rho search, stored
        noisy_labels.write_json(tmp_path / "runs" / f"{noisy_labels.run_id(spec)}.json",
                                {"spec": spec, "val_accuracy": spec["hyperparameters"]["rho"]})
    noisy_labels.run_profile(tmp_path, settings=(0.4,), seeds=(0, 1), budget_seeds=(), stream=io.StringIO(),
                             methods={"msam"})
    assert calls and all("msam" in c for c in calls)  # MSAM's search and its rows, nothing else
    assert {c.split("__")[1] for c in calls} == {f"msam_rho{r:g}" for r in noisy_labels.MLP.msam_rho_grid}
    assert json.loads((tmp_path / "rho_noise40.json").read_text())["rho"] == 0.2


def test_methods_without_sams_search_skips_the_setting(monkeypatch, tmp_path):
    import io

    calls, stream = [], io.StringIO()
    monkeypatch.setattr(noisy_labels, "run_one", _fake_run_one(calls))
    monkeypatch.setattr(noisy_labels.noisy_labels_report, "write_report", lambda out: None)
    noisy_labels.run_profile(tmp_path, settings=(0.4,), seeds=(0,), budget_seeds=(), stream=stream,
                             methods={"msam"})
    assert calls == [] and "skipped" in stream.getvalue()


def test_a_damaged_result_file_is_reported_and_its_run_redone(monkeypatch, tmp_path):
    import io

    calls = []
    monkeypatch.setattr(noisy_labels, "run_one", _fake_run_one(calls))
    spec = plan.main_specs(0.4, 0, 0.1)[0]
    path = tmp_path / "runs" / f"{plan.run_id(spec)}.json"
    path.parent.mkdir(parents=True)
    path.write_text('{"run_id": "cut sho')
    stream = io.StringIO()
    progress = noisy_labels.Progress(1, stream, name=plan.run_id)
    [result] = noisy_labels.run_specs(tmp_path, [spec], progress, stream)
    assert calls == [plan.run_id(spec)] and result["test_accuracy"] == 0.5
    assert f"note: damaged result file {path}" in stream.getvalue()
    assert json.loads(path.read_text())["spec"] == spec  # written whole again
    assert not (tmp_path / "locks").exists()


# --------------------------------------------------------------------------
# One real run, at the smallest size
# --------------------------------------------------------------------------
def test_one_run_trains_and_records_what_the_report_needs(monkeypatch):
    monkeypatch.setitem(plan.MLP.recipe, "epochs", 2)
    monkeypatch.setitem(plan.MLP.recipe, "train_size", 512)
    monkeypatch.setattr(noisy_labels, "CURVE_EVERY", 1)
    spec = plan.main_specs(0.4, 0, 0.1, zeta=0.3, zeta_look=0.3)[5 + 2]  # late SAM at 30 %
    result = noisy_labels.run_one(spec, stream=open("/dev/null", "w"))
    assert result["steps"] == 8 and result["sam_steps"] == round(0.3 * 8)
    assert [e for e, _ in result["curve"]] == [1, 2]
    assert 0.0 <= result["test_accuracy"] <= 1.0 and np.isfinite(result["sharpness"])

