"""torch.nn modules: packed INT4 and INT8 linear layers (and, for training, fake-quant layers)."""
from .half_linear import HalfLinear
from .int4_linear import Int4Linear
from .int8_linear import Int8Linear
from .lsq import LSQLinear

__all__ = ["HalfLinear", "Int4Linear", "Int8Linear", "LSQLinear"]
