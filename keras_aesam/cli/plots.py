"""PNG plots of a training run (matplotlib, Agg backend).

Four pictures, each from the CSV files ``keras-aesam train`` writes into a run
directory (``history.csv`` from ``keras.callbacks.CSVLogger``, ``steps.csv``
and ``grad_norms.csv`` from :class:`keras_aesam.callbacks.StepRecorder`):

* ``grad_norm_steps.png``: the per-step ``‖g‖²`` with its EMA mean ``µ`` and the
  threshold ``µ + c_t·σ`` (adaptive methods log them), SAM steps marked, and
  the per-step loss below;
* ``sam_fraction.png``: the share of SAM steps in each epoch, with the run's
  overall %SAM and the policy's expected fraction;
* ``accuracy.png``: train / validation accuracy and loss per epoch;
* ``grad_norm_distribution.png``: histogram and normal Q-Q plot of ``‖g‖²`` at
  chosen epochs, as in the paper's Fig. 3 (from ``grad_norms.csv``, the
  fixed-weight samples, else from the per-step values of those epochs).

``plot_run(run_dir)`` draws all of them; ``keras-aesam plot RUN_DIR`` calls it.
Every PNG written here is listed in its folder's manifest and an existing PNG
is replaced only if it is listed there (:mod:`keras_aesam.cli.safety`): drawing
again never overwrites a picture keras-aesam did not make.
The figures are drawn on a private Agg canvas: importing this module does not
change pyplot's backend. The Q-Q plot uses ``scipy.stats.probplot`` when scipy
is installed, else the same order-statistic medians (Filliben's estimate)
through ``statistics.NormalDist``.
"""

from __future__ import annotations

import csv
import json
import math
import os
from statistics import NormalDist
from typing import Dict, Iterable, List, Optional

import numpy as np

__all__ = [
    "PLOT_FILES",
    "new_figure",
    "normal_qq",
    "plot_accuracy",
    "plot_grad_norm_distribution",
    "plot_grad_norm_steps",
    "plot_heatmap",
    "plot_run",
    "plot_sam_fraction",
    "read_csv",
    "save_figure",
]

#: The files :func:`plot_run` can write, by plot.
PLOT_FILES = {
    "steps": "grad_norm_steps.png",
    "sam_fraction": "sam_fraction.png",
    "accuracy": "accuracy.png",
    "distribution": "grad_norm_distribution.png",
}

_SAM_COLOR = "#d62728"
_MEAN_COLOR = "#1f77b4"
_THRESHOLD_COLOR = "#ff7f0e"


# ---------------------------------------------------------------------- helpers


def _figure(width, height):
    """A Figure on its own Agg canvas (no pyplot, no global backend switch)."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError(
            "keras_aesam.cli.plots needs matplotlib: pip install matplotlib "
            "(or the package's 'plots' extra)."
        ) from err
    fig = Figure(figsize=(width, height), dpi=110)
    FigureCanvasAgg(fig)
    return fig


def _save(fig, path):
    """Writes the PNG; an existing file is replaced only if keras-aesam wrote it (keras_aesam.cli.safety)."""
    from keras_aesam.cli import safety

    path = os.fspath(path)
    directory = os.path.dirname(path)
    if directory:
        os.makedirs(directory, exist_ok=True)
    safety.claim(path)
    fig.tight_layout()
    fig.savefig(path, format="png")
    return path


def new_figure(width, height):
    """A matplotlib Figure on its own Agg canvas, for plots of your own."""
    return _figure(width, height)


def save_figure(fig, path):
    """Lays out ``fig`` and writes it as a PNG (creating folders); returns the path.

    Raises keras_aesam.cli.safety.NotOurs rather than overwrite a file keras-aesam did not write.
    """
    return _save(fig, path)


def read_csv(path) -> Dict[str, np.ndarray]:
    """A CSV file as ``{column: array}``; numeric columns become float arrays
    (empty cells NaN), others stay string arrays."""
    with open(path, newline="") as f:
        reader = csv.reader(f)
        try:
            header = next(reader)
        except StopIteration:
            return {}
        rows = [row for row in reader if row]
    columns = {}
    for i, name in enumerate(header):
        raw = [row[i] if i < len(row) else "" for row in rows]
        try:
            columns[name] = np.array([float(v) if v.strip() != "" else np.nan for v in raw], dtype=float)
        except ValueError:
            columns[name] = np.array(raw, dtype=object)
    return columns


def _has(table, column) -> bool:
    values = table.get(column)
    return values is not None and values.dtype != object and np.isfinite(values).any()


def _epochs_axis(history):
    """1-based epoch numbers (CSVLogger writes Keras's 0-based ``epoch``)."""
    if _has(history, "epoch"):
        return history["epoch"] + 1
    n = len(next(iter(history.values()))) if history else 0
    return np.arange(1, n + 1, dtype=float)


def normal_qq(samples):
    """Normal Q-Q data: ``(theoretical_quantiles, ordered_samples, slope, intercept, r)``.

    Same numbers as ``scipy.stats.probplot(samples, dist="norm")`` (Filliben's
    order-statistic medians); uses scipy when installed. ``r`` is the
    correlation of the Q-Q points: 1 for a perfect normal sample.
    """
    x = np.sort(np.asarray(samples, dtype=float).ravel())
    x = x[np.isfinite(x)]
    n = x.size
    if n < 2:
        raise ValueError(f"a Q-Q plot needs at least 2 finite samples, got {n}")
    try:
        from scipy import stats
    except ImportError:
        stats = None
    if stats is not None:
        (osm, osr), (slope, intercept, r) = stats.probplot(x, dist="norm")
        return np.asarray(osm), np.asarray(osr), float(slope), float(intercept), float(r)
    medians = np.empty(n)
    medians[-1] = 0.5 ** (1.0 / n)
    medians[0] = 1.0 - medians[-1]
    i = np.arange(2, n)
    medians[1:-1] = (i - 0.3175) / (n + 0.365)
    normal = NormalDist()
    osm = np.array([normal.inv_cdf(p) for p in medians])
    slope, intercept = np.polyfit(osm, x, 1)
    r = float(np.corrcoef(osm, x)[0, 1]) if np.std(x) > 0 else 1.0
    return osm, x, float(slope), float(intercept), r


def _integer_ticks(ax):
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))


def _epoch_lines(axes, steps):
    """Faint vertical lines where epochs start (up to 60 epochs)."""
    if not _has(steps, "epoch"):
        return
    epoch = steps["epoch"]
    starts = steps["step"][1:][np.diff(epoch) != 0]
    if 0 < starts.size <= 60:
        for ax in axes:
            for x in starts:
                ax.axvline(x, color="0.85", lw=0.8, zorder=0)


def _title(config):
    if not config:
        return None
    parts = [config.get(k) for k in ("method", "model", "dataset")]
    parts = [str(p) for p in parts if p]
    noise = config.get("noise")
    if noise:
        parts.append(f"noise {noise:g}")
    return " · ".join(parts) or None


# ------------------------------------------------------------------------ plots


def plot_grad_norm_steps(steps, path, title=None):
    """Per-step ``‖g‖²``, ``µ``, ``µ + c_t·σ`` with SAM steps marked, and the loss.

    ``steps`` is a ``{column: array}`` table as :func:`read_csv` returns for
    ``steps.csv``. Methods without the adaptive policy log no ``‖g‖²``: then
    only the loss panel is drawn (SAM steps still marked).
    """
    if not steps or "step" not in steps or len(steps["step"]) == 0:
        raise ValueError("steps.csv has no rows to plot")
    x = steps["step"]
    sam = steps["sam"] > 0 if _has(steps, "sam") else np.zeros(len(x), dtype=bool)
    with_stats = _has(steps, "grad_norm_sq")
    with_sharpness = _has(steps, "sharpness") and bool(np.isfinite(steps["sharpness"]).any())
    dot = 8 if sam.sum() < 200 else 4
    panels = 1 + int(with_stats) + int(with_sharpness)
    fig = _figure(10, 3.4 * panels + 0.4)
    axes = [fig.add_subplot(panels, 1, i + 1) for i in range(panels)]
    if with_sharpness:
        _sharpness_panel(axes[-2], x, steps["sharpness"], dot)
    if with_stats:
        ax = axes[0]
        g = steps["grad_norm_sq"]
        ax.plot(x, g, color="0.55", lw=0.6, label="‖g‖²")
        if _has(steps, "ema_mean"):
            ax.plot(x, steps["ema_mean"], color=_MEAN_COLOR, lw=1.2, label="µ (EMA of ‖g‖²)")
        if _has(steps, "sam_threshold"):
            ax.plot(x, steps["sam_threshold"], color=_THRESHOLD_COLOR, lw=1.2, label="threshold µ + c_t·σ")
        if sam.any():
            ax.scatter(x[sam], g[sam], s=dot, color=_SAM_COLOR, zorder=3, label=f"SAM step ({int(sam.sum())})")
        positive = g[np.isfinite(g) & (g > 0)]
        if positive.size and positive.max() / max(positive.min(), 1e-30) > 50:
            ax.set_yscale("log", nonpositive="mask")
        ax.set_ylabel("squared gradient norm")
        ax.legend(loc="upper right", fontsize=8, markerscale=2)
        ax.grid(alpha=0.3)
    ax = axes[-1]
    if _has(steps, "loss"):
        loss = steps["loss"]
        ax.plot(x, loss, color="0.35", lw=0.6, label="loss")
        if sam.any():
            ax.scatter(x[sam], loss[sam], s=dot, color=_SAM_COLOR, zorder=3, label="SAM step")
        ax.set_ylabel("training loss (per step)")
        ax.legend(loc="upper right", fontsize=8, markerscale=2)
    several_epochs = _has(steps, "epoch") and len(set(steps["epoch"])) > 1
    ax.set_xlabel("step (faint lines: epoch starts)" if several_epochs else "step")
    ax.grid(alpha=0.3)
    _epoch_lines(axes, steps)
    share = 100.0 * steps["sam"][np.isfinite(steps["sam"])].sum() / max(
        np.nansum(steps["steps"]) if _has(steps, "steps") else len(x), 1
    ) if _has(steps, "sam") else None
    heading = "Per-step squared gradient norm and SAM steps" if with_stats else "Per-step loss and SAM steps"
    if share is not None:
        heading += f" ({share:.1f} % SAM)"
    if title:
        heading = f"{title}\n{heading}"
    axes[0].set_title(heading, fontsize=10)
    return _save(fig, path)


def _sharpness_panel(ax, x, sharpness, dot):
    """``L(w + e) − L(w)`` at each SAM step: the sharpness the second pass measured."""
    known = np.isfinite(sharpness)
    ax.scatter(x[known], sharpness[known], s=dot, color=_SAM_COLOR, label="L(w + e) − L(w) on SAM steps")
    ax.set_ylabel("sharpness")
    ax.legend(loc="upper right", fontsize=8, markerscale=2)
    ax.grid(alpha=0.3)


def plot_sam_fraction(history, path, title=None, overall=None, expected=None):
    """The share of SAM steps per epoch (``sam_fraction`` at each epoch's end).

    ``overall`` (a fraction) draws the run's %SAM, ``expected`` the policy's aim
    (e.g. 0.5 for AE-SAM's default lambdas, or a ``target_sam_fraction``).
    """
    if not _has(history, "sam_fraction"):
        raise ValueError("history has no sam_fraction column")
    epochs = _epochs_axis(history)
    values = 100.0 * history["sam_fraction"]
    fig = _figure(8, 3.6)
    ax = fig.add_subplot(1, 1, 1)
    ax.bar(epochs, values, width=0.8, color=_SAM_COLOR, alpha=0.75, label="SAM steps in the epoch")
    if overall is None:
        overall = float(np.nanmean(history["sam_fraction"]))
    ax.axhline(100.0 * overall, color="k", ls="--", lw=1, label=f"whole run: {100.0 * overall:.1f} %")
    if expected is not None:
        ax.axhline(100.0 * expected, color=_MEAN_COLOR, ls=":", lw=1.5, label=f"expected: {100.0 * expected:.1f} %")
    ax.set_ylim(0, 105)
    _integer_ticks(ax)
    ax.set_xlabel("epoch")
    ax.set_ylabel("% SAM steps")
    ax.legend(loc="best", fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    heading = "Fraction of SAM steps per epoch"
    ax.set_title(f"{title}\n{heading}" if title else heading, fontsize=10)
    return _save(fig, path)


def plot_accuracy(history, path, title=None, test_accuracy=None):
    """Train / validation accuracy (and loss) per epoch."""
    epochs = _epochs_axis(history)
    acc_keys = [k for k in ("accuracy", "val_accuracy") if _has(history, k)]
    loss_keys = [k for k in ("loss", "val_loss") if _has(history, k)]
    if not acc_keys and not loss_keys:
        raise ValueError("history has neither accuracy nor loss columns")
    fig = _figure(10, 3.6)
    labels = {"accuracy": "train", "val_accuracy": "validation", "loss": "train", "val_loss": "validation"}
    for i, (keys, name) in enumerate(((acc_keys, "accuracy"), (loss_keys, "loss"))):
        ax = fig.add_subplot(1, 2, i + 1)
        for key in keys:
            style = "-o" if not key.startswith("val_") else "-s"
            ax.plot(epochs, history[key], style, ms=3, label=labels[key])
        if name == "accuracy" and test_accuracy is not None:
            ax.axhline(test_accuracy, color="k", ls="--", lw=1, label=f"test: {test_accuracy:.4f}")
        _integer_ticks(ax)
        ax.set_xlabel("epoch")
        ax.set_ylabel(name)
        ax.grid(alpha=0.3)
        if keys:
            ax.legend(loc="best", fontsize=8)
        ax.set_title(("Accuracy" if name == "accuracy" else "Loss") + " per epoch", fontsize=10)
    if title:
        fig.suptitle(title, fontsize=10)
    return _save(fig, path)


def plot_grad_norm_distribution(samples_by_epoch, path, title=None, source=None):
    """Histogram and normal Q-Q plot of ``‖g‖²`` per epoch (the paper's Fig. 3).

    ``samples_by_epoch`` maps an epoch label (int or str) to the samples. One
    row per epoch: the histogram with the fitted normal density, and the Q-Q
    plot (standardized sample quantiles against normal quantiles, with the
    correlation ``r`` of the points: the closer to 1, the more normal).
    """
    items = [(k, np.asarray(v, dtype=float)) for k, v in samples_by_epoch.items()]
    items = [(k, v[np.isfinite(v)]) for k, v in items]
    items = [(k, v) for k, v in items if v.size >= 2]
    if not items:
        raise ValueError("need at least 2 finite ‖g‖² samples for some epoch")
    rows = len(items)
    fig = _figure(10, 2.7 * rows + 0.6)
    colors = ["#1f77b4", "#2ca02c", "#9467bd", "#8c564b", "#e377c2", "#17becf"]
    for row, (epoch, values) in enumerate(items):
        color = colors[row % len(colors)]
        label = f"epoch {epoch}" if not isinstance(epoch, str) else epoch
        ax = fig.add_subplot(rows, 2, 2 * row + 1)
        bins = max(5, min(40, int(math.sqrt(values.size)) + 1))
        ax.hist(values, bins=bins, density=True, color=color, alpha=0.6, edgecolor="white")
        mu, sd = float(values.mean()), float(values.std())
        if sd > 0:
            grid = np.linspace(values.min(), values.max(), 200)
            pdf = np.exp(-0.5 * ((grid - mu) / sd) ** 2) / (sd * math.sqrt(2 * math.pi))
            ax.plot(grid, pdf, "k--", lw=1, label=f"N({mu:.3g}, {sd:.3g}²)")
            ax.legend(loc="upper right", fontsize=7)
        ax.set_ylabel(f"{label}\ndensity", fontsize=9)
        ax.set_xlabel("‖g‖²", fontsize=9)
        ax.grid(alpha=0.3)
        ax = fig.add_subplot(rows, 2, 2 * row + 2)
        osm, osr, slope, intercept, r = normal_qq(values)
        standardized = (osr - mu) / sd if sd > 0 else osr - mu
        ax.plot(osm, standardized, "o", ms=3, color=color, label=f"{label} (n={values.size}, r={r:.3f})")
        lim = np.array([osm.min(), osm.max()])
        ax.plot(lim, lim, "k-", lw=1)
        ax.set_xlabel("theoretical normal quantiles", fontsize=9)
        ax.set_ylabel("standardized ‖g‖² quantiles", fontsize=9)
        ax.legend(loc="upper left", fontsize=7)
        ax.grid(alpha=0.3)
        if row == 0:
            fig.axes[0].set_title("(a) distribution of ‖g‖²", fontsize=10)
            ax.set_title("(b) normal Q-Q plot", fontsize=10)
    heading = "Stochastic gradient norms ‖∇L(B; w)‖²"
    if source:
        heading += f" ({source})"
    fig.suptitle(f"{title}\n{heading}" if title else heading, fontsize=10)
    return _save(fig, path)


def plot_heatmap(values, row_values, col_values, path, title=None, row_label="λ1",
                 col_label="λ2", colorbar_label=None, fmt="{:.1f}", cmap="viridis"):
    """A heat map of ``values[i, j]`` (rows ``row_values``, columns ``col_values``);
    NaN cells stay blank. Used for the λ1/λ2 sweep (the paper's Fig. 5–6)."""
    values = np.asarray(values, dtype=float)
    fig = _figure(max(5.5, 1.1 * len(col_values) + 2.4), max(3.5, 0.9 * len(row_values) + 1.8))
    ax = fig.add_subplot(1, 1, 1)
    masked = np.ma.masked_invalid(values)
    image = ax.imshow(masked, cmap=cmap, origin="lower", aspect="auto")
    ax.set_xticks(range(len(col_values)), [f"{v:g}" for v in col_values])
    ax.set_yticks(range(len(row_values)), [f"{v:g}" for v in row_values])
    ax.set_xlabel(col_label)
    ax.set_ylabel(row_label)
    finite = values[np.isfinite(values)]
    middle = (finite.min() + finite.max()) / 2 if finite.size else 0.0
    for i in range(values.shape[0]):
        for j in range(values.shape[1]):
            if np.isfinite(values[i, j]):
                ax.text(j, i, fmt.format(values[i, j]), ha="center", va="center", fontsize=8,
                        color="white" if values[i, j] < middle else "black")
    bar = fig.colorbar(image, ax=ax)
    if colorbar_label:
        bar.set_label(colorbar_label)
    if title:
        ax.set_title(title, fontsize=10)
    return _save(fig, path)


# ------------------------------------------------------------------------ a run


def _grad_norm_samples(run_dir, steps, epochs=None, max_epochs=4):
    """Fig. 3 samples: ``grad_norms.csv`` if present, else per-step values by epoch."""
    path = os.path.join(run_dir, "grad_norms.csv")
    if os.path.isfile(path):
        table = read_csv(path)
        if _has(table, "grad_norm_sq") and _has(table, "epoch"):
            found = sorted({int(e) for e in table["epoch"]})
            chosen = [e for e in found if epochs is None or e in set(epochs)]
            samples = {
                ("at initialization" if e == 0 else f"after epoch {e}"): table["grad_norm_sq"][table["epoch"] == e]
                for e in chosen
            }
            samples = {e: v for e, v in samples.items() if np.isfinite(v).sum() >= 2}
            if samples:
                return samples, "fixed weights, random mini-batches B"
    if steps is None or not _has(steps, "grad_norm_sq"):
        return {}, None
    epoch_ids = steps["epoch"].astype(int)
    available = sorted(set(epoch_ids.tolist()))
    if epochs is not None:
        chosen = [e - 1 for e in epochs if e - 1 in set(available)]  # 1-based in, 0-based stored
    elif len(available) <= max_epochs:
        chosen = available
    else:
        picks = np.linspace(0, len(available) - 1, max_epochs).round().astype(int)
        chosen = sorted({available[i] for i in picks})
    samples = {f"during epoch {e + 1}": steps["grad_norm_sq"][epoch_ids == e] for e in chosen}
    samples = {e: v for e, v in samples.items() if np.isfinite(v).sum() >= 2}
    return samples, "per-step values along the trajectory"


def _load_config(run_dir):
    path = os.path.join(run_dir, "config.json")
    if not os.path.isfile(path):
        return {}
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return {}


def plot_run(run_dir, epochs: Optional[Iterable[int]] = None, output_dir=None) -> List[str]:
    """Draws every plot the files in ``run_dir`` allow; returns the PNG paths.

    Reads ``history.csv``, ``steps.csv``, ``grad_norms.csv`` and ``config.json``
    (each optional, but at least one of the CSV files must exist). ``epochs``
    picks the epochs of the distribution plot: numbers of completed epochs as
    sampled in ``grad_norms.csv`` (0 = before training), or, without that file,
    1-based epochs whose per-step ``‖g‖²`` are pooled (default: everything
    sampled, else up to four epochs spread over the run). PNGs go to
    ``output_dir`` (default ``run_dir``).
    """
    run_dir = os.fspath(run_dir)
    if not os.path.isdir(run_dir):
        raise FileNotFoundError(f"run directory {run_dir!r} does not exist")
    output_dir = run_dir if output_dir is None else os.fspath(output_dir)
    history_path = os.path.join(run_dir, "history.csv")
    steps_path = os.path.join(run_dir, "steps.csv")
    grad_path = os.path.join(run_dir, "grad_norms.csv")
    if not any(os.path.isfile(p) for p in (history_path, steps_path, grad_path)):
        raise FileNotFoundError(
            f"nothing to plot in {run_dir!r}: expected history.csv, steps.csv or grad_norms.csv"
        )
    config = _load_config(run_dir)
    title = _title(config)
    results = config.get("results") or {}
    history = read_csv(history_path) if os.path.isfile(history_path) else {}
    steps = read_csv(steps_path) if os.path.isfile(steps_path) else None
    if steps is not None and (not steps or len(steps.get("step", ())) == 0):
        steps = None
    written = []
    if steps is not None:
        written.append(plot_grad_norm_steps(steps, os.path.join(output_dir, PLOT_FILES["steps"]), title))
    if _has(history, "sam_fraction"):
        overall = results.get("sam_fraction")
        if overall is None and steps is not None and _has(steps, "sam"):
            overall = float(np.nansum(steps["sam"]) / max(np.nansum(steps["steps"]), 1))
        written.append(
            plot_sam_fraction(
                history,
                os.path.join(output_dir, PLOT_FILES["sam_fraction"]),
                title,
                overall=overall,
                expected=config.get("expected_sam_fraction"),
            )
        )
    if any(_has(history, k) for k in ("accuracy", "val_accuracy", "loss", "val_loss")):
        written.append(
            plot_accuracy(
                history,
                os.path.join(output_dir, PLOT_FILES["accuracy"]),
                title,
                test_accuracy=results.get("test_accuracy"),
            )
        )
    samples, source = _grad_norm_samples(run_dir, steps, None if epochs is None else list(epochs))
    if samples:
        written.append(
            plot_grad_norm_distribution(
                samples, os.path.join(output_dir, PLOT_FILES["distribution"]), title, source=source
            )
        )
    return written
