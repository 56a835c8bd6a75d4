"""Built-in inverters: ``damped_eigen``, ``cholesky``, ``identity`` and ``eigenbasis``."""

from .cholesky import Cholesky
from .eigen import DampedEigen
from .eigenbasis import Eigenbasis
from .identity import IdentityInverter

__all__ = ["Cholesky", "DampedEigen", "Eigenbasis", "IdentityInverter"]
