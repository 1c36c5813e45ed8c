"""torch.nn modules: packed INT4 linear layers (and, for training, fake-quant layers)."""
from .half_linear import HalfLinear
from .int4_linear import Int4Linear
from .lsq import LSQLinear

__all__ = ["HalfLinear", "Int4Linear", "LSQLinear"]
