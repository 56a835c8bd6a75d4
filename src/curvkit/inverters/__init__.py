"""Built-in inverters: ``damped_eigen``, ``cholesky`` and ``identity``."""

from .cholesky import Cholesky
from .eigen import DampedEigen
from .identity import IdentityInverter

__all__ = ["Cholesky", "DampedEigen", "IdentityInverter"]
