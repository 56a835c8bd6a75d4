"""The results table (text and reStructuredText) and the JSON file of every curve and setting."""

from __future__ import annotations

import json
import math
import platform
import statistics
from pathlib import Path
from typing import Any, Sequence

import torch

from .runner import RunResult

__all__ = ["environment", "format_table", "load_runs", "summarize", "write_json"]


def _stats(values: Sequence[float]) -> tuple[float, float]:
    vals = [v for v in values if v is not None and math.isfinite(v)]
    if not vals:
        return float("nan"), float("nan")
    return statistics.fmean(vals), (statistics.stdev(vals) if len(vals) > 1 else 0.0)


def summarize(results: Sequence[RunResult], *, classifier: bool, target: float | None = None) -> list[dict[str, Any]]:
    """One row per method (in the order first seen), numbers averaged over its seeds.

    The time ratio to SGD-m is paired by seed: the mean (and standard deviation) over seeds of
    the method's seconds per epoch over SGD-m's in the same seed -- the runs a side-by-side
    main job trained together -- or, where no seed has both, the ratio of the two means.
    Diverged and failed runs are counted in ``status`` and left out of the averages;
    interrupted runs count with what they completed. With a ``target`` test loss, each row also
    holds the steps and training seconds to reach it (mean and standard deviation over the runs
    that reached it, and their min and max) and how many runs reached it.
    """
    by_method: dict[str, list[RunResult]] = {}
    for r in results:
        by_method.setdefault(r.method, []).append(r)
    sgd = [r for r in by_method.get("SGD-m", []) if r.status in ("ok", "interrupted")]
    sgd_spe = _stats([r.seconds_per_epoch for r in sgd])[0]
    sgd_by_seed = {r.seed: r.seconds_per_epoch for r in sgd if math.isfinite(r.seconds_per_epoch) and r.seconds_per_epoch > 0}
    rows = []
    for method, runs in by_method.items():
        usable = [r for r in runs if r.status in ("ok", "interrupted")]
        counts = {s: sum(r.status == s for r in runs) for s in ("ok", "diverged", "interrupted", "error")}
        status = ", ".join(
            (s if len(runs) == 1 else f"{s} {c}/{len(runs)}") for s, c in counts.items() if c
        )
        spe = _stats([r.seconds_per_epoch for r in usable])
        per_seed = [r.seconds_per_epoch / sgd_by_seed[r.seed] for r in usable
                    if r.seed in sgd_by_seed and math.isfinite(r.seconds_per_epoch)]
        if per_seed:
            ratio = _stats(per_seed)
        else:
            ratio = ((spe[0] / sgd_spe) if math.isfinite(sgd_spe) and sgd_spe > 0 else float("nan"), float("nan"))
        row = {
            "method": method,
            "runs": len(runs),
            "status": status,
            "epochs": _stats([r.epochs_done for r in usable]),
            "final_train_loss": _stats([r.final_train_loss for r in usable]),
            "best_train_loss": _stats([r.best_train_loss for r in usable]),
            "final_test_loss": _stats([r.test_loss[-1] if r.test_loss else float("nan") for r in usable]),
            "seconds_per_epoch": spe,
            "time_ratio_to_sgd": ratio[0],
            "time_ratio_to_sgd_std": ratio[1],
            "time_ratio_to_sgd_per_seed": per_seed,
            "ms_per_step": _stats([1000 * r.train_seconds / r.steps for r in usable if r.steps]),
            "state_mib": _stats([r.state_mib for r in usable]),
            "peak_mib": _stats([r.peak_mib for r in runs]),
            "messages": sorted({r.message for r in runs if r.message}),
        }
        if target is not None:
            hits = [h for h in (r.reached(target) for r in runs if r.status != "error") if h is not None]
            row["target"] = target
            row["target_reached"] = f"{len(hits)}/{len(runs)}"
            row["steps_to_target"] = _stats([float(h[0]) for h in hits])
            row["seconds_to_target"] = _stats([h[1] for h in hits])
            row["steps_to_target_range"] = (min((h[0] for h in hits), default=float("nan")),
                                            max((h[0] for h in hits), default=float("nan")))
            row["seconds_to_target_range"] = (min((h[1] for h in hits), default=float("nan")),
                                              max((h[1] for h in hits), default=float("nan")))
        if classifier:
            row["final_test_accuracy"] = _stats([100 * r.test_accuracy[-1] for r in usable if r.test_accuracy])
            row["best_test_accuracy"] = _stats([100 * max(r.test_accuracy) for r in usable if r.test_accuracy])
        rows.append(row)
    return rows


def _num(value: tuple[float, float] | float, fmt: str, with_std: bool) -> str:
    mean, std = value if isinstance(value, tuple) else (value, 0.0)
    if not math.isfinite(mean):
        return "-"
    text = format(mean, fmt)
    return f"{text} ± {format(std, '.2g' if fmt.endswith('g') else fmt)}" if with_std else text


def table_cells(rows: Sequence[dict[str, Any]], *, classifier: bool,
                test_name: str = "test") -> tuple[list[str], list[list[str]]]:
    """Header and string cells of the results table (with the columns to the target loss when the
    rows hold them)."""
    multi = any(r["runs"] > 1 for r in rows)
    targeted = any("target" in r for r in rows)
    header = ["method", "status", "epochs", "final train loss", "best train loss"]
    header += ["test acc %", "best test acc %"] if classifier else [f"{test_name} loss"]
    if targeted:
        target = next(r["target"] for r in rows if "target" in r)
        header += [f"reached {target:g}", "steps to target", "s to target", "ms/step"]
    header += ["s/epoch", "x SGD-m", "opt state MiB", "peak RSS MiB"]
    cells = []
    for r in rows:
        line = [r["method"], r["status"], _num(r["epochs"], ".3g", False),
                _num(r["final_train_loss"], "#.4g", multi), _num(r["best_train_loss"], "#.4g", multi)]
        if classifier:
            line += [_num(r["final_test_accuracy"], ".2f", multi), _num(r["best_test_accuracy"], ".2f", multi)]
        else:
            line.append(_num(r["final_test_loss"], "#.4g", multi))
        if targeted:
            line += [r.get("target_reached", "-"), _num(r.get("steps_to_target", float("nan")), ".0f", multi),
                     _num(r.get("seconds_to_target", float("nan")), ".1f", multi),
                     _num(r.get("ms_per_step", float("nan")), ".0f", False)]
        ratio_std = r.get("time_ratio_to_sgd_std", float("nan"))
        paired = multi and isinstance(ratio_std, float) and math.isfinite(ratio_std)
        line += [_num(r["seconds_per_epoch"], ".3f", False),
                 _num((r["time_ratio_to_sgd"], ratio_std), ".2f", paired),
                 _num(r["state_mib"], ".3f", False), _num(r["peak_mib"], ".1f", False)]
        cells.append(line)
    return header, cells


def format_table(rows: Sequence[dict[str, Any]], *, classifier: bool, rst: bool = False, test_name: str = "test") -> str:
    """The table as aligned plain text, or as a reStructuredText simple table (``rst=True``)."""
    header, cells = table_cells(rows, classifier=classifier, test_name=test_name)
    return align_columns(header, cells, rst=rst)


def align_columns(header: Sequence[str], cells: Sequence[Sequence[str]], *, rst: bool = False) -> str:
    """String cells as left-aligned columns two spaces apart under a rule of dashes, or as a
    reStructuredText simple table (``rst=True``)."""
    widths = [max(len(h), *(len(c[i]) for c in cells)) if cells else len(h) for i, h in enumerate(header)]
    fmt = lambda line: "  ".join(c.ljust(w) for c, w in zip(line, widths)).rstrip()  # noqa: E731
    if rst:
        rule = "  ".join("=" * w for w in widths)
        return "\n".join([rule, fmt(header), rule, *(fmt(c) for c in cells), rule])
    rule = "-" * len(fmt(["-" * w for w in widths]))
    return "\n".join([fmt(header), rule, *(fmt(c) for c in cells)])


def environment() -> dict[str, Any]:
    """Versions and machine facts recorded with the results."""
    import curvkit

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "curvkit": curvkit.__version__,
        "torch_threads": torch.get_num_threads(),
        "machine": platform.machine(),
        "platform": platform.platform(),
        "processor": platform.processor(),
    }


def _clean(obj: Any) -> Any:
    """JSON-safe copy: non-finite floats become strings ("nan", "inf", "-inf")."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else str(obj)
    if isinstance(obj, dict):
        return {str(k): _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    return obj


def _unclean(obj: Any) -> Any:
    if isinstance(obj, str) and obj in ("nan", "inf", "-inf"):
        return float(obj)
    if isinstance(obj, list):
        return [_unclean(v) for v in obj]
    return obj


def load_runs(payload: dict[str, Any]) -> list[RunResult]:
    """The :class:`RunResult` objects stored in a results JSON payload (as written by the CLI)."""
    import dataclasses

    names = {f.name for f in dataclasses.fields(RunResult)}
    return [RunResult(**{k: _unclean(v) for k, v in run.items() if k in names}) for run in payload["runs"]]


def write_json(path: Path, payload: dict[str, Any]) -> Path:
    """Write ``payload`` (non-finite numbers as strings) to ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(_clean(payload), indent=1, default=str) + "\n")
    return path
