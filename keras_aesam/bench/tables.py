"""The bench reports' Markdown and CSV: numbers as the reports print them, tables, the CSV files.

Both profiles' reports (:mod:`keras_aesam.bench.report` and
:mod:`keras_aesam.bench.noisy_labels_report`) write through these, so a number,
a paired test or a chance-level run reads the same in every report.
"""

from __future__ import annotations

import csv

#: What a report prints for a number it does not have.
MISSING = "–"


def number(value, digits=2, scale=1.0):
    """``value × scale`` with ``digits`` decimals, or :data:`MISSING`."""
    return MISSING if value is None else f"{value * scale:.{digits}f}"


def plus_minus(mean, std, digits=2, scale=1.0):
    """``mean ± std`` (the mean alone without a std)."""
    if mean is None or std is None:
        return number(mean, digits, scale)
    return f"{mean * scale:.{digits}f} ± {std * scale:.{digits}f}"


def points(value):
    """A difference of accuracies in signed percentage points, ``+1.23``."""
    return MISSING if value is None else f"{100 * value:+.2f}"


def interval(test):
    """A paired test's confidence interval in percentage points, ``[-0.12, +1.34]``."""
    if test["ci_low"] is None:
        return MISSING
    return f"[{points(test['ci_low'])}, {points(test['ci_high'])}]"


def p_value(p, floor=False):
    """A p-value with three decimals; below 0.001 in scientific notation, or as ``< 0.001`` with ``floor``."""
    if p is None:
        return MISSING
    if p < 1e-3:
        return "< 0.001" if floor else f"{p:.1e}"
    return f"{p:.3f}"


def markdown_table(headings, rows):
    """A Markdown table's lines: the headings, their rule, one line per row of cells."""
    return ["| " + " | ".join(headings) + " |", "|" + "---|" * len(headings),
            *("| " + " | ".join(str(cell) for cell in row) + " |" for row in rows)]


def column_table(items, columns):
    """A Markdown table of ``items``, one row each; ``columns``: ``(heading, cell(item))`` pairs."""
    return markdown_table([heading for heading, _ in columns], [[cell(item) for _, cell in columns] for item in items])


def degenerate_warning(run_ids):
    """The lines that name the runs which ended at chance level or with a non-finite loss (none: no lines)."""
    if not run_ids:
        return []
    return [f"> ⚠ **{len(run_ids)} run(s) ended at chance-level accuracy or with a non-finite loss:** "
            + ", ".join(run_ids) + ". Their numbers are included in the tables but are not ordinary results."]


def write_csv(path, rows, columns):
    """``rows`` (dicts) as a CSV file with the header ``columns``: floats to 6 significant digits, None empty."""
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(columns)
        for row in rows:
            writer.writerow([_cell(row.get(column)) for column in columns])


def _cell(value):
    if value is None:
        return ""
    return f"{value:.6g}" if isinstance(value, float) else value
