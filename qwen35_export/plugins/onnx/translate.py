"""`custom_translation_table` for `torch.onnx.export`: each `qwen35::` torch op becomes one bare `qwen35::`
node (its body is attached after export, see export.attach_functions), `qwen35::fp8_linear` becomes
standard block-dequantise + MatMul."""

from __future__ import annotations

import torch
from onnxscript import opset23 as op

from .functions import BLOCK
from .schemas import OPS

_F32 = 1  # onnx.TensorProto.FLOAT


def causal_conv1d(x, weight, conv_state, lengths):
    return OPS["CausalConv1d"](x, weight, conv_state, lengths)


def gated_delta_rule(q, k, v, g, beta, h0):
    return OPS["GatedDeltaRule"](q, k, v, g, beta, h0)


def moe_router(logits, top_k: int):
    return OPS["MoERouter"](logits, top_k=top_k)


def moe_experts(x, weights, ids, w_gate_up, w_down):
    return OPS["MoE"](x, weights, ids, w_gate_up, w_down)


def moe_experts_fp8(x, weights, ids, w_gate_up, w_gate_up_scale, w_down, w_down_scale):
    return OPS["MoEFP8"](x, weights, ids, w_gate_up, w_gate_up_scale, w_down, w_down_scale)


def fp8_linear(x, w, w_scale):
    """x [..., in] @ dequant(w [out, in] e4m3, w_scale [ceil(out/128), ceil(in/128)]).T as explicit DQ.

    ONNX block quantisation runs along one axis, so the 128x128 scales are first repeated over the
    128 rows of each block ([out, ceil(in/128)]); DequantizeLinear(axis=1, block_size=128) then covers
    the columns. This is the Q/DQ pattern strongly typed backends turn into an FP8 GEMM.
    """
    b = op.Constant(value_ints=[BLOCK])
    OB = op.Shape(w_scale, start=0, end=1)
    IB = op.Shape(w_scale, start=1, end=2)
    rows = op.Reshape(op.Expand(op.Unsqueeze(w_scale, op.Constant(value_ints=[1])), op.Concat(OB, b, IB, axis=0)),
                      op.Concat(op.Mul(OB, b), IB, axis=0))  # [OB*128, IB]
    rows = op.Slice(rows, op.Constant(value_ints=[0]), op.Shape(w, start=0, end=1), op.Constant(value_ints=[0]))
    wd = op.DequantizeLinear(w, rows, axis=1, block_size=BLOCK)  # fp32 [out, in]
    y = op.MatMul(op.Cast(x, to=_F32), op.Transpose(wd, perm=[1, 0]))
    return op.CastLike(y, x)


def translation_table() -> dict:
    return {
        torch.ops.qwen35.causal_conv1d.default: causal_conv1d,
        torch.ops.qwen35.gated_delta_rule.default: gated_delta_rule,
        torch.ops.qwen35.moe_router.default: moe_router,
        torch.ops.qwen35.moe_experts.default: moe_experts,
        torch.ops.qwen35.moe_experts_fp8.default: moe_experts_fp8,
        torch.ops.qwen35.fp8_linear.default: fp8_linear,
    }
