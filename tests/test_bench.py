"""``keras-aesam bench``: bad input, the statistics, resume, a tiny end-to-end run, the peer."""

import csv
import json
import math

import numpy as np
import pytest

from keras_aesam import bench


def _error(capsys, argv):
    with pytest.raises(SystemExit) as info:
        bench.main(argv)
    assert info.value.code == 2
    return capsys.readouterr().err


# ------------------------------------------------------------------ bad input


def test_unknown_method_lists_the_valid_ones(tmp_path, capsys):
    err = _error(capsys, ["--methods", "sam,foo_sam", "--output", str(tmp_path / "out")])
    assert "unknown method(s) 'foo_sam'" in err
    for name in bench.ALL_METHODS:
        assert name in err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("methods", ["", ",", " , "])
def test_empty_method_list(tmp_path, capsys, methods):
    err = _error(capsys, ["--methods", methods, "--output", str(tmp_path / "out")])
    assert "--methods is empty" in err
    assert not (tmp_path / "out").exists()


def test_profile_that_cannot_fit_the_seeds(tmp_path, capsys):
    err = _error(capsys, ["--profile", "quick", "--seeds", "10", "--output", str(tmp_path / "out")])
    assert "must finish within 10 minutes" in err
    assert "at most" in err and "seed(s) fit" in err
    assert not (tmp_path / "out").exists()
    # the standard profile as shipped fits its budget; the quick one too
    for profile in ("quick", "standard"):
        args = bench.build_parser().parse_args(["--profile", profile, "--output", str(tmp_path / profile)])
        plan = bench.resolve(args)
        assert bench.check_budget(plan) <= 60 * bench.PROFILES[profile]["budget_minutes"]


def test_budget_check_can_be_turned_off(tmp_path):
    args = bench.build_parser().parse_args(["--seeds", "10", "--budget-minutes", "0", "--output", str(tmp_path)])
    plan = bench.resolve(args)
    assert bench.check_budget(plan) > 600


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--label-noise", "0,1.2"], "--label-noise rates must be in [0, 1)"),
        (["--label-noise", "a"], "--label-noise must be comma-separated numbers"),
        (["--network", "resnet999"], "unknown network 'resnet999'"),
        (["--dataset", "mnist9"], "unknown dataset 'mnist9'"),
        (["--seeds", "0"], "--seeds must be >= 1"),
        (["--epochs", "0"], "--epochs must be >= 1"),
        (["--train-size", "x"], "--train-size must be an integer"),
        (["--lr", "-1"], "--lr must be > 0"),
        (["--methods", "erm,sam", "--k", "3"], "none of the methods erm, sam takes --k (looksam take it)"),
        (["--methods", "erm", "--rho", "0.1"], "none of the methods erm takes --rho (sam, esam, "),
        (["--methods", "looksam", "--k", "0"], "invalid hyperparameter for looksam"),
    ],
)
def test_bad_arguments(tmp_path, capsys, argv, message):
    err = _error(capsys, argv + ["--output", str(tmp_path / "out")])
    assert message in err
    assert not (tmp_path / "out").exists()


def test_plan_applies_the_papers_noise_settings(tmp_path):
    args = bench.build_parser().parse_args(
        ["--profile", "standard", "--no-peer", "--output", str(tmp_path)])
    plan = bench.resolve(args)
    runs = {r["run_id"]: r for r in plan["runs"]}
    assert len(runs) == 7 * 3 * 3
    assert runs["clean_s0_looksam"]["hyperparameters"] == {"rho": 0.05}
    assert runs["noise40_s1_looksam"]["hyperparameters"]["k"] == 2
    assert runs["noise80_s2_ae_looksam"]["hyperparameters"]["lambda1"] == -1.0
    assert runs["noise80_s2_ae_sam"]["hyperparameters"]["lambda2"] == 1.0
    assert runs["clean_s0_ss_sam"]["hyperparameters"]["seed"] == 0
    # interleaved: every (setting, seed) group runs all methods back to back
    assert [r["method"] for r in plan["runs"][:7]] == list(bench.ALL_METHODS)
    assert plan["runs"][7]["seed"] == 1
    # an explicit flag wins over the noisy defaults
    args = bench.build_parser().parse_args(
        ["--profile", "standard", "--no-peer", "--k", "3", "--output", str(tmp_path)])
    assert {r["hyperparameters"]["k"] for r in bench.resolve(args)["runs"] if r["method"] == "looksam"} == {3}


# ------------------------------------------------------------ the statistics


def test_paired_difference_matches_a_hand_computation():
    from scipy import stats

    a = [0.90, 0.91, 0.93, 0.92]
    b = [0.89, 0.91, 0.91, 0.90]
    result = bench.paired_difference(a, b)
    d = np.subtract(a, b)
    half = stats.t.ppf(0.975, 3) * d.std(ddof=1) / 2.0
    assert result["n"] == 4
    assert result["mean_diff"] == pytest.approx(d.mean())
    assert result["ci_low"] == pytest.approx(d.mean() - half)
    assert result["ci_high"] == pytest.approx(d.mean() + half)
    assert result["t"] == pytest.approx(d.mean() / (d.std(ddof=1) / 2.0))
    assert result["p"] == pytest.approx(stats.ttest_rel(a, b).pvalue)
    assert bench.verdict({"a": "ae_sam", **result}) in (
        "AE-SAM better (95 % CI excludes 0)", "no significant difference (95 % CI includes 0)")


def test_paired_difference_edge_cases():
    one = bench.paired_difference([0.9], [0.8])
    assert one["n"] == 1 and one["ci_low"] is None and bench.verdict({"a": "sam", **one}) == "too few seeds"
    same = bench.paired_difference([0.9, 0.8], [0.8, 0.7])  # constant difference: no t, zero-width CI
    assert same["mean_diff"] == pytest.approx(0.1) and same["p"] is None
    assert same["ci_low"] == pytest.approx(0.1) and same["ci_high"] == pytest.approx(0.1)
    with pytest.raises(ValueError, match="same length"):
        bench.paired_difference([0.9, 0.8], [0.8])


def _row(setting, seed, method, acc, step_ms, sam=0.0, steps=100, noise=None):
    noise = {"clean": 0.0, "noise40": 0.4}[setting] if noise is None else noise
    return {
        "run_id": f"{setting}_s{seed}_{method}", "kind": "peer" if method == bench.PEER_METHOD else "method",
        "setting": setting, "noise": noise, "seed": seed, "method": method, "test_accuracy": acc,
        "sam_fraction": sam, "steps": steps, "sam_steps": int(sam * steps), "grad_evals": steps + int(sam * steps),
        "pass_equivalents": steps + sam * steps, "step_ms": step_ms, "epoch_seconds_after_first": step_ms / 100,
        "first_epoch_seconds": 5.0, "timed_steps": steps,
    }


def _synthetic_rows():
    rows = []
    for seed, (erm, sam, ae, ss) in enumerate([(0.80, 0.82, 0.83, 0.81), (0.81, 0.83, 0.82, 0.795),
                                               (0.79, 0.83, 0.84, 0.81)]):
        for setting in ("clean", "noise40"):
            shift = 0.0 if setting == "clean" else -0.2
            rows += [
                _row(setting, seed, "erm", erm + shift, 100.0),
                _row(setting, seed, "sam", sam + shift, 210.0, sam=1.0),
                _row(setting, seed, "ae_sam", ae + shift, 150.0 + seed, sam=0.5),
                _row(setting, seed, "ss_sam", ss + shift, 160.0, sam=0.5),
            ]
    return rows


def test_a_verdict_names_a_or_says_only_better_worse_or_no_difference():
    better = {"a": "ae_sam", "n": 3, "ci_low": 0.01, "ci_high": 0.03}
    worse = {**better, "ci_low": -0.03, "ci_high": -0.01}
    neither = {**better, "ci_low": -0.01, "ci_high": 0.01}
    assert bench.verdict(better) == "AE-SAM better (95 % CI excludes 0)"
    assert [bench.verdict(t, "a", reason=False) for t in (better, worse, neither)] == [
        "a better", "a worse", "no significant difference"]


def test_the_reports_numbers_tables_and_csv(tmp_path):
    from keras_aesam.bench import tables

    assert (tables.number(0.12345, 1, 100), tables.number(None), tables.plus_minus(0.5, None)) == ("12.3", "–", "0.50")
    assert tables.plus_minus(0.9012, 0.0123, 2, 100) == "90.12 ± 1.23"
    assert tables.interval({"ci_low": -0.0012, "ci_high": 0.0134}) == "[-0.12, +1.34]"
    assert tables.interval({"ci_low": None, "ci_high": None}) == "–"
    assert [tables.p_value(p) for p in (0.01234, 0.00012, None)] == ["0.012", "1.2e-04", "–"]
    assert tables.p_value(0.00012, floor=True) == "< 0.001"
    assert tables.column_table([{"x": 1}, {"x": None}], [("x", lambda r: r["x"]), ("2x", lambda r: "")]) == [
        "| x | 2x |", "|---|---|", "| 1 |  |", "| None |  |"]
    assert tables.degenerate_warning([]) == []
    tables.write_csv(tmp_path / "t.csv", [{"a": 1 / 3, "b": None, "c": "x", "extra": 1}], ("a", "b", "c"))
    assert (tmp_path / "t.csv").read_bytes() == b"a,b,c\r\n0.333333,,x\r\n"


def test_time_ratios_pair_each_run_with_the_erm_of_its_group():
    rows = _synthetic_rows()
    ratios = bench.time_ratios(rows)
    assert ratios["clean_s0_sam"] == pytest.approx(2.1)
    assert ratios["noise40_s2_ae_sam"] == pytest.approx(1.52)
    assert ratios["clean_s1_erm"] == pytest.approx(1.0)
    rows.append(_row("clean", 7, "sam", 0.8, 200.0, sam=1.0))  # no ERM for seed 7
    assert "clean_s7_sam" not in bench.time_ratios(rows)
    for r in rows:  # a run resumed in a later session is not side by side with its ERM
        r["session"] = 2 if r["run_id"] == "clean_s0_sam" else 1
    ratios = bench.time_ratios(rows)
    assert "clean_s0_sam" not in ratios and "clean_s1_sam" in ratios


def test_aggregate_means_stds_and_ideal():
    summaries = bench.aggregate(_synthetic_rows())
    assert [s["method"] for s in summaries[:4]] == ["erm", "sam", "ss_sam", "ae_sam"]  # paper order
    assert [s["setting"] for s in summaries] == ["clean"] * 4 + ["noise40"] * 4
    ae = next(s for s in summaries if s["setting"] == "clean" and s["method"] == "ae_sam")
    assert ae["n"] == 3 and ae["seeds"] == [0, 1, 2]
    assert ae["acc_mean"] == pytest.approx(np.mean([0.83, 0.82, 0.84]))
    assert ae["acc_std"] == pytest.approx(np.std([0.83, 0.82, 0.84], ddof=1))
    assert ae["sam_mean"] == pytest.approx(0.5)
    assert ae["ideal_mean"] == pytest.approx(1.5)
    assert ae["ratio_mean"] == pytest.approx(np.mean([1.50, 1.51, 1.52]))
    assert ae["over_ideal_mean"] == pytest.approx(np.mean([1.50, 1.51, 1.52]) / 1.5)
    sam = next(s for s in summaries if s["setting"] == "clean" and s["method"] == "sam")
    assert sam["ratio_std"] == pytest.approx(0.0)


def test_paired_tests_per_setting_and_pooled():
    tests = bench.paired_tests(_synthetic_rows(), comparisons=[("ae_sam", "ss_sam", "claim")])
    assert [t["setting"] for t in tests] == ["clean", "noise40", "pooled"]
    clean = tests[0]
    assert clean["seeds"] == [0, 1, 2] and clean["n"] == 3
    assert clean["mean_diff"] == pytest.approx(np.mean([0.02, 0.025, 0.03]))
    assert tests[2]["n"] == 6
    assert tests[0]["ci_low"] > 0  # consistent +2..4 pp: significant
    assert bench.verdict(tests[0]).startswith("AE-SAM better")


def test_paired_tests_use_only_seeds_both_methods_have():
    rows = [r for r in _synthetic_rows() if not (r["method"] == "ss_sam" and r["seed"] == 2)]
    clean = bench.paired_tests(rows, comparisons=[("ae_sam", "ss_sam", "claim")])[0]
    assert clean["seeds"] == [0, 1] and clean["n"] == 2


def test_report_from_synthetic_results(tmp_path):
    (tmp_path / "runs").mkdir()
    for row in _synthetic_rows():
        (tmp_path / "runs" / f"{row['run_id']}.json").write_text(json.dumps(row))
    paths = bench.write_report(tmp_path)
    text = paths["report"].read_text()
    assert "| AE-SAM | 3 | 83.00 ± 1.00 | 50.0 ± 0.0 |" in text
    assert "AE-SAM − SS-SAM | clean | 3 |" in text
    with open(paths["csv"]) as f:
        assert len(list(csv.DictReader(f))) == len(_synthetic_rows())


def test_a_run_at_chance_level_is_flagged_in_the_report(tmp_path):
    (tmp_path / "runs").mkdir()
    rows = _synthetic_rows()
    rows[0] = {**rows[0], "test_accuracy": 0.1, "test_loss": 2.3026}  # ten classes: chance is 0.1
    for row in rows:
        (tmp_path / "runs" / f"{row['run_id']}.json").write_text(json.dumps(row))
    text = bench.write_report(tmp_path)["report"].read_text()
    assert f"1 run(s) ended at chance-level accuracy or with a non-finite loss:** {rows[0]['run_id']}." in text
    rows[0]["test_accuracy"] = 0.8
    (tmp_path / "runs" / f"{rows[0]['run_id']}.json").write_text(json.dumps(rows[0]))
    assert "chance-level accuracy" not in bench.write_report(tmp_path)["report"].read_text()


def test_the_console_line_of_a_run_gives_the_time_left_and_flags_chance_level():
    import io

    from keras_aesam.bench.progress import Progress

    stream = io.StringIO()
    progress = Progress(4, stream, done=1)  # one run finished in an earlier session
    progress.finished({"run_id": "a"}, {"test_accuracy": 0.8, "test_loss": 0.5}, 30.0, "test acc 0.8000")
    progress.finished({"run_id": "b"}, {"test_accuracy": 0.1, "test_loss": 2.3}, 90.0, "test acc 0.1000")
    first, second = stream.getvalue().splitlines()
    # time left = runs left x mean time of the runs timed here: after a, 2 x 30 s; after b, 1 x (30 + 90) / 2 s
    assert first == "  [2/4] a: test acc 0.8000, about 1 min left"
    assert second == "  [3/4] b: test acc 0.1000, about 1 min left  <-- DEGENERATE: chance-level accuracy"


def test_a_workers_epoch_lines_reach_the_console_whole(tmp_path):
    import io

    from keras_aesam.bench.progress import PROGRESS_MARK
    from keras_aesam.bench.session import _LogRelay

    log = tmp_path / "w.log"
    log.write_text("old line\n")
    stream = io.StringIO()
    relay = _LogRelay(log, stream)
    with open(log, "a") as f:
        f.write(f"tensorflow noise\n{PROGRESS_MARK}clean_s0_sam epoch 2/4: train loss 1.0\n{PROGRESS_MARK}clean_s0")
    relay()
    assert stream.getvalue() == "    clean_s0_sam epoch 2/4: train loss 1.0\n"
    with open(log, "a") as f:
        f.write("_sam epoch 4/4: done\n")
    relay()
    assert stream.getvalue().splitlines()[-1] == "    clean_s0_sam epoch 4/4: done"


def test_the_bench_trains_with_the_one_recipe_and_the_papers_methods():
    import keras

    from keras_aesam import methods, recipe

    assert bench.ALL_METHODS == methods.PAPER_METHODS
    assert bench.COMMON["weight_decay_mode"] == recipe.Recipe().weight_decay_mode == "l2"
    args = bench.build_parser().parse_args(["--methods", "ERM,AE-SAM", "--no-peer"])
    assert bench.resolve(args)["methods"] == ["erm", "ae_sam"]
    l2 = bench.build_network(keras, "resnet8", num_classes=10, input_shape=(28, 28, 1), weight_decay=1e-4)
    decoupled = bench.build_network(keras, "resnet8", num_classes=10, input_shape=(28, 28, 1), weight_decay=1e-4,
                                    weight_decay_mode="decoupled")
    assert len(l2.losses) == len([w for w in l2.weights if "kernel" in w.path]) and not decoupled.losses


def test_msam_without_momentum_is_refused_before_any_run(tmp_path):
    args = bench.build_parser().parse_args(["--methods", "erm,msam", "--momentum", "0", "--no-peer",
                                            "--output", str(tmp_path)])
    with pytest.raises(bench.BadInput, match=r"--momentum must be in \(0, 1\), got 0"):
        bench.resolve(args)
    args = bench.build_parser().parse_args(["--methods", "erm,sam", "--momentum", "0", "--no-peer",
                                            "--output", str(tmp_path)])
    assert bench.resolve(args)["methods"] == ["erm", "sam"]  # momentum 0 is fine without msam


# ------------------------------------------------------------------- resume


def _fake_body(spec, out):
    frac = {"erm": 0.0, "sam": 1.0}.get(spec["method"], 0.5)
    return {"test_accuracy": 0.5 + 0.01 * spec["seed"], "sam_fraction": frac, "steps": 8, "sam_steps": int(8 * frac),
            "grad_evals": 8 + int(8 * frac), "pass_equivalents": 8 + 8 * frac, "step_ms": 100.0 * (1 + frac),
            "epoch_seconds_after_first": 1.0, "first_epoch_seconds": 3.0, "timed_steps": 8}


def _plan(tmp_path, extra=()):
    args = bench.build_parser().parse_args(
        ["--methods", "erm,sam,ae_sam", "--seeds", "2", "--no-peer", "--isolation", "none",
         "--output", str(tmp_path / "out"), *extra])
    return bench.resolve(args)


def test_resume_skips_finished_runs(tmp_path, monkeypatch):
    calls = []
    interrupt = {"at": 4}

    def fake(spec, out):
        calls.append(spec["run_id"])
        if len(calls) == interrupt["at"]:
            raise KeyboardInterrupt  # interrupted in the middle of the 4th run
        return _fake_body(spec, out)

    monkeypatch.setattr(bench, "_run_method", fake)
    out = tmp_path / "out"
    assert bench.run_bench(_plan(tmp_path)) == 130
    finished = sorted(p.stem for p in (out / "runs").glob("*.json"))
    assert finished == ["clean_s0_ae_sam", "clean_s0_erm", "clean_s0_sam"]
    assert "PARTIAL: 3 of 6 runs finished" in (out / "report.md").read_text()

    calls.clear()
    interrupt["at"] = None
    assert bench.run_bench(_plan(tmp_path)) == 0
    assert calls == ["clean_s1_erm", "clean_s1_sam", "clean_s1_ae_sam"]
    assert "Status: **complete**" in (out / "report.md").read_text()

    calls.clear()
    assert bench.run_bench(_plan(tmp_path)) == 0  # everything finished: nothing runs
    assert calls == []
    meta = json.loads((out / "bench.json").read_text())
    assert [s["skipped_finished_runs"] for s in meta["sessions"]] == [0, 3, 6]

    calls.clear()
    assert bench.run_bench(_plan(tmp_path), fresh=True) == 0  # --fresh starts over
    assert len(calls) == 6


def test_resume_refuses_results_of_another_configuration(tmp_path, monkeypatch):
    monkeypatch.setattr(bench, "_run_method", _fake_body)
    assert bench.run_bench(_plan(tmp_path)) == 0
    with pytest.raises(bench.BadInput, match="another configuration .*differs in: .*lr"):
        bench.run_bench(_plan(tmp_path, ["--lr", "0.05"]))


def test_results_stored_before_the_device_flags_still_resume(tmp_path, monkeypatch):
    """Runs stored before specs had strategy, cpu_devices and sync_perturbation
    were all made on one device: at those flags' defaults they are the same runs."""
    monkeypatch.setattr(bench, "_run_method", _fake_body)
    assert bench.run_bench(_plan(tmp_path)) == 0
    added = ("strategy", "cpu_devices", "sync_perturbation")
    for path in (tmp_path / "out" / "runs").glob("*.json"):
        result = json.loads(path.read_text())
        old_spec = {k: v for k, v in result["spec"].items() if k not in (*added, "spec_hash")}
        result["spec_hash"] = result["spec"]["spec_hash"] = bench._spec_hash(old_spec)
        path.write_text(json.dumps(result))
    calls = []
    monkeypatch.setattr(bench, "_run_method", lambda spec, out: calls.append(spec) or _fake_body(spec, out))
    assert bench.run_bench(_plan(tmp_path)) == 0
    assert calls == []
    with pytest.raises(bench.BadInput, match="another configuration .*differs in: .*sync_perturbation"):
        bench.run_bench(_plan(tmp_path, ["--no-sync-perturbation"]))


def test_a_failed_run_is_reported_and_the_others_still_run(tmp_path, monkeypatch):
    def fake(spec, out):
        if spec["run_id"] == "clean_s0_sam":
            raise RuntimeError("boom")
        return _fake_body(spec, out)

    monkeypatch.setattr(bench, "_run_method", fake)
    assert bench.run_bench(_plan(tmp_path)) == 1
    out = tmp_path / "out"
    assert "RuntimeError: boom" in (out / "runs" / "clean_s0_sam.error.txt").read_text()
    assert len(list((out / "runs").glob("*.json"))) == 5
    monkeypatch.setattr(bench, "_run_method", _fake_body)
    assert bench.run_bench(_plan(tmp_path)) == 0  # resume runs the failed one only
    assert not (out / "runs" / "clean_s0_sam.error.txt").exists()


# ------------------------------------------------------------- end to end


def test_tiny_end_to_end_run(tmp_path, capsys):
    out = tmp_path / "bench"
    code = bench.main(["--methods", "erm,sam", "--seeds", "1", "--train-size", "256", "--epochs", "1",
                       "--test-batches", "2", "--no-peer", "--isolation", "none", "--output", str(out)])
    assert code == 0
    console = capsys.readouterr().out
    assert "[epoch] clean_s0_sam epoch 1/1: train loss" in console and "left in this run" in console
    assert "  [1/2] clean_s0_erm: test acc" in console and "  [2/2] clean_s0_sam: test acc" in console
    with open(out / "results.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["method"] for r in rows] == ["erm", "sam"]
    sam = next(r for r in rows if r["method"] == "sam")
    assert float(sam["sam_fraction"]) == 1.0 and int(sam["steps"]) == 2
    assert int(sam["grad_evals"]) == 4
    assert 0.0 <= float(sam["test_accuracy"]) <= 1.0
    report = (out / "report.md").read_text()
    assert "| ERM | 1 |" in report and "| SAM | 1 |" in report
    assert (out / "accuracy_vs_sam.png").is_file() and (out / "time_per_epoch.png").is_file()
    # both methods started from the same weights
    assert len(list((out / "init").glob("*.npz"))) == 1


# ------------------------------------------------------------------ the peer


@pytest.fixture
def tfk():
    return pytest.importorskip("tf_keras")


def test_the_tf_keras_twin_computes_the_same_function(tfk):
    import keras

    keras.utils.set_random_seed(3)
    ours = bench.build_network(keras, "resnet8", num_classes=10, input_shape=(28, 28, 1))
    twin = bench.build_network(tfk, "resnet8", num_classes=10, input_shape=(28, 28, 1))
    twin.set_weights(ours.get_weights())
    x = np.random.default_rng(0).normal(size=(4, 28, 28, 1)).astype("float32")
    np.testing.assert_allclose(twin(x, training=False).numpy(), np.asarray(ours(x, training=False)), atol=1e-4)
    assert ours.count_params() == twin.count_params() == 78_426


def _peer(tfk, inner):
    model = tfk.models.experimental.SharpnessAwareMinimization(inner, rho=0.05)
    model.compile(optimizer=tfk.optimizers.SGD(0.1),
                  loss=tfk.losses.SparseCategoricalCrossentropy(from_logits=True), run_eagerly=True)
    return model


def test_what_the_peer_does_differently(tfk):
    """The facts the report states about Keras 2's SharpnessAwareMinimization."""
    layers = tfk.layers
    seen = []

    class Probe(layers.Layer):
        def call(self, x, training=None):
            seen.append(training)
            return x

    rng = np.random.default_rng(0)
    x = rng.normal(2.0, 1.0, size=(32, 4)).astype("float32")
    y = rng.integers(0, 3, 32)

    # 1. first pass without training=True; BatchNorm statistics move once, from the second pass
    inputs = tfk.Input((4,))
    bn = layers.BatchNormalization(momentum=0.9)
    inner = tfk.Model(inputs, layers.Dense(3)(bn(Probe()(inputs))))
    seen.clear()  # building the functional model called the layer once
    _peer(tfk, inner).fit(x, y, batch_size=32, epochs=1, verbose=0, shuffle=False)
    assert seen == [None, True]
    np.testing.assert_allclose(bn.moving_mean.numpy(), 0.1 * x.mean(0), rtol=1e-4)

    # 2. model.losses (an L2 kernel regularizer) never reach the gradient
    inputs = tfk.Input((4,))
    dense = layers.Dense(3, kernel_regularizer=tfk.regularizers.L2(1.0))
    inner = tfk.Model(inputs, dense(inputs))
    kernel = dense.kernel.numpy().copy()
    _peer(tfk, inner).fit(np.zeros_like(x), y, batch_size=32, epochs=1, verbose=0)
    assert inner.losses and np.array_equal(kernel, dense.kernel.numpy())

    # 3. sample_weight does reach the loss
    inputs = tfk.Input((4,))
    inner = tfk.Model(inputs, layers.Dense(3)(inputs))
    before = [w.copy() for w in inner.get_weights()]
    model = _peer(tfk, inner)
    model.fit(x, y, sample_weight=np.zeros(32, "float32"), batch_size=32, epochs=1, verbose=0)
    assert all(np.array_equal(a, b) for a, b in zip(before, inner.get_weights()))

    # 4. the logged loss averages the losses at w and at w + e
    inputs = tfk.Input((4,))
    inner = tfk.Model(inputs, layers.Dense(3)(inputs))
    loss_fn = tfk.losses.SparseCategoricalCrossentropy(from_logits=True)
    import tensorflow as tf

    with tf.GradientTape() as tape:
        at_w = loss_fn(y, inner(x))
    grads = tape.gradient(at_w, inner.trainable_variables)
    norm = tf.linalg.global_norm(grads)
    saved = [v.numpy() for v in inner.trainable_variables]
    for v, g in zip(inner.trainable_variables, grads):
        v.assign_add(g * 0.05 / norm)
    at_w_e = loss_fn(y, inner(x))
    for v, w in zip(inner.trainable_variables, saved):
        v.assign(w)
    logged = _peer(tfk, inner).fit(x, y, batch_size=32, epochs=1, verbose=0).history["loss"][0]
    assert logged == pytest.approx((float(at_w) + float(at_w_e)) / 2, rel=1e-5)
    assert not math.isclose(float(at_w), float(at_w_e), rel_tol=1e-6)


def test_the_train_mode_diagnostic_runs_both_passes_in_training_mode(tfk):
    layers = tfk.layers
    seen = []

    class Probe(layers.Layer):
        def call(self, x, training=None):
            seen.append(training)
            return x

    inputs = tfk.Input((4,))
    inner = tfk.Model(inputs, layers.Dense(3)(Probe()(inputs)))
    model = bench._train_mode_sam(tfk)(inner, rho=0.05)
    model.compile(optimizer=tfk.optimizers.SGD(0.1),
                  loss=tfk.losses.SparseCategoricalCrossentropy(from_logits=True), run_eagerly=True)
    x = np.random.default_rng(0).normal(size=(8, 4)).astype("float32")
    seen.clear()
    model.fit(x, np.zeros(8, "int32"), batch_size=8, epochs=1, verbose=0)
    assert seen == [True, True]
    seen.clear()
    model.evaluate(x, np.zeros(8, "int32"), verbose=0)
    assert seen == [False]
