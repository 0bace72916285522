"""Dense linear for the few rows of a decode step (BF16 / FP16 / FP32 weights), beside its torch reference."""

from .gemv import linear_small_m, small_m_config
from .reference import linear_reference

__all__ = ["linear_small_m", "linear_reference", "small_m_config"]
