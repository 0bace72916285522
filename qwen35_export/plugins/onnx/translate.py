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


def decode_attention(q, k_cache, v_cache, start, lengths, scale: float):
    """Standard ops (no custom node: every ONNX runtime has these): the G query heads of each KV head become
    G*T rows against that head, scores in fp32, positions past the row's own or past its length masked."""
    i = lambda *v: op.Constant(value_ints=list(v))  # noqa: E731
    B, T, NH, D = (op.Shape(q, start=n, end=n + 1) for n in range(4))
    KVH, Tmax = op.Shape(k_cache, start=1, end=2), op.Shape(k_cache, start=2, end=3)
    G = op.Div(NH, KVH)
    qg = op.Transpose(op.Reshape(q, op.Concat(B, T, KVH, G, D, axis=0)), perm=[0, 2, 3, 1, 4])  # [B,KVH,G,T,D]
    qh = op.Cast(op.Reshape(qg, op.Concat(B, KVH, op.Mul(G, T), D, axis=0)), to=_F32)
    s = op.MatMul(qh, op.Transpose(op.Cast(k_cache, to=_F32), perm=[0, 1, 3, 2]))  # [B, KVH, G*T, Tmax]
    s = op.Mul(s, op.Constant(value_float=scale))
    t = op.Range(op.Constant(value_int=0), op.Squeeze(T, i(0)), op.Constant(value_int=1))
    j = op.Range(op.Constant(value_int=0), op.Squeeze(Tmax, i(0)), op.Constant(value_int=1))
    pos = op.Add(op.Unsqueeze(start, i(1)), op.Cast(op.Unsqueeze(t, i(0)), to=7))  # [B, T] int64
    total = op.Max(op.Add(start, lengths), op.Constant(value_int=1))  # [B]
    jj = op.Cast(op.Unsqueeze(j, i(0, 1)), to=7)  # [1, 1, Tmax]
    ok = op.And(op.LessOrEqual(jj, op.Unsqueeze(pos, i(2))), op.Less(jj, op.Unsqueeze(total, i(1, 2))))
    ok = op.Reshape(op.Expand(op.Unsqueeze(ok, i(1, 2)), op.Concat(B, i(1), G, T, Tmax, axis=0)),
                    op.Concat(B, i(1), op.Mul(G, T), Tmax, axis=0))  # [B, 1, G*T, Tmax]
    p = op.Softmax(op.Where(ok, s, op.Constant(value_float=float("-inf"))), axis=-1)
    o = op.MatMul(p, op.Cast(v_cache, to=_F32))  # [B, KVH, G*T, D]
    o = op.Transpose(op.Reshape(o, op.Concat(B, KVH, G, T, D, axis=0)), perm=[0, 3, 1, 2, 4])  # [B,T,KVH,G,D]
    return op.CastLike(op.Reshape(o, op.Concat(B, T, NH, D, axis=0)), q)


def translation_table() -> dict:
    return {
        torch.ops.qwen35.causal_conv1d.default: causal_conv1d,
        torch.ops.qwen35.gated_delta_rule.default: gated_delta_rule,
        torch.ops.qwen35.moe_router.default: moe_router,
        torch.ops.qwen35.moe_experts.default: moe_experts,
        torch.ops.qwen35.moe_experts_fp8.default: moe_experts_fp8,
        torch.ops.qwen35.fp8_linear.default: fp8_linear,
        torch.ops.qwen35.decode_attention.default: decode_attention,
    }
