"""PNG plots of the curves (matplotlib with the non-interactive Agg backend)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence

from .runner import RunResult

__all__ = ["COLORS", "plot_curves"]

#: A fixed colour per method, so the same method looks the same on every plot.
COLORS = {
    "SGD-m": "#7f7f7f", "Adam": "#1f77b4", "TNT": "#d62728", "TNT-empirical": "#ff9896",
    "KFAC": "#2ca02c", "Shampoo": "#9467bd", "KBFGS": "#ff7f0e", "KBFGS_L": "#8c564b",
}
_EXTRA = ["#17becf", "#bcbd22", "#e377c2", "#aec7e8", "#98df8a"]


def _color(method: str, seen: dict[str, str]) -> str:
    if method in COLORS:
        return COLORS[method]
    if method not in seen:
        seen[method] = _EXTRA[len(seen) % len(_EXTRA)]
    return seen[method]


def _ylim(results: Sequence[RunResult], key: str) -> tuple[float, float] | None:
    """A range that shows the interesting part: from the lowest value to the highest value
    after the first epoch (the initial loss is usually far above everything else)."""
    lows, highs = [], []
    for r in results:
        vals = [v for v in getattr(r, key) if math.isfinite(v)]
        if not vals:
            continue
        lows.append(min(vals))
        later = [v for e, v in zip(r.epoch, getattr(r, key)) if e >= 1 and math.isfinite(v)]
        highs.append(max(later) if later else max(vals))
    if not lows:
        return None
    lo, hi = min(lows), max(highs)
    pad = 0.05 * (hi - lo) if hi > lo else max(abs(lo) * 0.05, 1e-3)
    return lo - pad, hi + pad


def plot_curves(results: Sequence[RunResult], out_dir: Path, *, title: str, classifier: bool) -> list[Path]:
    """Write ``train_loss_vs_epochs.png``, ``train_loss_vs_seconds.png`` and (for classifiers)
    ``test_accuracy_vs_epochs.png``; returns the paths written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    plots = [("train_loss", "epoch", "epochs", "training loss (full training set)"),
             ("train_loss", "seconds", "training seconds (evaluation excluded)", "training loss (full training set)")]
    if classifier:
        plots.append(("test_accuracy", "epoch", "epochs", "test accuracy"))
    paths = []
    extra: dict[str, str] = {}
    for key, xkey, xlabel, ylabel in plots:
        fig, ax = plt.subplots(figsize=(7, 4.5), dpi=110)
        labelled: set[str] = set()
        for r in results:
            ys = getattr(r, key)
            xs = getattr(r, xkey)[: len(ys)]
            if not ys:
                continue
            label = None
            if r.method not in labelled:
                label = r.method + ("" if r.status == "ok" else f" ({r.status})")
                labelled.add(r.method)
            ax.plot(xs, ys, color=_color(r.method, extra), label=label, lw=1.6, alpha=0.9,
                    ls="--" if r.method.endswith("empirical") else "-")
            if r.status == "diverged":
                ax.plot(xs[-1:], ys[-1:], "x", color=_color(r.method, extra), ms=9)
        if key == "train_loss":
            lim = _ylim(results, key)
            if lim is not None:
                ax.set_ylim(*lim)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.set_title(title, fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        name = f"{key}_vs_{'epochs' if xkey == 'epoch' else 'seconds'}.png"
        fig.savefig(out_dir / name)
        plt.close(fig)
        paths.append(out_dir / name)
    return paths
