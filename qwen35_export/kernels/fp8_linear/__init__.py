"""Dense w8a8 block-scaled FP8 linear (`qwen35_triton::fp8_linear`) beside its torch reference."""

from .gemm import fp8_linear_triton
from .ops import fp8_linear
from .quant import quantize_act
from .reference import fake_quant_act, fp8_linear_reference, quantize_act_reference

__all__ = ["fp8_linear", "fp8_linear_triton", "quantize_act", "fp8_linear_reference", "fake_quant_act",
           "quantize_act_reference"]
