"""`qwen35_triton::fp8_linear`: same signature and semantics as `qwen35::fp8_linear`, as a Triton op
that AOTInductor compiles into the package (`torch.library.triton_op` + `wrap_triton`)."""

from __future__ import annotations

from torch import Tensor
from torch.library import triton_op

from .gemm import fp8_linear_triton


@triton_op("qwen35_triton::fp8_linear", mutates_args={})
def fp8_linear(x: Tensor, w: Tensor, w_scale: Tensor) -> Tensor:
    return fp8_linear_triton(x, w, w_scale)


@fp8_linear.register_fake
def _(x, w, w_scale):
    return x.new_empty(*x.shape[:-1], w.shape[0])
