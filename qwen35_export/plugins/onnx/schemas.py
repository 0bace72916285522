"""The `qwen35` ONNX domain: one `OpSchema` per custom node. This is the contract between the exported
graphs, their ONNX function bodies (functions.py) and any backend plug-in (plugins/tensorrt/) that swaps in
a fast kernel: input/output order, names and dtypes.

Node  <- torch op                    inputs -> outputs
- CausalConv1d   <- qwen35::causal_conv1d     x [B,T,C], weight [C,W], conv_state [B,C,W-1], lengths [B] i64
                                              -> y [B,T,C], final_state [B,C,W-1]
- GatedDeltaRule <- qwen35::gated_delta_rule  q [B,T,HK,K], k [B,T,HK,K], v [B,T,HV,V], g [B,T,HV] f32,
                                              beta [B,T,HV] f32, h0 [B,HV,K,V] f32 -> o [B,T,HV,V], ht f32
- MoERouter      <- qwen35::moe_router        logits [N,E]; attr top_k -> weights [N,k] f32, ids [N,k] i64
- MoE            <- qwen35::moe_experts       x [N,H], weights [N,k], ids [N,k] i64, w_gate_up [E,2I,H],
                                              w_down [E,H,I] -> y [N,H]
- MoEFP8         <- qwen35::moe_experts_fp8   as MoE, e4m3 weights each followed by its 128x128 block scale

The router stays its own node (not fused into MoE): it maps 1:1 onto the torch op, so the export needs no
graph fusion, and its body (Softmax + TopK) is standard enough that a backend can run it without a plug-in.
`qwen35::fp8_linear` is not a custom node: it exports as standard block DequantizeLinear + MatMul (Q/DQ),
which strongly typed backends fuse into FP8 GEMMs themselves.
"""

from __future__ import annotations

from onnx.defs import OpSchema
from onnxscript.values import Op, Opset

DOMAIN = "qwen35"
VERSION = 1
OPSET = Opset(DOMAIN, VERSION)

_P = OpSchema.FormalParameter
_FLOAT_T = ["tensor(float)", "tensor(bfloat16)", "tensor(float16)"]
_I64 = "tensor(int64)"
_F32 = "tensor(float)"
_FP8 = "tensor(float8e4m3fn)"


def _schema(name: str, inputs: list[tuple[str, str]], outputs: list[tuple[str, str]], doc: str,
            attributes: list[OpSchema.Attribute] = ()) -> OpSchema:
    return OpSchema(name, DOMAIN, VERSION, doc=doc, inputs=[_P(n, t) for n, t in inputs],
                    outputs=[_P(n, t) for n, t in outputs], type_constraints=[("T", _FLOAT_T, "activations")],
                    attributes=list(attributes))


SCHEMAS: dict[str, OpSchema] = {
    s.name: s for s in (
        _schema("CausalConv1d", [("x", "T"), ("weight", "T"), ("conv_state", "T"), ("lengths", _I64)],
                [("y", "T"), ("final_state", "T")],
                "Depthwise causal conv (kernel W) + SiLU over [conv_state; x]; the final state holds the last "
                "W-1 inputs of each row's first lengths[b] tokens."),
        _schema("GatedDeltaRule", [("q", "T"), ("k", "T"), ("v", "T"), ("g", _F32), ("beta", _F32),
                                   ("h0", _F32)],
                [("o", "T"), ("ht", _F32)],
                "Gated delta rule recurrence (fp32 state); q/k L2-normalised inside, q scaled by K^-0.5; key "
                "head j serves value heads j*G..j*G+G-1. ht aliases h0 in backends that update in place."),
        _schema("MoERouter", [("logits", "T")], [("weights", _F32), ("ids", _I64)],
                "Softmax (fp32) over all experts, top-k (ties: lower index first), renormalised to sum 1.",
                [OpSchema.Attribute("top_k", OpSchema.AttrType.INT, "experts per token")]),
        _schema("MoE", [("x", "T"), ("weights", "T"), ("ids", _I64), ("w_gate_up", "T"), ("w_down", "T")],
                [("y", "T")], "Routed experts: sum_k weights * down(silu(gate(x)) * up(x)), fp32 accumulation."),
        _schema("MoEFP8", [("x", "T"), ("weights", "T"), ("ids", _I64), ("w_gate_up", _FP8),
                           ("w_gate_up_scale", _F32), ("w_down", _FP8), ("w_down_scale", _F32)],
                [("y", "T")], "MoE with e4m3 expert weights and fp32 128x128 block scales."),
    )
}

# Callable ops for translation functions: calling one emits a bare `qwen35::<name>` node.
OPS: dict[str, Op] = {name: Op(OPSET, name, schema) for name, schema in SCHEMAS.items()}
