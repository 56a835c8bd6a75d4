"""Built-in preconditioners: ``kronecker_mode``, ``identity``, ``adam_eigenbasis``, ``adamw``,
``muon`` and ``partition``."""

from .adam_eigenbasis import AdamEigenbasis
from .adamw import AdamW
from .identity import IdentityPreconditioner
from .kronecker import KroneckerMode
from .muon import MuonPreconditioner
from .partition import Partition

__all__ = ["AdamEigenbasis", "AdamW", "IdentityPreconditioner", "KroneckerMode", "MuonPreconditioner", "Partition"]
