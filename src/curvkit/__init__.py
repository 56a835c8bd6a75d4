"""curvkit: second-order (curvature) optimizers for PyTorch, centred on Tensor Normal Training.

Practitioners use a preset (:func:`TNT`); researchers compose parts by name (:func:`compose`);
plugin authors register new parts (:func:`register`) and ship them through the
``curvkit.plugins`` entry-point group.
"""

from . import contractions, fisher, matrix_functions
from .blocks import (
    FALLBACK_MOMENTUM,
    Block,
    BlockPlan,
    HomogeneousLayout,
    Layout,
    ReshapeLayout,
    default_block,
    fallback_block,
    layer_block,
    view_shape_for,
)
from .estimators import TensorNormal
from .estimators.tensor_normal import statistics_dtype
from .hooks import LayerRecord, LayerRecorder
from .interfaces import (
    BlockEvidence,
    CurvatureEstimator,
    EvidenceSpec,
    Factor,
    Inverter,
    Part,
    PartConfig,
    Preconditioner,
    Source,
)
from .inverters import Cholesky, DampedEigen, IdentityInverter
from .methods import TNT, build_part, compose
from .optimizer import CurvatureOptimizer
from .preconditioners import IdentityPreconditioner, KroneckerMode
from .registry import ENTRY_POINT_GROUP, UnknownPartError, available, get, register, registry
from .safeguards import CurvkitWarning
from .estimators import NoCurvature
from .inverters import Eigenbasis
from .preconditioners import AdamEigenbasis, AdamW, MuonPreconditioner, Partition
from .presets import KL_Shampoo, Muon, SOAP, TNT_KL

__version__ = "0.1.0"

__all__ = [
    "Block", "BlockEvidence", "BlockPlan", "Cholesky", "CurvatureEstimator", "CurvatureOptimizer",
    "CurvkitWarning", "DampedEigen", "ENTRY_POINT_GROUP", "EvidenceSpec", "Factor", "HomogeneousLayout",
    "IdentityInverter", "IdentityPreconditioner", "Inverter", "KroneckerMode", "LayerRecord",
    "LayerRecorder", "Layout", "Part", "PartConfig", "Preconditioner", "ReshapeLayout", "Source", "TNT",
    "TensorNormal", "UnknownPartError", "available", "build_part", "compose", "contractions",
    "default_block", "FALLBACK_MOMENTUM", "fallback_block", "layer_block", "statistics_dtype", "fisher", "get", "matrix_functions", "register", "registry", "view_shape_for",
    "NoCurvature", "Eigenbasis", "AdamEigenbasis", "AdamW", "Partition", "MuonPreconditioner",
    "KL_Shampoo", "Muon", "SOAP", "TNT_KL",
]
