"""The bench's plots: the figure set-up and finish of every report's plots, and the standard profile's two
(accuracy against the share of SAM steps, and time per epoch)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from keras_aesam.bench.plan import (
    ALL_METHODS,
    PEER_METHOD,
    PEER_METHODS,
    PEER_TRAIN_MODE,
    _pretty,
)


def pyplot():
    """``matplotlib.pyplot`` drawing into files (the Agg backend), or None without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def label_axes(ax, labels, legend_size=8):
    """A panel's axis labels and title (``labels``: x, y, title), a light grid and the legend."""
    xlabel, ylabel, title = labels
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=legend_size, loc="best")


def save(fig, path):
    """Lay ``fig`` out, save it as ``path`` (110 dpi) and close it; returns ``path``."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_plots(rows, summaries, out) -> list[Path]:
    """``accuracy_vs_sam.png`` and ``time_per_epoch.png`` in ``out``; none without matplotlib or results."""
    plt = pyplot()
    if plt is None:
        return []
    settings = []
    for s in summaries:
        if s["setting"] not in settings:
            settings.append(s["setting"])
    if not settings:
        return []
    return [_accuracy_plot(plt, summaries, settings, out), _time_plot(plt, summaries, settings, out)]


def _accuracy_plot(plt, summaries, settings, out):
    """Test accuracy against the share of SAM steps, one panel per setting."""
    colors = {m: plt.cm.tab10(i) for i, m in enumerate(list(ALL_METHODS) + list(PEER_METHODS))}
    fig, axes = plt.subplots(1, len(settings), figsize=(5.2 * len(settings), 4.4), squeeze=False)
    for ax, setting in zip(axes[0], settings):
        for s in (s for s in summaries if s["setting"] == setting):
            marker = "*" if s["method"] in PEER_METHODS else "o"
            ax.errorbar(100 * (s["sam_mean"] or 0), 100 * s["acc_mean"],
                        xerr=None if s["sam_std"] is None else 100 * s["sam_std"],
                        yerr=None if s["acc_std"] is None else 100 * s["acc_std"],
                        fmt=marker, ms=9 if marker == "*" else 6, capsize=3, color=colors.get(s["method"]),
                        label=f"{_pretty(s['method'])} (n={s['n']})")
        ax.set_xlim(-5, 105)
        label_axes(ax, ("SAM steps (%)", "test accuracy (%)", setting), legend_size=7)
    fig.suptitle("Test accuracy vs. share of SAM steps (mean ± std over seeds)")
    return save(fig, Path(out) / "accuracy_vs_sam.png")


def _time_plot(plt, summaries, settings, out):
    """Seconds per epoch, and the wall and CPU step-time ratios to ERM against the ideal 1 + ζ."""
    methods = []
    for s in summaries:
        if s["method"] not in methods:
            methods.append(s["method"])
    fig, (ax1, ax2, ax3) = plt.subplots(1, 3, figsize=(17, 4.6))
    width = 0.8 / len(settings)

    def values(items, key):
        return [np.nan if items.get(m, {}).get(key) is None else items[m][key] for m in methods]

    for i, setting in enumerate(settings):
        by_method = {s["method"]: s for s in summaries if s["setting"] == setting}
        xs = np.arange(len(methods)) + (i - (len(settings) - 1) / 2) * width
        for ax, key in ((ax1, "epoch_s"), (ax2, "ratio"), (ax3, "cpu_ratio")):
            err = [0.0 if np.isnan(v) else v for v in values(by_method, f"{key}_std")]
            ax.bar(xs, values(by_method, f"{key}_mean"), width, yerr=err, capsize=2, label=setting)
        for ax in (ax2, ax3):
            ax.scatter(xs, values(by_method, "ideal_mean"), marker="_", s=200, color="black",
                       zorder=3, label="ideal (1+ζ)" if i == 0 else None)
    for ax in (ax1, ax2, ax3):
        ax.set_xticks(np.arange(len(methods)))
        short = {PEER_METHOD: "Keras 2 SAM\n(peer)", PEER_TRAIN_MODE: "Keras 2 SAM\ntrain-mode 1st pass"}
        ax.set_xticklabels([short.get(m, _pretty(m)) for m in methods], fontsize=8,
                           rotation=30, ha="right")
        ax.grid(axis="y", alpha=0.3)
        ax.legend(fontsize=8)
    ax1.set_ylabel("seconds per epoch (after the first)")
    ax1.set_title("Wall time per epoch (mean ± std over seeds)")
    ax2.set_ylabel("step time / ERM step time (same seed)")
    ax2.set_title("Wall-time ratio to ERM vs. the ideal 1 + ζ")
    ax3.set_ylabel("CPU time per step / ERM's (same seed)")
    ax3.set_title("CPU-time ratio to ERM vs. the ideal 1 + ζ")
    return save(fig, Path(out) / "time_per_epoch.png")
