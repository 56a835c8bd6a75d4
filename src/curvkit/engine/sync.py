"""Averaging statistics over the ranks of a :mod:`torch.distributed` process group."""

from __future__ import annotations

from typing import Any, Sequence

from .._tree import tensors_in

__all__ = ["StatisticsAverager"]


class StatisticsAverager:
    """Averages every floating-point statistic over the ranks (one all-reduce per dtype/device).

    Args:
        process_group: the group to average over (default: the whole world).
    """

    def __init__(self, process_group: Any = None) -> None:
        self.process_group = process_group

    @staticmethod
    def check_ready() -> None:
        """Raise ``RuntimeError`` unless a process group is initialised."""
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()):
            raise RuntimeError(
                "sync_statistics=True needs an initialised torch.distributed process group "
                "(torch.distributed.init_process_group) before the first statistics update"
            )

    def average_statistics(self, states: Sequence[dict[str, Any]]) -> None:
        """Average the floating-point tensors of ``states`` in place (one all-reduce per dtype
        and device, through :class:`curvkit.distributed.TorchDistributed`)."""
        from ..distributed import TorchDistributed

        self.check_ready()
        tensors = [t for s in states for t in tensors_in(s) if t.is_floating_point()]
        TorchDistributed(self.process_group).average_(tensors, call="statistics")
