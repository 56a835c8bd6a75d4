"""Built-in preconditioners: ``kronecker_mode`` and ``identity``."""

from .identity import IdentityPreconditioner
from .kronecker import KroneckerMode

__all__ = ["IdentityPreconditioner", "KroneckerMode"]
