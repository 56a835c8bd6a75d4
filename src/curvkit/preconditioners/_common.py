"""Helpers shared by the preconditioners of the eigenbasis, Adam and Muon families."""

from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import Tensor

from ..operators import EigenBasis


def eigenbases(inverses: Sequence[Any] | None, order: int, dtype: torch.dtype) -> list[Tensor | None]:
    """The orthonormal basis of each mode (``None`` = identity) from the optimizer's inverses.

    :class:`~curvkit.operators.EigenBasis` entries give their ``vectors``; a dense symmetric matrix
    (what a ``"matrix"`` inverter produces) is decomposed here by ``eigh``, ascending, with the
    same deterministic signs as the ``eigenbasis`` inverter.
    """
    if inverses is None:
        return [None] * order
    out: list[Tensor | None] = []
    for entry in inverses:
        if entry is None:
            out.append(None)
        elif isinstance(entry, EigenBasis):
            out.append(entry.vectors.to(dtype))
        elif isinstance(entry, Tensor):
            _, vecs = torch.linalg.eigh(0.5 * (entry + entry.T).to(dtype))
            idx = vecs.abs().argmax(dim=0, keepdim=True)
            out.append(vecs * torch.where(torch.gather(vecs, 0, idx) < 0, -1.0, 1.0).to(dtype))
        else:
            raise ValueError(
                f"this preconditioner needs an eigenbasis or a dense matrix per mode, got "
                f"{type(entry).__name__}: compose it with inverter='eigenbasis'"
            )
    return out


def version_of(inverses: Sequence[Any] | None) -> int:
    """The refresh counter of a block's eigenbases (-1 without any, 0 for dense matrices)."""
    if inverses is None:
        return -1
    for entry in inverses:
        if isinstance(entry, EigenBasis):
            return int(entry.version)
    return 0
