"""The bench's CSV and ``report.md``, written from the stored run results."""

from __future__ import annotations

import json
from pathlib import Path

from keras_aesam.bench.peer import _probe_markdown
from keras_aesam.bench.plan import (
    PEER_METHOD,
    PEER_REQUIREMENT,
    PEER_TRAIN_MODE,
    _pretty,
)
from keras_aesam.bench.plots import write_plots
from keras_aesam.bench.progress import is_degenerate
from keras_aesam.bench.records import load_results
from keras_aesam.bench.stats import (
    _method_order,
    aggregate,
    mean_std,
    paired_difference,
    paired_tests,
    time_ratios,
    verdict,
)
from keras_aesam.bench.tables import (
    MISSING,
    column_table,
    degenerate_warning,
    interval,
    number,
    p_value,
    plus_minus,
    points,
    write_csv,
)

CSV_COLUMNS = (
    "run_id", "kind", "setting", "noise", "seed", "method", "test_accuracy", "test_loss",
    "train_accuracy_last_epoch", "train_loss_last_epoch", "steps", "sam_steps", "sam_fraction",
    "expected_sam_fraction", "grad_evals", "pass_equivalents", "first_epoch_seconds",
    "epoch_seconds_after_first", "step_ms", "step_ms_first_epoch", "step_cpu_ms", "timed_steps", "ratio_to_erm",
    "cpu_ratio_to_erm",
    "fit_seconds", "run_seconds", "skipped_steps", "parameters", "train_examples", "noise_rate_realised",
    "hyperparameters", "framework", "strategy", "replicas", "sync_perturbation", "loadavg_start", "loadavg_end",
    "finished_at",
)

#: Where each weight-decay mode acts, for the report's recipe line.
_DECAY_WHERE = {"decoupled": ": Keras SGD(weight_decay=…), outside g",
                "l2": ": L2 kernel regularizer of weight_decay/2, inside g"}


def write_results_csv(rows, path):
    """``results.csv``: every run, one row each, with its step-time ratios to ERM."""
    ratios = time_ratios(rows)
    cpu_ratios = time_ratios(rows, "step_cpu_ms")
    records = [{**r, "ratio_to_erm": ratios.get(r["run_id"]), "cpu_ratio_to_erm": cpu_ratios.get(r["run_id"]),
                "hyperparameters": json.dumps(r.get("resolved_hyperparameters"), sort_keys=True),
                **{k: " ".join(str(x) for x in (r.get(k) or [])) for k in ("loadavg_start", "loadavg_end")}}
               for r in sorted(rows, key=lambda r: (r["noise"], r["seed"], _method_order(r["method"])))]
    write_csv(path, records, CSV_COLUMNS)


def _title(meta, rows):
    """The title and whether every planned run finished."""
    lines = []
    add = lines.append
    overrides = [a for a in meta.get("argv", []) if a.startswith("--") and a not in (
        "--profile", "--output", "-o", "--resume", "--fresh")]
    add(f"# keras-aesam bench: {meta.get('profile', '?')} profile"
        + (" with command-line overrides" if overrides else ""))
    add("")
    expected = len(meta.get("run_ids", [])) or len(rows)
    status = "complete" if len(rows) >= expected else f"PARTIAL: {len(rows)} of {expected} runs finished"
    add(f"Status: **{status}**.")
    add("")
    warning = degenerate_warning(sorted(r["run_id"] for r in rows if is_degenerate(r)))
    return lines + warning + ([""] if warning else [])


def _what_ran(meta, rows):
    """Commands, machine, versions, sessions, data, network, recipe, methods."""
    lines = []
    add = lines.append
    config = meta.get("config", {})
    sessions = meta.get("sessions", [])
    add("## What ran")
    add("")
    commands = []
    for s in meta.get("sessions", []):
        if s.get("command") and s["command"] not in commands:
            commands.append(s["command"])
    if not commands:
        commands = [meta.get("command", "keras-aesam bench")]
    add("- Command" + ("s (one per session; a later one resumed the earlier)" if len(commands) > 1 else "")
        + ": " + "; ".join(f"`{c}`" for c in commands))
    machine = meta.get("machine", {})
    add(f"- Machine: {machine.get('cpu')}, {machine.get('cores')} cores ({machine.get('platform')}, "
        f"Python {machine.get('python')}); shared with other jobs, load average at start/end of each "
        "session below.")
    versions = meta.get("versions", {})
    add("- Versions: " + ", ".join(f"{k} {v}" for k, v in versions.items() if v is not None))
    for i, s in enumerate(sessions):
        wall = s.get("wall_seconds")
        add(f"- Session {i + 1}: started {s.get('started')}, finished {s.get('finished', '?')}, wall "
            f"{number(None if wall is None else wall / 60, 1)} min, skipped {s.get('skipped_finished_runs', 0)} "
            f"finished runs, load average {s.get('loadavg_start')} → {s.get('loadavg_end')}"
            f"{' (interrupted)' if s.get('interrupted') else ''}")
    parameters = next((r.get("parameters") for r in rows if r.get("parameters")), None)
    train_examples = next((r.get("train_examples") for r in rows if r.get("train_examples")), None)
    steps_per_epoch = next((r.get("steps_per_epoch") for r in rows if r.get("steps_per_epoch")), None)
    test_set = ("the full test set" if not config.get("test_batches")
                else f"the first {config['test_batches']} test batches only")
    add(f"- Data: {config.get('dataset')}, {train_examples} training examples (seeded subset of the "
        f"{100 * (1 - config.get('validation_fraction', 0.1)):.0f} % left after the validation split), "
        f"{test_set}; label noise flips that share of the training labels only (test labels clean).")
    add(f"- Network: {config.get('network')} ({parameters} parameters), logits + sparse cross-entropy.")
    add(f"- Optimizer (every method): SGD momentum {config.get('momentum')}, lr {config.get('lr')} with a "
        f"cosine decay to 0 over {config.get('epochs')} epochs × {steps_per_epoch} steps, batch "
        f"{config.get('batch_size')}, weight decay {config.get('weight_decay')} "
        f"({config.get('weight_decay_mode')}{_DECAY_WHERE.get(config.get('weight_decay_mode'), '')}), "
        "XLA off.")
    add(f"- Methods: {', '.join(_pretty(m) for m in meta.get('methods', []))}; seeds {meta.get('seeds')}; "
        f"label noise {meta.get('noise')}. ρ = {config.get('rho')} (not tuned). On noisy labels LookSAM k=2 and "
        "AE-SAM/AE-LookSAM λ1=-1, λ2=1 (paper §4.3); otherwise the paper's defaults "
        "(SS-SAM p=0.5, LookSAM k=5 α=0.7, AE-SAM λ=(-1,1), AE-LookSAM λ=(0,2), δ=0.9, ESAM β=0.6 γ=0.5).")
    add("- Same for every method of a seed: the data split and noise, the batch order, the initial weights "
        "(built once per seed, loaded by every method), the method seeds. "
        f"Isolation: {meta.get('isolation')} (a fresh worker process per (setting, seed) group for `group`).")
    if meta.get("peer_note"):
        add(f"- No peer row: {meta['peer_note']}.")
    add("")
    return lines


def _results(rows, summaries):
    """One table per setting: accuracy, %SAM, passes and time ratios."""
    lines = []
    add = lines.append
    add("## Results")
    add("")
    add("Test accuracy and timing: mean ± sample std over seeds. %SAM is measured (SAM steps / steps). "
        "Grad evals = steps × (1 + ζ) (ESAM: 2 per step, its second on ⌈γB⌉ samples). "
        "Passes = forward-backward passes in whole-batch units (ESAM: 1 + ⌈γB⌉/B + a forward pass counted as 1/3), "
        "and **ideal** = passes / steps, the step-time ratio to ERM if a step cost only its passes. "
        "Epoch s leaves out the first epoch (tracing, cache filling), reported apart as 1st epoch s. "
        "× ERM = mean step time / ERM's mean step time of the same seed and setting (runs back to back), "
        "in wall time and in CPU time of the process (`time.process_time`, less disturbed by the other jobs "
        "on the machine); / ideal = (× ERM) / ideal, 1.0 meaning no overhead beyond the extra passes. "
        "Ratios pair runs of the same bench session only (a run resumed in a later session gets none).")
    add("")
    settings = []
    for s in summaries:
        if s["setting"] not in settings:
            settings.append(s["setting"])
    for setting in settings:
        items = [s for s in summaries if s["setting"] == setting]
        realised = sorted({round(r.get("noise_rate_realised") or 0, 4) for r in rows if r["setting"] == setting})
        add(f"### {setting}" + (f" (realised noise {', '.join(f'{100 * x:.1f} %' for x in realised)})"
                               if setting != "clean" else ""))
        add("")
        add("| method | n | test acc (%) | %SAM | grad evals | passes | ideal | epoch s | 1st epoch s | "
            "step ms | × ERM (wall) | / ideal (wall) | × ERM (CPU) | / ideal (CPU) |")
        add("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
        for s in items:
            add(f"| {_pretty(s['method'])} | {s['n']} | {plus_minus(s['acc_mean'], s['acc_std'], 2, 100)} | "
                f"{plus_minus(s['sam_mean'], s['sam_std'], 1, 100)} | {number(s['grad_evals_mean'], 0)} | "
                f"{number(s['pass_equivalents_mean'], 0)} | {number(s['ideal_mean'], 2)} | "
                f"{plus_minus(s['epoch_s_mean'], s['epoch_s_std'], 1)} | {number(s['first_epoch_s_mean'], 1)} | "
                f"{number(s['step_ms_mean'], 0)} | {plus_minus(s['ratio_mean'], s['ratio_std'], 2)} | "
                f"{plus_minus(s['over_ideal_mean'], s['over_ideal_std'], 2)} | "
                f"{plus_minus(s['cpu_ratio_mean'], s['cpu_ratio_std'], 2)} | "
                f"{plus_minus(s['cpu_over_ideal_mean'], s['cpu_over_ideal_std'], 2)} |")
        add("")
    return lines


#: The columns of the paired-tests table.
_TEST_COLUMNS = (
    ("a − b", lambda t: f"{_pretty(t['a'])} − {_pretty(t['b'])}"),
    ("setting", lambda t: t["setting"]),
    ("n", lambda t: t["n"]),
    ("mean a (%)", lambda t: number(t["mean_a"], 2, 100)),
    ("mean b (%)", lambda t: number(t["mean_b"], 2, 100)),
    ("diff (pp)", lambda t: points(t["mean_diff"])),
    ("95 % CI (pp)", interval),
    ("t", lambda t: number(t["t"], 2)),
    ("p", lambda t: p_value(t["p"])),
    ("reading", verdict),
)


def _tests_table(tests):
    """The paired t-tests over seeds."""
    lines = []
    add = lines.append
    add("## Paired t-tests over seeds")
    add("")
    add("Difference of test accuracy a − b in percentage points, paired by seed (same data, initial weights); "
        "95 % CI from Student's t with n−1 degrees of freedom; p from `scipy.stats.ttest_rel` (two-sided). "
        "`pooled` pairs every (setting, seed) of all settings (n = settings × seeds), a rougher test since the "
        "settings differ.")
    add("")
    lines += column_table(tests, _TEST_COLUMNS)
    add("")
    return lines


def _peer_table(meta, rows, peers, by):
    """The peer row's accuracy and step times next to our SAM and ERM."""
    lines = []
    add = lines.append
    config = meta.get("config", {})
    add("## Peer row: Keras 2's `SharpnessAwareMinimization`")
    add("")
    add("`tf_keras.models.experimental.SharpnessAwareMinimization` (package "
        f"`{PEER_REQUIREMENT}`), in its own process with `tf_keras` imported explicitly, on the same "
        "`tf.data` pipeline (same split, normalization and batch order), the same architecture rebuilt in "
        "tf_keras and loaded with the same initial weights (checked: max |logit difference| on a probe "
        f"batch {max(r.get('peer_logit_parity_max_abs') or 0 for r in peers):.1e}), the same SGD, cosine "
        f"schedule and weight decay ({_peer_decay(config)}), ρ as SAM's.")
    add("")

    def ratio(r, other, key):
        return r[key] / other[key] if other and other.get(key) and r.get(key) else None

    add("| seed | setting | peer test acc (%) | our SAM test acc (%) | peer step ms | our SAM step ms | "
        "our ERM step ms | peer / our SAM (wall) | peer / our SAM (CPU) | peer / our ERM (wall) | "
        "peer / our ERM (CPU) |")
    add("|---|---|---|---|---|---|---|---|---|---|---|")
    collected = {"sam_wall": [], "sam_cpu": [], "erm_wall": [], "erm_cpu": [], "acc_diff": []}
    for r in sorted(peers, key=lambda r: r["seed"]):
        ours = by.get((r["setting"], r["seed"], "sam"))
        erm = by.get((r["setting"], r["seed"], "erm"))
        values = {"sam_wall": ratio(r, ours, "step_ms"), "sam_cpu": ratio(r, ours, "step_cpu_ms"),
                  "erm_wall": ratio(r, erm, "step_ms"), "erm_cpu": ratio(r, erm, "step_cpu_ms"),
                  "acc_diff": None if not ours else r["test_accuracy"] - ours["test_accuracy"]}
        for k, v in values.items():
            if v is not None:
                collected[k].append(v)
        add(f"| {r['seed']} | {r['setting']} | {number(r['test_accuracy'], 2, 100)} | "
            f"{number(ours and ours['test_accuracy'], 2, 100)} | {number(r.get('step_ms'), 0)} | "
            f"{number(ours and ours.get('step_ms'), 0)} | {number(erm and erm.get('step_ms'), 0)} | "
            f"{number(values['sam_wall'], 2)} | {number(values['sam_cpu'], 2)} | {number(values['erm_wall'], 2)} | "
            f"{number(values['erm_cpu'], 2)} |")
    if collected["sam_wall"]:
        add("")
        parts = [f"{label}: {plus_minus(*mean_std(collected[k])[:2], 2)}" for k, label in (
            ("sam_wall", "peer / our SAM step time (wall)"), ("sam_cpu", "(CPU)"),
            ("erm_wall", "peer / our ERM (wall)"), ("erm_cpu", "(CPU)"))]
        add("Mean ± std over seeds: " + "; ".join(parts) + f" (n = {len(collected['sam_wall'])}).")
    if collected["acc_diff"]:
        test = paired_difference([r["test_accuracy"] for r in sorted(peers, key=lambda r: r["seed"])
                                  if by.get((r["setting"], r["seed"], "sam"))],
                                 [by[(r["setting"], r["seed"], "sam")]["test_accuracy"]
                                  for r in sorted(peers, key=lambda r: r["seed"])
                                  if by.get((r["setting"], r["seed"], "sam"))])
        ci = "" if test["ci_low"] is None else f", 95 % CI {interval(test)} pp, p = {p_value(test['p'])}"
        add(f"Test accuracy, peer − our SAM (paired by seed): {points(test['mean_diff'])} pp{ci} "
            f"(n = {test['n']}).")
    add("")
    return lines


def _peer_diagnostic(rows, peers, by):
    """The train-mode variant of the peer, when it ran."""
    lines = []
    add = lines.append
    diagnostics = {(r["setting"], r["seed"]): r for r in rows if r["method"] == PEER_TRAIN_MODE}
    if diagnostics:
        add("Diagnostic: the same peer with `training=True` on its first pass as well (a subclass whose "
            "`call` turns the unspecified `training` of the first pass into `True`; BatchNorm statistics then "
            "move on both passes). Test accuracy (%):")
        add("")
        add("| seed | peer | peer, 1st pass training=True | our SAM | our ERM |")
        add("|---|---|---|---|---|")
        pairs = []
        for r in sorted(peers, key=lambda r: r["seed"]):
            d = diagnostics.get((r["setting"], r["seed"]))
            ours = by.get((r["setting"], r["seed"], "sam"))
            erm = by.get((r["setting"], r["seed"], "erm"))
            add(f"| {r['seed']} | {number(r['test_accuracy'], 2, 100)} | {number(d and d['test_accuracy'], 2, 100)} | "
                f"{number(ours and ours['test_accuracy'], 2, 100)} | {number(erm and erm['test_accuracy'], 2, 100)} |")
            if d and ours:
                pairs.append((r["test_accuracy"], d["test_accuracy"], ours["test_accuracy"]))
        if pairs:
            add("")
            for label, i, j in (("peer − train-mode peer", 0, 1), ("train-mode peer − our SAM", 1, 2)):
                t = paired_difference([p[i] for p in pairs], [p[j] for p in pairs])
                ci = "" if t["ci_low"] is None else f", 95 % CI {interval(t)} pp, p = {p_value(t['p'])}"
                add(f"- {label}: {points(t['mean_diff'])} pp{ci} (n = {t['n']})")
        add("")
    return lines


def _peer_decay(config):
    """What the peer's weight decay is under the bench's weight-decay mode."""
    if config.get("weight_decay_mode") == "decoupled" or not config.get("weight_decay"):
        return f"{config.get('weight_decay_mode', '?')} {config.get('weight_decay')}, the same as ours"
    return (f"{config.get('weight_decay_mode')} {config.get('weight_decay')}: its L2 penalty is left out of "
            "the gradient, so the peer trains without weight decay; --weight-decay-mode decoupled gives it ours")


def _peer_differences(meta):
    """What the peer does differently from keras_aesam's SAM."""
    lines = []
    add = lines.append
    config = meta.get("config", {})
    add("What the peer does differently (read in `tf_keras/src/models/sharpness_aware_minimization.py` of "
        f"{PEER_REQUIREMENT} and checked by `tests/test_bench.py`):")
    add("")
    add("- The first pass is `self(x_batch)` without `training=True`, so it runs in inference mode: "
        "BatchNorm normalizes with its moving statistics and Dropout is off when `g` (hence the "
        "perturbation) is computed; only the second pass, at `w + e`, has `training=True`. BatchNorm's "
        "moving statistics are therefore updated once per step, from the perturbed weights.")
    add("- It perturbs the variables in place (`assign_add(e)`) and restores them with `assign_add(-e)`: "
        "`w + e − e` is not bit-exact in float32.")
    add("- The loss is `compiled_loss(y, pred, sample_weight)` without `regularization_losses`: "
        "`model.losses` (e.g. L2 kernel regularizers) are not part of either gradient. (`sample_weight` "
        f"*is* passed to the loss.) Here: {_peer_decay(config)}.")
    add("- The reported training `loss` metric is updated by both `compiled_loss` calls, so it averages the "
        "loss at `w` and at `w + e`; the accuracy metric uses the first (inference-mode) pass.")
    add("- Every step is a SAM step (no policy), no ASAM, no mixed-precision loss scaling in `train_step`.")
    add("")
    return lines


def _probe_section(probe):
    """The framework probe: where the step-time difference comes from."""
    lines = []
    add = lines.append
    if probe:
        c = probe["configs"]
        k3, tfk = c["k3_plain"]["cpu_ms"], c["tfk_plain"]["cpu_ms"]
        add("### Where the step-time difference comes from (framework probe)")
        add("")
        add(_probe_markdown(probe))
        add(f"Per step, in CPU time: tf_keras's plain `fit` costs {tfk / k3:.2f}× Keras 3's on the same network "
            f"({c['tfk_plain_unfused_bn']['cpu_ms'] / k3:.2f}× with tf_keras's BatchNormalization(fused=False)); "
            f"relative to its own framework's plain step, SAM costs {c['k3_sam']['cpu_ms'] / k3:.2f}× in keras_aesam "
            f"and {c['tfk_sam']['cpu_ms'] / tfk:.2f}× in tf_keras; keras_aesam's ERM costs "
            f"{c['k3_erm']['cpu_ms'] / k3:.2f}× Keras 3's plain step. (`python -m keras_aesam.bench "
            "--framework-probe --output OUT` reruns it.)")
        add("")
    return lines


def _claims(tests, summaries):
    """The mechanical check of the paper's claims."""
    lines = []
    add = lines.append
    add("## Claims check (mechanical; see docs/results/README.md for the reading)")
    add("")
    for t in tests:
        if t["setting"] == "pooled":
            continue
        sam_a = next((s["sam_mean"] for s in summaries if s["setting"] == t["setting"] and s["method"] == t["a"]), None)
        sam_b = next((s["sam_mean"] for s in summaries if s["setting"] == t["setting"] and s["method"] == t["b"]), None)
        diff = MISSING if t["mean_diff"] is None else f"{points(t['mean_diff'])} pp"
        ci = "" if t["ci_low"] is None else f", 95 % CI {interval(t)}"
        add(f"- {t['claim']} — {t['setting']}: {_pretty(t['a'])} {number(sam_a, 1, 100)} % SAM vs "
            f"{_pretty(t['b'])} {number(sam_b, 1, 100)} % SAM; difference {diff}{ci} (n = {t['n']}): "
            f"{verdict(t)}.")
    add("")
    return lines


def _closing(meta, plots):
    """Plots, failed runs and where every run is stored."""
    lines = []
    add = lines.append
    sessions = meta.get("sessions", [])
    if plots:
        add("## Plots")
        add("")
        for p in plots:
            add(f"![{p.stem}]({p.name})")
            add("")
    failed = [s for s in sessions if s.get("failed")]
    if failed:
        add("## Failed runs")
        add("")
        for s in failed:
            add(f"- session started {s.get('started')}: {', '.join(s['failed'])} (see logs/ and runs/*.error.txt)")
        add("")
    add("Every run: `results.csv` (one row per run) and `runs/<run id>.json` (everything measured, with the "
        "run's full specification).")
    add("")
    return lines


def _report_text(meta, rows, summaries, tests, plots, probe=None):
    """``report.md``: what ran, the results, the tests, the peer row, the claims check."""
    lines = _title(meta, rows) + _what_ran(meta, rows) + _results(rows, summaries) + _tests_table(tests)
    peers = [r for r in rows if r["method"] == PEER_METHOD]
    if peers:
        by = {(r["setting"], r["seed"], r["method"]): r for r in rows}
        lines += _peer_table(meta, rows, peers, by) + _peer_diagnostic(rows, peers, by) + _peer_differences(meta)
    lines += _probe_section(probe) + _claims(tests, summaries) + _closing(meta, plots)
    return "\n".join(lines)


def write_report(out) -> dict:
    """Writes ``results.csv``, the plots and ``report.md`` from the results in ``out``."""
    out = Path(out)
    meta = {}
    if (out / "bench.json").is_file():
        meta = json.loads((out / "bench.json").read_text())
    wanted = set(meta.get("run_ids") or [])
    rows = [r for r in load_results(out) if not wanted or r["run_id"] in wanted]
    sessions = meta.get("sessions", [])
    for r in rows:  # which session ran it: timing ratios pair runs of one session only
        r["session"] = None
        for i, s in enumerate(sessions):
            if s.get("started") and r.get("finished_at") and s["started"] <= r["finished_at"] <= (
                    s.get("finished") or "9999"):
                r["session"] = i + 1
    summaries = aggregate(rows)
    tests = paired_tests([r for r in rows if r["kind"] == "method"])
    write_results_csv(rows, out / "results.csv")
    plots = write_plots(rows, summaries, out) if rows else []
    probe = None
    if (out / "framework_probe.json").is_file():
        probe = json.loads((out / "framework_probe.json").read_text())
    report = out / "report.md"
    report.write_text(_report_text(meta, rows, summaries, tests, plots, probe))
    return {"report": report, "csv": out / "results.csv", "plots": plots, "summaries": summaries, "tests": tests}
