"""The noisy-labels profile's report: tables, paired tests, the Pareto plot.

Reads the run JSON files that :mod:`keras_aesam.bench.noisy_labels` wrote (the runs of the plan in
:mod:`keras_aesam.bench.noisy_labels_plan`) and writes
``results.csv``, ``summary.csv``, ``tests.csv``, ``pareto.png``,
``curves.png`` and ``report.md`` next to them. Nothing here trains: the report
can be redrawn at any time from the stored runs, also while the profile runs.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from keras_aesam.bench.noisy_labels_plan import (
    BUDGETED,
    BUDGETS,
    COMMANDS_FILE,
    MAX_AGE,
    MLP,
    REGIMES,
    RHO_SEEDS,
    SEEDS,
    TIMING_FILE,
    main_specs,
    msam_rho_specs,
    pretty,
    rho_label,
    rival_specs,
    setting_name,
    timing_key,
)
from keras_aesam.bench.plots import label_axes, pyplot, save
from keras_aesam.bench.progress import is_degenerate
from keras_aesam.bench.records import machine
from keras_aesam.bench.stats import group_by, mean_std, paired_difference, verdict
from keras_aesam.bench.step_timing import seconds_per_step
from keras_aesam.bench.tables import column_table, degenerate_warning, interval, p_value, points, write_csv

RUN_COLUMNS = ("setting", "label", "seed", "test_accuracy", "val_accuracy", "train_accuracy",
               "sam_fraction", "target", "grad_evals", "steps", "sharpness", "degenerate", "run_seconds")


def load_regime(out):
    """The regime whose runs ``out`` holds, as its ``profile.json`` names it (the MLP's if it names none)."""
    path = Path(out) / "profile.json"
    name = json.loads(path.read_text()).get("regime", MLP.name) if path.is_file() else MLP.name
    return REGIMES[name]


def load_runs(out):
    runs = []
    for path in sorted((Path(out) / "runs").glob("*.json")):
        run = json.loads(path.read_text())
        spec = run["spec"]
        run.update(setting=spec["setting"], label=spec["label"], seed=spec["seed"], noise=spec["noise"],
                   target=spec["hyperparameters"].get("target_sam_fraction"),
                   degenerate=is_degenerate(run))
        runs.append(run)
    return runs


def chosen_rhos(out, method=""):
    """``{setting: ρ}`` chosen on validation for SAM (``method=""``) or MSAM (``"msam_"``)."""
    prefix = f"{method}rho_"
    return {p.stem[len(prefix):]: json.loads(p.read_text())["rho"] for p in Path(out).glob(f"{prefix}*.json")}


def is_search_row(label, sam_label, msam_label=None):
    """A ρ-search run at a ρ that was not chosen (SAM's, or MSAM's: all of them until one is)."""
    return ((label.startswith("sam_rho") and label != sam_label)
            or (label.startswith("msam_rho") and label != msam_label))


def load_timing(out):
    """``timing.json``'s record (rows by timing key), or None before ``--timing`` ran."""
    path = Path(out) / TIMING_FILE
    return json.loads(path.read_text()) if path.is_file() else None


def summarize(runs, timing=None):
    """Per (setting, label): mean and std over seeds of every number the report shows.

    ``seconds_per_step``: the row's timed non-SAM and SAM steps mixed at its
    realised SAM share (None without a timing of the row).
    """
    rows = []
    for (setting, label), rs in sorted(group_by(runs, "setting", "label").items()):
        acc_mean, acc_std, _ = mean_std([r["test_accuracy"] for r in rs])
        zeta = mean_std([r["sam_fraction"] for r in rs])[0]
        rows.append({
            "setting": setting, "label": label, "n": len(rs),
            "acc_mean": acc_mean, "acc_std": 0.0 if acc_std is None else acc_std,
            "sam_fraction": zeta,
            "sam_fraction_max_dev": _max_dev(rs),
            "evals_ratio": float(np.mean([r["grad_evals"] / r["steps"] for r in rs])),
            "sharpness": float(np.mean([r["sharpness"] for r in rs])),
            "peak_acc": float(np.mean([max(a for _, a in r["curve"]) for r in rs])) if rs[0]["curve"] else None,
            "degenerate": sum(r["degenerate"] for r in rs),
            "target": rs[0]["target"],
            "seconds_per_step": _seconds(timing, label, zeta),
        })
    return rows


def _seconds(timing, label, zeta):
    rows = (timing or {}).get("rows", {})
    row = rows.get(timing_key(label))
    if row is None:
        return None
    value = seconds_per_step(row, zeta)
    donor = rows.get(borrowed_from(label))
    if value is None and donor is not None:
        value = seconds_per_step({kind: row[kind] if row[kind] is not None else donor[kind]
                                  for kind in ("plain", "sam")}, zeta)
    return value


def borrowed_from(label):
    """The row whose step a row's timing borrows when its short timed fit never took that kind of step
    (a policy that took no SAM step in it): the same direction's, LookSAM's or SAM's."""
    return "looksam" if "looksam" in label else "sam"


def borrowing_rows(timing, summary):
    """The timed rows whose seconds mix in another row's step (see :func:`borrowed_from`)."""
    rows = (timing or {}).get("rows", {})
    found = set()
    for r in summary:
        row = rows.get(timing_key(r["label"]))
        if row is not None and seconds_per_step(row, r["sam_fraction"]) is None and r["seconds_per_step"]:
            found.add(timing_key(r["label"]))
    return sorted(found)


def _max_dev(rs):
    devs = [abs(r["sam_fraction"] - r["target"]) for r in rs if r["target"] is not None]
    return max(devs) if devs else None


def _accuracies(runs, setting, label):
    return {r["seed"]: r["test_accuracy"] for r in runs if r["setting"] == setting and r["label"] == label}


def comparisons(setting, sam_label, labels, msam_label=None):
    """The pairs the report tests, (a, b, question): only pairs whose runs exist."""
    pairs = [(sam_label, "erm", "SAM beats ERM (the regime's premise)")]
    for label in sorted(labels - {sam_label, "erm"}):
        if not label.startswith("sam_rho") and not is_search_row(label, sam_label, msam_label):
            pairs.append((label, sam_label, "policy vs SAM"))
    for method in BUDGETED[1:]:
        pairs.append(("ae_sam", f"{method}@ae", "AE-SAM vs a rival at AE-SAM's budget"))
        for f in BUDGETS:
            pairs.append((f"ae_sam@{f:g}", f"{method}@{f:g}", f"AE-SAM vs a rival at {f:.0%} SAM steps"))
    pairs.append(("ae_looksam", "looksam", "AE-LookSAM vs LookSAM"))
    pairs.append(("ae_looksam", "looksam@ae", "AE-LookSAM vs LookSAM at AE-LookSAM's budget"))
    pairs.append(("ae_looksam", "ae_looksam_unbounded", "g_v's age bounded (max_age) vs unbounded"))
    for method in ("late_sam", "quantile_sam"):
        pairs.append(("ae_looksam", f"{method}+looksam@ae", "AE-LookSAM vs a rival policy, LookSAM direction"))
    return [(a, b, q) for a, b, q in pairs if a in labels and b in labels]


def paired_tests(runs, rhos, msam_rhos=None):
    tests = []
    msam_rhos = msam_rhos or {}
    for setting in sorted({r["setting"] for r in runs}):
        if setting not in rhos:
            continue
        labels = {r["label"] for r in runs if r["setting"] == setting}
        msam_label = rho_label(msam_rhos[setting], "msam") if setting in msam_rhos else None
        for a, b, question in comparisons(setting, rho_label(rhos[setting]), labels, msam_label):
            xa, xb = _accuracies(runs, setting, a), _accuracies(runs, setting, b)
            seeds = sorted(set(xa) & set(xb))
            if len(seeds) < 2:
                continue
            test = paired_difference([xa[s] for s in seeds], [xb[s] for s in seeds])
            tests.append({"setting": setting, "a": a, "b": b, "question": question, "seeds": len(seeds), **test})
    return tests


# ---------------------------------------------------------------- files
def _policy_of(label):
    """The line of the Pareto plot a row belongs to (LookSAM's periods on one line, SAM's ρ on another)."""
    name = label.partition("@")[0]
    for prefix, policy in (("sam_rho", "sam"), ("msam_rho", "msam"), ("looksam_k", "looksam")):
        if name.startswith(prefix):
            return policy
    return name


#: The Pareto plots' cost axes: (summary key, scale, axis label, file prefix).
COST_AXES = {
    "evals": ("evals_ratio", 1.0, "gradient evaluations per step (ERM = 1, SAM = 2)", "pareto"),
    "seconds": ("seconds_per_step", 1000.0, "measured milliseconds per step (side by side, timing.json)",
                "pareto_seconds"),
}


def write_pareto(out, summary, setting, sam_label, msam_label=None, axis="evals", regime=MLP):
    """Test accuracy against a cost (``axis``: gradient evaluations or timed seconds per step)."""
    key, scale, xlabel, prefix = COST_AXES[axis]
    rows = [r for r in summary if r["setting"] == setting and r.get(key) is not None
            and not is_search_row(r["label"], sam_label, msam_label)]
    plt = pyplot()
    if not rows or plt is None:
        return None
    fig, ax = plt.subplots(figsize=(8, 5.5))
    markers = dict(zip(("erm", "sam", "ae_sam", "ss_sam", "rst", "late_sam", "quantile_sam", "looksam",
                        "ae_looksam", "late_sam+looksam", "quantile_sam+looksam", "ae_looksam_unbounded",
                        "msam", "esam"), "os^vD<>Ppx*hXd"))
    for policy in markers:
        pts = sorted([r for r in rows if _policy_of(r["label"]) == policy], key=lambda r: r[key])
        if not pts:
            continue
        ax.errorbar([scale * p[key] for p in pts], [100 * p["acc_mean"] for p in pts],
                    yerr=[100 * p["acc_std"] for p in pts], marker=markers[policy], capsize=3,
                    linestyle="-" if len(pts) > 1 else "none", label=pretty(policy))
    front = pareto_front(rows, key)
    ax.plot([scale * p[key] for p in front], [100 * p["acc_mean"] for p in front], color="k",
            linestyle=":", linewidth=1, label="Pareto front")
    labels = (xlabel, "final test accuracy (%), mean ± std over seeds",
              f"Fashion-MNIST, {regime.name.upper()} regime, {setting}: accuracy against cost")
    label_axes(ax, labels, legend_size=7)
    return save(fig, Path(out) / f"{prefix}_{setting}.png")


def pareto_front(rows, key="evals_ratio"):
    """The rows no other row beats on both cost (``key``, lower is better) and accuracy."""
    front = []
    for r in sorted(rows, key=lambda r: (r[key], -r["acc_mean"])):
        if not front or r["acc_mean"] > front[-1]["acc_mean"]:
            front.append(r)
    return front


def write_curves(out, runs, setting, labels):
    """Mean test accuracy over seeds against epochs, one line per label."""
    plt = pyplot()
    if plt is None:
        return None
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for label in labels:
        curves = [r["curve"] for r in runs if r["setting"] == setting and r["label"] == label]
        if not curves:
            continue
        epochs = [e for e, _ in curves[0]]
        mean = np.mean([[a for _, a in c] for c in curves if len(c) == len(epochs)], axis=0)
        ax.plot(epochs, 100 * mean, marker="o", markersize=3, label=pretty(label))
    label_axes(ax, ("epoch", "test accuracy (%), mean over seeds", f"Learning curves, {setting}"))
    return save(fig, Path(out) / f"curves_{setting}.png")


# ---------------------------------------------------------------- the text
def _summary_table(summary, setting, sam_label, msam_label=None):
    lines = ["| method | seeds | final test acc. (%) | peak test acc. (%) | SAM steps (%) | grad. evals / step "
             "| ms / step (timed) | sharpness | chance-level runs |", "|---|---|---|---|---|---|---|---|---|"]
    for r in sorted((r for r in summary if r["setting"] == setting),
                    key=lambda r: (r["label"].startswith("sam_rho") and r["label"] != sam_label,
                                   r["target"] or 0, r["evals_ratio"])):
        flag = f"**{r['degenerate']} ⚠**" if r["degenerate"] else "0"
        tuned = " (ρ search)" if is_search_row(r["label"], sam_label, msam_label) else ""
        peak = "" if r["peak_acc"] is None else f"{100 * r['peak_acc']:.2f}"
        ms = "" if r.get("seconds_per_step") is None else f"{1000 * r['seconds_per_step']:.2f}"
        lines.append(f"| {pretty(r['label'])}{tuned} | {r['n']} | {100 * r['acc_mean']:.2f} ± "
                     f"{100 * r['acc_std']:.2f} | {peak} | {100 * r['sam_fraction']:.1f} | "
                     f"{r['evals_ratio']:.3f} | {ms} | {r['sharpness']:.4f} | {flag} |")
    return lines


def _budget_table(summary, setting):
    lines = ["| policy | " + " | ".join(f"target {f:.0%}" for f in BUDGETS) + " |",
             "|---|" + "---|" * len(BUDGETS)]
    cells = {(r["label"]): r for r in summary if r["setting"] == setting}
    for method in BUDGETED:
        row = []
        for f in BUDGETS:
            r = cells.get(f"{method}@{f:g}")
            row.append("" if r is None else f"{100 * r['sam_fraction']:.1f} % (max dev. "
                       f"{100 * r['sam_fraction_max_dev']:.1f}); acc. {100 * r['acc_mean']:.2f}")
        lines.append(f"| {pretty(method)} | " + " | ".join(row) + " |")
    return lines


def _verdict(test):
    return verdict(test, "a", reason=False)


def _reading(test):
    """A paired test in a sentence: the difference, its 95 % CI, p and the verdict."""
    return (f"{points(test['mean_diff'])} points, 95 % CI {interval(test)}, p = {p_value(test['p'], floor=True)} "
            f"→ **{_verdict(test)}**")


#: The columns of the paired-tests table.
_TEST_COLUMNS = (
    ("a", lambda t: pretty(t["a"])),
    ("b", lambda t: pretty(t["b"])),
    ("seeds", lambda t: t["seeds"]),
    ("a − b (points)", lambda t: points(t["mean_diff"])),
    ("95 % CI", interval),
    ("p (paired t)", lambda t: p_value(t["p"], floor=True)),
    ("reading", _verdict),
)


def _find(tests, setting, a, b):
    for t in tests:
        if (t["setting"], t["a"], t["b"]) == (setting, a, b):
            return t
    return None


#: The paper's claims read off a paired test: (a, b (None: SAM at the chosen ρ), the claim, a note on it,
#: whether the two rows' SAM shares are told).
_CLAIMED_TESTS = (
    ("ae_sam", "ss_sam@ae", "AE-SAM better than SS-SAM at equal budget", "", False),
    ("ae_looksam", "looksam@ae", "AE-LookSAM better than LookSAM at equal budget",
     " (LookSAM at the k nearest AE-LookSAM's realised ζ on each seed)", True),
    ("ae_looksam", None, "AE-LookSAM against SAM", "", False),
    ("ae_looksam", "looksam", "AE-LookSAM better than LookSAM", "", True),
)


def claims(summary, tests, setting, sam_label):
    """The paper's claims, each read off this setting's numbers."""
    cells = {r["label"]: r for r in summary if r["setting"] == setting}
    lines = []
    ae, sam = cells.get("ae_sam"), cells.get(sam_label)
    if ae and sam:
        gap = 100 * (ae["acc_mean"] - sam["acc_mean"])
        holds = gap >= -0.3 and ae["sam_fraction"] <= 0.55
        reading = "holds" if holds else "does not hold"
        lines.append(f"- *AE-SAM within 0.3 points of SAM with ≤ 55 % SAM steps*: AE-SAM − SAM = {gap:+.2f} "
                     f"points at {100 * ae['sam_fraction']:.1f} % SAM steps → **{reading}**.")
    for a, b, claim, note, shares in _CLAIMED_TESTS:
        t = _find(tests, setting, a, b or sam_label)
        if t:
            share = (f" (AE-LookSAM {100 * cells[a]['sam_fraction']:.1f} % SAM steps, LookSAM "
                     f"{100 * cells[b]['sam_fraction']:.1f} %)") if shares else ""
            lines.append(f"- *{claim}*{note}: {_reading(t)}{share}.")
    return lines


def _efficiency(summary, setting, sam_label, msam_label=None):
    """Accuracy gained over ERM per extra gradient evaluation, best first."""
    cells = [r for r in summary if r["setting"] == setting
             and not is_search_row(r["label"], sam_label, msam_label)]
    erm = next((r for r in cells if r["label"] == "erm"), None)
    if erm is None:
        return []
    ranked = sorted((r for r in cells if r["evals_ratio"] > 1.0),
                    key=lambda r: -(r["acc_mean"] - erm["acc_mean"]) / (r["evals_ratio"] - 1.0))
    return [f"{i + 1}. {pretty(r['label'])}: {100 * (r['acc_mean'] - erm['acc_mean']):+.2f} points over ERM for "
            f"{r['evals_ratio'] - 1:.3f} extra evaluations per step "
            f"({100 * (r['acc_mean'] - erm['acc_mean']) / (r['evals_ratio'] - 1):+.1f} points per SAM-step share)"
            for i, r in enumerate(ranked[:8])]


def _commands(out):
    """The commands that filled ``out``, as ``commands.json`` records them (each resumes the folder)."""
    path = Path(out) / COMMANDS_FILE
    recorded = json.loads(path.read_text()) if path.is_file() else []
    if not recorded:
        return [f"Command: `keras-aesam bench --profile noisy-labels --output {out}` (not recorded; resumable)."]
    return ["Commands that filled this folder (each resumes it; started at the times given):", "", "```bash",
            *(f"{c['command']}  # {c['started']}" for c in recorded), "```"]


def _header(out, runs, rhos, regime=MLP, timing=None, summary=()):
    seconds = sum(r.get("run_seconds", 0.0) for r in runs)
    stamps = sorted(r["finished_at"] for r in runs if r.get("finished_at"))
    m = machine()
    recipe = ", ".join(f"{k}={v}" for k, v in regime.recipe.items())
    lines = [
        f"# When to take SAM steps: the noisy-labels profile, {regime.name.upper()} regime",
        "",
        "Written by `keras_aesam.bench.noisy_labels_report` from the run files in `runs/`; every number below is read "
        "from them.",
        "",
        *_commands(out),
        "",
        f"- Recipe: {recipe}; seeds {list(SEEDS)}; every method of a seed starts from the same weights and "
        "sees the same noisy labels and batch order. Validation and test labels are clean.",
        "- ρ chosen for SAM on the validation split (never on test) and used by every method: "
        + ", ".join(f"{s}: ρ = {v:g}" for s, v in sorted(rhos.items())) + ".",
        f"- Machine: {m['processor']}, {m['cpus']} cores, {m['platform']}; Python {m['python']}, TensorFlow "
        f"{m['tensorflow']}, Keras {m['keras']}.",
        f"- {len(runs)} runs, {seconds / 3600:.2f} h of run time in all"
        + (f", finished between {stamps[0]} and {stamps[-1]}." if stamps else "."),
        "- *Sharpness*: mean over 8 training batches of L(w + e) − L(w), e = 0.05·g/‖g‖, at the final "
        "weights (first-order worst case in a ρ-ball, the same ρ for every method).",
        _timing_line(timing, borrowing_rows(timing, summary)),
        "- *Grad. evals / step*: forward-backward passes per step (1 + SAM share); the cost axis. MSAM takes its "
        "one pass at w + e (1.0); ESAM's second pass counts as one although it runs on half the batch and "
        "perturbs 60 % of the weight tensors (plus a forward pass to choose the samples).",
        f"- *The LookSAM direction*: every row with it reuses g_v on at most max_age = {MAX_AGE} steps after the SAM "
        "step that formed it, then takes ERM steps (LookSAM itself: its period k bounds that age at k − 1)."
        + (" *AE-LookSAM, g_v unbounded (paper's rule)* (`max_age=None`) are the runs of the previous round, made "
           "before the bound existed, kept as the paper's rule." if regime.looksam_matched else ""),
    ]
    warning = degenerate_warning([r["run_id"] for r in runs if r["degenerate"]])
    return lines + ([""] + warning if warning else [])


def _timing_line(timing, borrowing=()):
    if timing is None:
        return ("- *ms / step (timed)*: not measured yet (`--timing` times every row side by side, after the "
                "runs); the seconds axis is then drawn.")
    low, high = timing["load_average"]
    return (f"- *ms / step (timed)*: every row's step timed side by side in one process (`--timing`, "
            f"{timing['measured_at']}: {timing['rounds']} interleaved rounds of {timing['warmup']} + "
            f"{timing['steps']} steps from seed 0's weights, load average {low:g} → {high:g}); a row's "
            "non-SAM and SAM steps are timed apart and mixed at its realised SAM share, ERM's median step "
            "times the row's median per-round ratio to ERM. The runs' own fit times are not used: they "
            "shared the machine with other runs."
            + ("" if not borrowing else " Rows whose timed steps included no SAM step take the SAM step of the "
               "row with their direction (LookSAM's or SAM's): " + ", ".join(pretty(b) for b in borrowing) + "."))


def incomplete_rows(runs, rhos, msam_rhos, regime=MLP):
    """``{setting: [(label, seeds done, seeds planned)]}`` of the planned rows that lack seeds.

    The plan is the profile's main and rivals stages (the budget stage runs on the
    seeds each invocation names). MSAM's row is planned once its ρ is chosen.
    """
    done = {key: {r["seed"] for r in rs} for key, rs in group_by(runs, "setting", "label").items()}
    missing = {}
    for setting, rho in rhos.items():
        noise = int(setting[len("noise"):]) / 100
        planned = {s["label"]: SEEDS for s in main_specs(noise, 0, rho, zeta=0.5, zeta_look=0.2, regime=regime)}
        planned.update({s["label"]: RHO_SEEDS for s in msam_rho_specs(noise, regime)})
        msam_rho = msam_rhos.get(setting)
        for s in rival_specs(noise, 0, rho, 1.0 if msam_rho is None else msam_rho, regime):
            if s["method"] != "msam" or msam_rho is not None:
                planned[s["label"]] = SEEDS
        rows = [(label, len(done.get((setting, label), set()) & set(seeds)), len(seeds))
                for label, seeds in planned.items()]
        missing[setting] = [row for row in rows if row[1] < row[2]]
    return missing


def _incomplete_lines(missing, setting):
    rows = missing.get(setting) or []
    if not rows:
        return []
    return ["", "> **Incomplete rows** (runs still to come; their means cover fewer seeds, or the row is absent): "
            + "; ".join(f"{pretty(label)} {n}/{m} seeds" for label, n, m in rows) + "."]


def report_text(out, runs, summary, tests, rhos, plots, msam_rhos=None, regime=MLP, timing=None):
    msam_rhos = msam_rhos or {}
    lines = _header(out, runs, rhos, regime, timing, summary)
    missing = incomplete_rows(runs, rhos, msam_rhos, regime)
    order = sorted({r["setting"] for r in runs}, key=lambda s: (s != setting_name(regime.main_noise), s))
    for setting in order:
        if setting not in rhos:
            continue
        sam_label = rho_label(rhos[setting])
        msam_label = rho_label(msam_rhos[setting], "msam") if setting in msam_rhos else None
        lines += ["", f"## {setting}: {int(setting[len('noise'):])} % of training labels flipped"]
        if msam_label:
            lines += ["", f"MSAM's ρ chosen on validation: {msam_rhos[setting]:g}."]
        lines += _incomplete_lines(missing, setting) + [""]
        lines += _summary_table(summary, setting, sam_label, msam_label)
        found = claims(summary, tests, setting, sam_label) or ["- (runs missing)"]
        lines += ["", "### The paper's claims, here", ""] + found
        lines += ["", "### Accuracy per gradient evaluation", ""] + _efficiency(summary, setting, sam_label,
                                                                                msam_label)
        if any(r["setting"] == setting and r["label"].endswith(f"@{BUDGETS[0]:g}") for r in summary):
            lines += ["", "### Fixed budgets: realised SAM steps against the target", ""]
            lines += _budget_table(summary, setting)
        lines += ["", "### Paired tests over seeds", ""]
        lines += column_table([t for t in tests if t["setting"] == setting], _TEST_COLUMNS)
        for plot in plots.get(setting, []):
            lines += ["", f"![{plot.stem}]({plot.name})"]
    return "\n".join(lines) + "\n"


def write_report(out):
    """Redraw every table and plot from the stored runs; returns the summary rows."""
    out = Path(out)
    regime = load_regime(out)
    runs = load_runs(out)
    if not runs:
        raise FileNotFoundError(f"no runs under {out / 'runs'}")
    rhos, msam_rhos = chosen_rhos(out), chosen_rhos(out, "msam_")
    timing = load_timing(out)
    summary = summarize(runs, timing)
    tests = paired_tests(runs, rhos, msam_rhos)
    write_csv(out / "results.csv", runs, RUN_COLUMNS)
    write_csv(out / "summary.csv", summary, list(summary[0]))
    if tests:
        write_csv(out / "tests.csv", tests, list(tests[0]))
    plots = {}
    for setting, rho in rhos.items():
        sam_label = rho_label(rho)
        msam_label = rho_label(msam_rhos[setting], "msam") if setting in msam_rhos else None
        plots[setting] = [write_pareto(out, summary, setting, sam_label, msam_label, regime=regime),
                          write_pareto(out, summary, setting, sam_label, msam_label, "seconds", regime),
                          write_curves(out, runs, setting, ["erm", sam_label, "ae_sam", "late_sam@ae",
                                                            "quantile_sam@ae", "ss_sam@ae", "looksam",
                                                            "ae_looksam", "ae_looksam_unbounded"])]
    plots = {setting: [p for p in paths if p is not None] for setting, paths in plots.items()}
    (out / "report.md").write_text(report_text(out, runs, summary, tests, rhos, plots, msam_rhos, regime, timing))
    return summary
