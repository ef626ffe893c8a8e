"""Aggregation over seeds, time ratios to ERM, paired t-tests and their plain reading.

The summaries over seeds, the paired test and its reading serve both profiles' reports; ``aggregate``,
``time_ratios`` and ``paired_tests`` are the standard profile's.
"""

from __future__ import annotations

import math

import numpy as np

from keras_aesam.bench.plan import ALL_METHODS, _pretty


def mean_std(values):
    """``(mean, sample std, n)`` of the values that are numbers (None and NaN left out); std None below 2."""
    values = [float(v) for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    if not values:
        return (None, None, 0)
    std = float(np.std(values, ddof=1)) if len(values) > 1 else None
    return (float(np.mean(values)), std, len(values))


def group_by(rows, *keys):
    """``{(row[key] for key in keys): [rows]}``, groups and rows in the order met."""
    groups = {}
    for r in rows:
        groups.setdefault(tuple(r[key] for key in keys), []).append(r)
    return groups


def time_ratios(rows, key="step_ms") -> dict[str, float]:
    """``run_id -> row[key] / row[key] of ERM`` in the same (setting, seed) group.

    ``key`` is ``step_ms`` (wall time per step) or ``step_cpu_ms`` (CPU time).
    """
    erm = {(r["setting"], r["seed"]): r for r in rows if r["method"] == "erm"}
    ratios = {}
    for r in rows:
        base = erm.get((r["setting"], r["seed"]))
        if not base or not base.get(key) or not r.get(key):
            continue
        if r.get("session") != base.get("session"):
            continue  # not side by side: run in another session of the bench
        ratios[r["run_id"]] = r[key] / base[key]
    return ratios


def _ideal(row):
    """Expected step-time ratio to ERM if a step cost only its passes: pass equivalents / steps."""
    if not row.get("steps"):
        return None
    return row["pass_equivalents"] / row["steps"]


def _method_order(method):
    return ALL_METHODS.index(method) if method in ALL_METHODS else len(ALL_METHODS)


def aggregate(rows) -> list[dict]:
    """One summary per (setting, method): means and sample stds over seeds."""
    ratios = time_ratios(rows)
    cpu_ratios = time_ratios(rows, "step_cpu_ms")
    summaries = []
    for (setting, noise, method), items in group_by(rows, "setting", "noise", "method").items():
        items = sorted(items, key=lambda r: r["seed"])
        acc = mean_std([r["test_accuracy"] for r in items])
        frac = mean_std([r["sam_fraction"] for r in items])
        ratio = mean_std([ratios.get(r["run_id"]) for r in items])
        cpu_ratio = mean_std([cpu_ratios.get(r["run_id"]) for r in items])
        ideal = mean_std([_ideal(r) for r in items])
        over_ideal = mean_std([ratios[r["run_id"]] / _ideal(r) for r in items
                               if r["run_id"] in ratios and _ideal(r)])
        cpu_over_ideal = mean_std([cpu_ratios[r["run_id"]] / _ideal(r) for r in items
                                   if r["run_id"] in cpu_ratios and _ideal(r)])
        summaries.append({
            "setting": setting,
            "noise": noise,
            "method": method,
            "n": acc[2],
            "seeds": [r["seed"] for r in items],
            "acc_mean": acc[0], "acc_std": acc[1],
            "sam_mean": frac[0], "sam_std": frac[1],
            "grad_evals_mean": mean_std([r["grad_evals"] for r in items])[0],
            "pass_equivalents_mean": mean_std([r["pass_equivalents"] for r in items])[0],
            "epoch_s_mean": mean_std([r.get("epoch_seconds_after_first") for r in items])[0],
            "epoch_s_std": mean_std([r.get("epoch_seconds_after_first") for r in items])[1],
            "first_epoch_s_mean": mean_std([r.get("first_epoch_seconds") for r in items])[0],
            "step_ms_mean": mean_std([r.get("step_ms") for r in items])[0],
            "timed_steps": int(sum(r.get("timed_steps") or 0 for r in items)),
            "ratio_mean": ratio[0], "ratio_std": ratio[1],
            "cpu_ratio_mean": cpu_ratio[0], "cpu_ratio_std": cpu_ratio[1],
            "step_cpu_ms_mean": mean_std([r.get("step_cpu_ms") for r in items])[0],
            "ideal_mean": ideal[0],
            "over_ideal_mean": over_ideal[0], "over_ideal_std": over_ideal[1],
            "cpu_over_ideal_mean": cpu_over_ideal[0], "cpu_over_ideal_std": cpu_over_ideal[1],
        })
    settings = []
    for r in rows:
        if (r["noise"], r["setting"]) not in settings:
            settings.append((r["noise"], r["setting"]))
    order = {s: i for i, s in enumerate(sorted(settings))}
    summaries.sort(key=lambda s: (order[(s["noise"], s["setting"])], _method_order(s["method"])))
    return summaries


def paired_difference(a, b, confidence=0.95) -> dict:
    """Paired comparison of ``a`` and ``b`` (same seeds, same order): mean difference ``a - b``,
    its ``confidence`` interval (Student t, n-1 degrees of freedom) and ``scipy.stats.ttest_rel``."""
    from scipy import stats

    a = np.asarray(a, dtype=float)
    b = np.asarray(b, dtype=float)
    if a.shape != b.shape:
        raise ValueError(f"paired samples need the same length, got {a.shape} and {b.shape}")
    d = a - b
    n = int(d.size)
    result = {"n": n, "mean_a": float(a.mean()) if n else None, "mean_b": float(b.mean()) if n else None,
              "mean_diff": float(d.mean()) if n else None, "sd_diff": None, "ci_low": None, "ci_high": None,
              "t": None, "p": None, "confidence": confidence}
    if n < 2:
        return result
    sd = float(d.std(ddof=1))
    if sd <= 1e-12 * max(1.0, float(np.abs(d).max())):
        sd = 0.0  # a constant difference (up to round-off): no t statistic
    half = float(stats.t.ppf(0.5 + confidence / 2, n - 1)) * sd / math.sqrt(n)
    result.update(sd_diff=sd, ci_low=float(d.mean()) - half, ci_high=float(d.mean()) + half)
    if sd > 0:
        test = stats.ttest_rel(a, b)
        result.update(t=float(test.statistic), p=float(test.pvalue))
    return result


#: The comparisons the paper's claims rest on: (a, b, what the paper says).
COMPARISONS = (
    ("ae_sam", "ss_sam", "AE-SAM > SS-SAM at about the same %SAM (paper: significant at 95 %)"),
    ("ae_looksam", "looksam", "AE-LookSAM > LookSAM"),
    ("ae_sam", "sam", "AE-SAM ≈ SAM with about half the SAM steps"),
    ("ae_looksam", "sam", "AE-LookSAM ≈ SAM with about a fifth (clean) / half (noisy) of the SAM steps"),
    ("sam", "erm", "SAM > ERM (the premise; robustness to label noise)"),
    ("ae_sam", "erm", "AE-SAM > ERM"),
    ("ae_looksam", "erm", "AE-LookSAM > ERM"),
)


def paired_tests(rows, comparisons=COMPARISONS) -> list[dict]:
    """Paired t-tests over seeds, per setting and pooled over settings, for each comparison."""
    by_key = {(r["setting"], r["seed"], r["method"]): r["test_accuracy"] for r in rows}
    settings = []
    for r in sorted(rows, key=lambda r: r["noise"]):
        if r["setting"] not in settings:
            settings.append(r["setting"])
    tests = []
    for a, b, claim in comparisons:
        pooled_a, pooled_b = [], []
        for setting in settings:
            seeds = sorted({s for (st, s, m) in by_key if st == setting and m == a}
                           & {s for (st, s, m) in by_key if st == setting and m == b})
            if not seeds:
                continue
            xa = [by_key[(setting, s, a)] for s in seeds]
            xb = [by_key[(setting, s, b)] for s in seeds]
            pooled_a += xa
            pooled_b += xb
            tests.append({"a": a, "b": b, "claim": claim, "setting": setting, "seeds": seeds,
                          **paired_difference(xa, xb)})
        if len(settings) > 1 and pooled_a:
            tests.append({"a": a, "b": b, "claim": claim, "setting": "pooled", "seeds": None,
                          **paired_difference(pooled_a, pooled_b)})
    return tests


def verdict(test, name=None, reason=True) -> str:
    """A plain reading of one paired test at 95 %: ``a`` better, worse, or not told apart from ``b``.

    ``name``: how ``a`` is called (its method's name unless given); ``reason``: say why (the CI and 0).
    """
    if test["n"] < 2 or test["ci_low"] is None:
        return "too few seeds"
    if test["ci_low"] > 0 or test["ci_high"] < 0:
        word = "better" if test["ci_low"] > 0 else "worse"
        return f"{_pretty(test['a']) if name is None else name} {word}" + (" (95 % CI excludes 0)" if reason else "")
    return "no significant difference" + (" (95 % CI includes 0)" if reason else "")
