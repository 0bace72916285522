"""ONNX function bodies of the `qwen35` nodes, written with onnxscript in standard opset-23 ops, so that any
ONNX runtime runs the graphs as they are; a backend with a plug-in for a node ignores its body.

Each body follows the torch reference in model/ops.py step for step (fp32 math, same order of sums where
it is cheap to keep), because the CPU engine is checked token for token against that reference.
"""

from __future__ import annotations

import onnx
from onnxscript import graph, script
from onnxscript import opset23 as op

from .schemas import OPSET

_F32 = onnx.TensorProto.FLOAT
_I64 = onnx.TensorProto.INT64
BLOCK = 128  # FP8 weight block (checkpoint/fp8.py)


@script(OPSET, default_opset=op)
def CausalConv1d(x, weight, conv_state, lengths):
    """x [B,T,C], weight [C,W], conv_state [B,C,W-1], lengths [B] -> (y [B,T,C], final_state [B,C,W-1])."""
    xx = op.Concat(op.Cast(op.Transpose(conv_state, perm=[0, 2, 1]), to=_F32), op.Cast(x, to=_F32),
                   axis=1)  # [B, W-1+T, C]
    wf = op.Cast(weight, to=_F32)
    T = op.Shape(x, start=1, end=2)
    W = op.Squeeze(op.Shape(weight, start=1, end=2))
    acc = op.ConstantOfShape(op.Shape(x))  # fp32 zeros [B, T, C]
    # A loop over the W taps (not Conv with group=C) keeps the reference's order of sums exactly.
    for j in range(W):
        j1 = op.Reshape(j, op.Constant(value_ints=[1]))
        tap = op.Slice(xx, j1, op.Add(j1, T), op.Constant(value_ints=[1]))  # [B, T, C]
        acc = op.Add(acc, op.Mul(tap, op.Gather(wf, j, axis=1)))
    y = op.CastLike(op.Mul(acc, op.Sigmoid(acc)), x)
    # final state: the W-1 inputs just before position lengths[b] of [state; x]
    Wm1 = op.Squeeze(op.Shape(conv_state, start=2, end=3))
    idx = op.Add(op.Unsqueeze(lengths, op.Constant(value_ints=[1])),
                 op.Unsqueeze(op.Range(op.Constant(value_int=0), Wm1, op.Constant(value_int=1)),
                              op.Constant(value_ints=[0])))  # [B, W-1]
    C = op.Shape(x, start=2, end=3)
    idx3 = op.Expand(op.Unsqueeze(idx, op.Constant(value_ints=[2])),
                     op.Concat(op.Shape(idx), C, axis=0))  # [B, W-1, C]
    final = op.Transpose(op.GatherElements(xx, idx3, axis=1), perm=[0, 2, 1])
    return y, op.CastLike(final, conv_state)


@script(OPSET, default_opset=op)
def GatedDeltaRule(q, k, v, g, beta, h0):
    """q, k [B,T,HK,K]; v [B,T,HV,V]; g, beta [B,T,HV] fp32; h0 [B,HV,K,V] fp32 -> (o [B,T,HV,V], ht)."""
    qf = op.Cast(q, to=_F32)
    kf = op.Cast(k, to=_F32)
    one = op.Constant(value_ints=[-1])
    qn = op.Mul(qf, op.Reciprocal(op.Sqrt(op.Add(op.ReduceSum(op.Mul(qf, qf), one, keepdims=1),
                                                  op.Constant(value_float=1e-6)))))
    kn = op.Mul(kf, op.Reciprocal(op.Sqrt(op.Add(op.ReduceSum(op.Mul(kf, kf), one, keepdims=1),
                                                  op.Constant(value_float=1e-6)))))
    # repeat-interleave key heads over value heads: [B,T,HK,K] -> [B,T,HK,G,K] -> [B,T,HV,K]
    BT = op.Shape(q, start=0, end=2)
    HK = op.Shape(q, start=2, end=3)
    HV = op.Shape(v, start=2, end=3)
    K = op.Shape(q, start=3, end=4)
    big = op.Concat(BT, HK, op.Div(HV, HK), K, axis=0)
    flat = op.Concat(BT, HV, K, axis=0)
    ax3 = op.Constant(value_ints=[3])
    scale = op.Pow(op.Cast(K, to=_F32), op.Constant(value_float=-0.5))
    qr = op.Mul(op.Reshape(op.Expand(op.Unsqueeze(qn, ax3), big), flat), scale)
    kr = op.Reshape(op.Expand(op.Unsqueeze(kn, ax3), big), flat)
    vf = op.Cast(v, to=_F32)

    @graph()
    def step(h, q_t, k_t, v_t, g_t, b_t):
        # h [B,HV,K,V]; q_t, k_t [B,HV,K]; v_t [B,HV,V]; g_t, b_t [B,HV]
        h1 = op.Mul(h, op.Unsqueeze(op.Exp(g_t), op.Constant(value_ints=[2, 3])))
        kv_mem = op.Squeeze(op.MatMul(op.Unsqueeze(k_t, op.Constant(value_ints=[2])), h1),
                            op.Constant(value_ints=[2]))  # [B,HV,V]
        delta = op.Mul(op.Sub(v_t, kv_mem), op.Unsqueeze(b_t, op.Constant(value_ints=[2])))
        h2 = op.Add(h1, op.Mul(op.Unsqueeze(k_t, op.Constant(value_ints=[3])),
                               op.Unsqueeze(delta, op.Constant(value_ints=[2]))))
        o_t = op.Squeeze(op.MatMul(op.Unsqueeze(q_t, op.Constant(value_ints=[2])), h2),
                         op.Constant(value_ints=[2]))  # [B,HV,V]
        return h2, o_t

    ht, o = op.Scan(op.Cast(h0, to=_F32), qr, kr, vf, op.Cast(g, to=_F32), op.Cast(beta, to=_F32),
                    body=step, num_scan_inputs=5, scan_input_axes=[1, 1, 1, 1, 1], scan_output_axes=[1])
    return op.CastLike(o, v), ht


@script(OPSET, default_opset=op)
def MoERouter(logits, top_k: int):
    """logits [N,E] -> (weights [N,k] fp32 summing to 1, ids [N,k] int64)."""
    probs = op.Softmax(op.Cast(logits, to=_F32), axis=-1)
    k = op.Reshape(op.Constant(value_int=top_k), op.Constant(value_ints=[1]))
    w, ids = op.TopK(probs, k, axis=-1, largest=1, sorted=1)
    return op.Div(w, op.ReduceSum(w, op.Constant(value_ints=[-1]), keepdims=1)), ids


@script(OPSET, default_opset=op)
def MoE(x, weights, ids, w_gate_up, w_down):
    """x [N,H], weights/ids [N,k], w_gate_up [E,2I,H], w_down [E,H,I] -> y [N,H].

    A loop over experts, each on the tokens routed to it (transformers' form, as the reference): decode-sized
    calls touch only the chosen experts' rows of compute; fp32 accumulation in ascending expert order.
    """
    xf = op.Cast(x, to=_F32)
    wf = op.Cast(weights, to=_F32)
    out = op.ConstantOfShape(op.Shape(x))  # fp32 zeros [N, H]
    E = op.Squeeze(op.Shape(w_gate_up, start=0, end=1))
    I = op.Shape(w_down, start=2, end=3)
    zero = op.Constant(value_ints=[0])
    for e in range(E):
        hit = op.Equal(ids, e)  # [N, k]
        w_tok = op.ReduceSum(op.Where(hit, wf, op.Constant(value_float=0.0)), op.Constant(value_ints=[1]),
                             keepdims=0)  # [N]
        routed = op.Greater(op.ReduceMax(op.Cast(hit, to=_I64), op.Constant(value_ints=[1]), keepdims=0),
                            op.Constant(value_int=0))  # [N]
        tok = op.Reshape(op.NonZero(routed), op.Constant(value_ints=[-1]))  # [n]
        xe = op.Gather(xf, tok, axis=0)  # [n, H]
        gu = op.Gemm(xe, op.Cast(op.Gather(w_gate_up, e, axis=0), to=_F32), transB=1)  # [n, 2I]
        gate = op.Slice(gu, zero, I, op.Constant(value_ints=[1]))
        up = op.Slice(gu, I, op.Add(I, I), op.Constant(value_ints=[1]))
        h = op.Mul(op.Mul(gate, op.Sigmoid(gate)), up)  # [n, I]
        y = op.Gemm(h, op.Cast(op.Gather(w_down, e, axis=0), to=_F32), transB=1)  # [n, H]
        y = op.Mul(y, op.Unsqueeze(op.Gather(w_tok, tok, axis=0), op.Constant(value_ints=[1])))
        out = op.ScatterND(out, op.Unsqueeze(tok, op.Constant(value_ints=[1])), y, reduction="add")
    return op.CastLike(out, x)


@script(OPSET, default_opset=op)
def BlockDequant(w, scale):
    """w [..., O, I] (e4m3 values, already cast to fp32) times its fp32 block scales
    [..., ceil(O/128), ceil(I/128)] -> fp32 [..., O, I]."""
    lead = op.Shape(scale, start=0, end=-2)
    OB = op.Shape(scale, start=-2, end=-1)
    IB = op.Shape(scale, start=-1)
    b = op.Constant(value_ints=[BLOCK])
    s = op.Unsqueeze(op.Unsqueeze(scale, op.Constant(value_ints=[-1])), op.Constant(value_ints=[-3]))
    s = op.Expand(s, op.Concat(lead, OB, b, IB, b, axis=0))  # [..., OB, b, IB, b]
    s = op.Reshape(s, op.Concat(lead, op.Mul(OB, b), op.Mul(IB, b), axis=0))
    O = op.Shape(w, start=-2, end=-1)
    I = op.Shape(w, start=-1)
    s = op.Slice(s, op.Constant(value_ints=[0, 0]), op.Concat(O, I, axis=0), op.Constant(value_ints=[-2, -1]))
    return op.Mul(w, s)


@script(OPSET, default_opset=op)
def MoEFP8(x, weights, ids, w_gate_up, w_gate_up_scale, w_down, w_down_scale):
    """MoE over e4m3 block-scaled experts: dequantise (fp32, as the reference does), then MoE."""
    # The fp8 inputs go through Cast first: ORT derives a function's input types from the first node that
    # reads each input, and a nested qwen35 function would give "any type" without float8 (ORT 1.32).
    w13 = op.CastLike(BlockDequant(op.Cast(w_gate_up, to=_F32), w_gate_up_scale), x)
    w2 = op.CastLike(BlockDequant(op.Cast(w_down, to=_F32), w_down_scale), x)
    return MoE(x, weights, ids, w13, w2)


FUNCTIONS = (CausalConv1d, GatedDeltaRule, MoERouter, MoE, BlockDequant, MoEFP8)


def function_protos() -> list[onnx.FunctionProto]:
    """The bodies to attach to an exported model (only those its nodes call are kept by `attach`)."""
    return [f.to_function_proto() for f in FUNCTIONS]
