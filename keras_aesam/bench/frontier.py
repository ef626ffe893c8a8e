"""Which method to use: the frontier over every setting of the noisy-labels profile's regimes.

Reads what the profile's report wrote in each folder (``summary.csv``,
``tests.csv``, the chosen ρ) and asks one question of every row: at no more
than ``MAX_PASSES`` gradient evaluations per step, does it keep SAM's accuracy
in *every* setting? A row keeps it in a setting when its mean final test
accuracy lies within SAM's 95 % confidence interval (at or above its lower
end: a row better than SAM qualifies) or when it keeps at least
``GAIN_SHARE`` of SAM's gain over ERM. Among the rows that qualify everywhere,
the one with the most accuracy per gradient evaluation (final test accuracy
over evaluations per step, averaged over the settings) is the answer.

Rows are matched across settings by label, SAM's and MSAM's ρ rows collapsed
to the ρ chosen on validation in each setting. Nothing here trains.

``python -m keras_aesam.bench.frontier FOLDER [FOLDER ...] --output FILE.md``
"""

from __future__ import annotations

import argparse
import csv
import math
import sys
from pathlib import Path

from keras_aesam.bench.noisy_labels_plan import pretty, rho_label
from keras_aesam.bench.noisy_labels_report import chosen_rhos, load_regime
from keras_aesam.bench.tables import interval, points

MAX_PASSES = 1.25
GAIN_SHARE = 0.9
CONFIDENCE = 0.95
#: What a row is called across settings (its ρ row is the chosen one in each).
FAMILY = {"sam": "SAM", "msam": "MSAM"}


def _rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def row_key(label, sam_label, msam_label):
    """The row's name across settings: ``'sam'``/``'msam'`` for the chosen ρ, None for a ρ-search row."""
    if label.startswith("sam_rho"):
        return "sam" if label == sam_label else None
    if label.startswith("msam_rho"):
        return "msam" if label == msam_label else None
    return label


def sam_interval(mean, std, n, confidence=CONFIDENCE):
    """SAM's ``confidence`` interval of its mean accuracy over seeds (Student t)."""
    from scipy import stats

    if n < 2:
        return mean, mean
    half = float(stats.t.ppf(0.5 + confidence / 2, n - 1)) * std / math.sqrt(n)
    return mean - half, mean + half


def load_settings(folders):
    """``{(regime, setting): {row key: summary row (floats), with the paired test against SAM}}``."""
    out = {}
    for folder in folders:
        folder = Path(folder)
        regime = load_regime(folder).name
        rhos, msam_rhos = chosen_rhos(folder), chosen_rhos(folder, "msam_")
        summary = _rows(folder / "summary.csv")
        tests = _rows(folder / "tests.csv") if (folder / "tests.csv").is_file() else []
        for setting in sorted({r["setting"] for r in summary}):
            if setting not in rhos:
                continue
            sam_label = rho_label(rhos[setting])
            msam_label = rho_label(msam_rhos[setting], "msam") if setting in msam_rhos else None
            rows = {}
            for r in summary:
                if r["setting"] != setting:
                    continue
                key = row_key(r["label"], sam_label, msam_label)
                if key is None:
                    continue
                row = {k: float(r[k]) for k in ("n", "acc_mean", "acc_std", "evals_ratio", "degenerate")}
                row["label"] = r["label"]
                vs_sam = [t for t in tests if t["setting"] == setting and t["a"] == r["label"]
                          and t["b"] == sam_label]
                row["vs_sam"] = ({k: float(vs_sam[0][k]) if vs_sam[0][k] else None
                                  for k in ("mean_diff", "ci_low", "ci_high", "p", "seeds")} if vs_sam else None)
                rows[key] = row
            out[(regime, setting)] = rows
    return out


def judge(rows, max_passes=MAX_PASSES, gain_share=GAIN_SHARE):
    """Per row of one setting: ``{key: verdict}`` against that setting's SAM and ERM."""
    sam, erm = rows.get("sam"), rows.get("erm")
    if sam is None or erm is None:
        return {}
    low, high = sam_interval(sam["acc_mean"], sam["acc_std"], int(sam["n"]))
    gain = sam["acc_mean"] - erm["acc_mean"]
    verdicts = {}
    for key, r in rows.items():
        share = (r["acc_mean"] - erm["acc_mean"]) / gain if gain > 0 else None
        within = r["acc_mean"] >= low
        keeps = share is not None and share >= gain_share
        verdicts[key] = {
            "passes": r["evals_ratio"], "acc": r["acc_mean"], "seeds": int(r["n"]), "sam_low": low,
            "sam_high": high, "gain_share": share, "within_ci": within, "keeps_gain": keeps,
            "cheap": r["evals_ratio"] <= max_passes + 1e-9, "degenerate": int(r["degenerate"]),
            "qualifies": (within or keeps) and r["evals_ratio"] <= max_passes + 1e-9 and not r["degenerate"],
            "acc_per_eval": r["acc_mean"] / r["evals_ratio"], "vs_sam": r["vs_sam"],
        }
    return verdicts


def frontier(settings, max_passes=MAX_PASSES, gain_share=GAIN_SHARE):
    """``(ranking, verdicts)``: rows present in every setting, qualifying ones first, by accuracy per evaluation."""
    verdicts = {s: judge(rows, max_passes, gain_share) for s, rows in settings.items()}
    common = set.intersection(*(set(v) for v in verdicts.values())) if verdicts else set()
    ranking = []
    for key in common:
        per = [verdicts[s][key] for s in verdicts]
        ranking.append({
            "key": key, "qualifies_everywhere": all(v["qualifies"] for v in per),
            "settings_qualified": sum(v["qualifies"] for v in per), "settings": len(per),
            "acc_per_eval": sum(v["acc_per_eval"] for v in per) / len(per),
            "max_passes": max(v["passes"] for v in per),
        })
    ranking.sort(key=lambda r: (not r["qualifies_everywhere"], -r["settings_qualified"], -r["acc_per_eval"]))
    return ranking, verdicts


def _name(key):
    return FAMILY.get(key) or pretty(key)


def report(settings, max_passes=MAX_PASSES, gain_share=GAIN_SHARE, sources=()):
    ranking, verdicts = frontier(settings, max_passes, gain_share)
    names = [f"{regime.upper()} {setting}" for regime, setting in verdicts]
    lines = ["# Which method: the frontier over both regimes", "",
             "Written by `keras_aesam.bench.frontier` from the noisy-labels profile's reports"
             + (" in " + ", ".join(f"`{s}`" for s in sources) if sources else "") + "; every number is read "
             "from their `summary.csv` and `tests.csv`.", "",
             f"A row *qualifies* in a setting when it takes at most {max_passes:g} gradient evaluations per step, "
             f"did not collapse, and either its mean final test accuracy is at or above the lower end of SAM's "
             f"{CONFIDENCE:.0%} confidence interval (Student t over seeds) or it keeps at least {gain_share:.0%} "
             "of SAM's gain over ERM. *Accuracy per evaluation*: final test accuracy over gradient evaluations "
             "per step, averaged over the settings.", ""]
    winners = [r for r in ranking if r["qualifies_everywhere"]]
    if winners:
        best = winners[0]
        lines += [f"**Answer: {_name(best['key'])}** qualifies in all {best['settings']} settings "
                  f"({', '.join(names)}) at most {best['max_passes']:.3f} evaluations per step, with "
                  f"{100 * best['acc_per_eval']:.2f} % accuracy per evaluation"
                  + (f"; also qualifying everywhere: {', '.join(_name(r['key']) for r in winners[1:])}."
                     if len(winners) > 1 else "."), ""]
    else:
        lines += [f"**Answer: no row qualifies in every setting** ({', '.join(names)}). The rows nearest, by "
                  "the number of settings where they qualify, are first in the table below.", ""]
    lines += ["| method | settings qualified | max. evals / step | accuracy per evaluation (%) |",
              "|---|---|---|---|"]
    for r in ranking:
        lines.append(f"| {_name(r['key'])} | {r['settings_qualified']}/{r['settings']} | {r['max_passes']:.3f} | "
                     f"{100 * r['acc_per_eval']:.2f} |")
    for (regime, setting), verdict in verdicts.items():
        sam = verdict.get("sam")
        lines += ["", f"## {regime.upper()} {setting}", ""]
        if sam:
            lines += [f"SAM {100 * sam['acc']:.2f} % (95 % CI of its mean [{100 * sam['sam_low']:.2f}, "
                      f"{100 * sam['sam_high']:.2f}], {sam['seeds']} seeds); ERM "
                      f"{100 * verdict['erm']['acc']:.2f} %.", ""]
        lines += ["| method | seeds | evals / step | final test acc. (%) | − SAM, paired (95 % CI) | share of SAM's "
                  "gain | qualifies |", "|---|---|---|---|---|---|---|"]
        for key, v in sorted(verdict.items(), key=lambda kv: kv[1]["passes"]):
            t = v["vs_sam"]
            paired = "" if not t else f"{points(t['mean_diff'])} {interval(t)}"
            share = "" if v["gain_share"] is None else f"{100 * v['gain_share']:.0f} %"
            why = ("yes" if v["qualifies"] else "no") + (" (collapsed)" if v["degenerate"] else "") + (
                "" if v["cheap"] else f" (> {max_passes:g} evals)")
            lines.append(f"| {_name(key)} | {v['seeds']} | {v['passes']:.3f} | {100 * v['acc']:.2f} | {paired} | "
                         f"{share} | {why} |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m keras_aesam.bench.frontier", description=__doc__.split("\n")[0])
    parser.add_argument("folders", nargs="+", help="noisy-labels profile folders (after their report was written)")
    parser.add_argument("--output", required=True, help="the Markdown file to write")
    parser.add_argument("--max-passes", type=float, default=MAX_PASSES)
    parser.add_argument("--gain-share", type=float, default=GAIN_SHARE)
    args = parser.parse_args(argv)
    if not 1.0 <= args.max_passes <= 2.0:
        parser.error(f"--max-passes must be in [1, 2], got {args.max_passes}")
    if not 0.0 < args.gain_share <= 1.0:
        parser.error(f"--gain-share must be in (0, 1], got {args.gain_share}")
    for folder in args.folders:
        if not (Path(folder) / "summary.csv").is_file():
            parser.error(f"{folder} has no summary.csv: write its report first (--report-only)")
    text = report(load_settings(args.folders), args.max_passes, args.gain_share, sources=args.folders)
    Path(args.output).write_text(text)
    print(f"frontier: {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
