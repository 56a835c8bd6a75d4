"""PNG plots of the curves (matplotlib with the non-interactive Agg backend)."""

from __future__ import annotations

import math
import textwrap
from pathlib import Path
from typing import Sequence

from .runner import RunResult

__all__ = ["COLORS", "plot_curves"]

#: A fixed colour per method, so the same method looks the same on every plot.
COLORS = {
    "SGD-m": "#7f7f7f", "Adam": "#1f77b4", "AdamW": "#17becf", "TNT": "#d62728", "TNT-empirical": "#ff9896",
    "KFAC": "#2ca02c", "Shampoo": "#9467bd", "KBFGS": "#ff7f0e", "KBFGS_L": "#8c564b",
}
_EXTRA = ["#bcbd22", "#e377c2", "#aec7e8", "#98df8a"]


def _color(method: str, seen: dict[str, str]) -> str:
    if method in COLORS:
        return COLORS[method]
    if method not in seen:
        seen[method] = _EXTRA[len(seen) % len(_EXTRA)]
    return seen[method]


def _ylim(results: Sequence[RunResult], key: str) -> tuple[float, float] | None:
    """A range that shows the interesting part: from the lowest value to the highest value
    after the first epoch, or after the initial point of runs shorter than an epoch (the
    initial loss is usually far above everything else)."""
    lows, highs = [], []
    for r in results:
        vals = [v for v in getattr(r, key) if math.isfinite(v)]
        if not vals:
            continue
        lows.append(min(vals))
        later = [v for e, v in zip(r.epoch, getattr(r, key)) if e >= 1 and math.isfinite(v)]
        if not later and len(r.step) > 2:  # a run shorter than an epoch: skip the initial point
            later = [v for v in getattr(r, key)[1:] if math.isfinite(v)]
        highs.append(max(later) if later else max(vals))
    if not lows:
        return None
    return min(lows), max(highs)


def _draw(ax, method: str, runs: Sequence[RunResult], key: str, xkey: str, color: str) -> None:
    """One method's curves: the mean over seeds with a min-max band when every seed has the same
    x values (an epoch budget, nothing diverged), else one line per seed."""
    style = {"color": color, "lw": 1.6, "ls": "--" if method.endswith("empirical") else "-"}
    bad = sorted({r.status for r in runs if r.status != "ok"})
    label = method + (f" ({', '.join(bad)})" if bad else "")
    curves = []
    for r in runs:
        ys = list(getattr(r, key))
        xs = list(getattr(r, xkey))[: len(ys)]
        if xkey == "seconds":  # log time axis: drop the t = 0 point
            keep = [i for i, x in enumerate(xs) if x > 0]
            xs, ys = [xs[i] for i in keep], [ys[i] for i in keep]
        if ys:
            curves.append((xs, ys, r.status))
    if not curves:
        return
    same_x = xkey in ("epoch", "step") and all(c[0] == curves[0][0] for c in curves) and not bad
    if same_x and len(curves) > 1:
        xs = curves[0][0]
        columns = list(zip(*(c[1] for c in curves)))
        ax.plot(xs, [sum(col) / len(col) for col in columns], label=label + f" (mean of {len(curves)})", **style)
        ax.fill_between(xs, [min(col) for col in columns], [max(col) for col in columns], color=color, alpha=0.15,
                        lw=0)
        return
    for i, (xs, ys, status) in enumerate(curves):
        ax.plot(xs, ys, label=label if i == 0 else None, alpha=0.9, **style)
        if status == "diverged":
            ax.plot(xs[-1:], ys[-1:], "x", color=color, ms=9)


def plot_curves(results: Sequence[RunResult], out_dir: Path, *, title: str, classifier: bool,
                target: float | None = None, test_name: str = "test") -> list[Path]:
    """Write ``train_loss_vs_epochs.png``, ``train_loss_vs_seconds.png`` and (for classifiers)
    ``test_accuracy_vs_epochs.png``; with a ``target`` test loss instead ``test_loss_vs_steps.png``,
    ``test_loss_vs_seconds.png`` (the target drawn as a dotted line) and
    ``train_loss_vs_steps.png``. Returns the paths written. Several seeds of a method are drawn as
    their mean with a min-max band when they share their x values, else one line each; a
    diverged run ends in a cross."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    plots = [("train_loss", "epoch", "epochs", "training loss (full training set)"),
             ("train_loss", "seconds", "training seconds, log scale (evaluation excluded)", "training loss (full training set)")]
    if classifier:
        plots.append(("test_accuracy", "epoch", "epochs", "test accuracy"))
    if target is not None:
        ylabel = f"{test_name} loss (nats per character)"
        plots = [("test_loss", "step", "training steps", ylabel),
                 ("test_loss", "seconds", "training seconds, log scale (evaluation excluded)", ylabel),
                 ("train_loss", "step", "training steps", "training loss (fixed training subset)")]
    paths = []
    extra: dict[str, str] = {}
    for key, xkey, xlabel, ylabel in plots:
        fig, ax = plt.subplots(figsize=(7, 4.5), dpi=110)
        by_method: dict[str, list[RunResult]] = {}
        for r in results:
            by_method.setdefault(r.method, []).append(r)
        for method, runs in by_method.items():
            _draw(ax, method, runs, key, xkey, _color(method, extra))
        if key == "test_loss" and target is not None:
            ax.axhline(target, color="k", ls=":", lw=1, label=f"target {target:g}")
        if key in ("train_loss", "test_loss"):
            lim = _ylim(results, key)
            if lim is not None and lim[0] > 0 and lim[1] / lim[0] > 4:
                ax.set_yscale("log")  # plateaus and final losses an order of magnitude apart
                ylabel += ", log scale"
            elif lim is not None:
                lo, hi = lim
                pad = 0.05 * (hi - lo) if hi > lo else max(abs(lo) * 0.05, 1e-3)
                ax.set_ylim(lo - pad, hi + pad)
        if xkey == "seconds":
            ax.set_xscale("log")
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.set_title("\n".join(textwrap.wrap(title, 90)), fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        name = f"{key}_vs_{ {'epoch': 'epochs', 'step': 'steps'}.get(xkey, 'seconds') }.png"
        fig.savefig(out_dir / name)
        plt.close(fig)
        paths.append(out_dir / name)
    return paths
