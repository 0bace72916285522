"""The TensorRT plug-ins, as data: inputs, and what each output is. plugins.py builds the
`trt.plugin.register` descriptors from this table; CI checks it against the torch fake kernels, the ONNX
schemas and the AOT kernels without TensorRT.

Output kinds: `("like", j)` a new buffer of input j's shape and dtype; `("alias", j)` input j's buffer,
updated in place (the GDN and conv states); `("moe_hidden", None)` the [N, k, I] fp32 activations between
the two MoE plug-ins (N from x, k from ids, I = w_gate_up rows / 2); `("moe_out", None)` the MoE output
[N, H] (N from h, H from w_down) in the activations' dtype (that of `weights`).

CausalConv1d and GatedDeltaRule replace the `qwen35` ONNX nodes of the same name. `qwen35::MoE` and
`MoEFP8` are split by onnx_prep.py into MoEGateUp(FP8) + MoEDown(FP8) (one kernel each, see
aot_kernels.py). MoERouter has no plug-in: its function body (Softmax + TopK) is standard ops.
"""

from __future__ import annotations

NAMESPACE = "qwen35"

PLUGINS: dict[str, tuple[list[str], list[tuple[str, int | None]]]] = {
    "CausalConv1d": (["x", "weight", "conv_state", "lengths"], [("like", 0), ("alias", 2)]),
    "GatedDeltaRule": (["q", "k", "v", "g", "beta", "h0"], [("like", 2), ("alias", 5)]),
    "MoEGateUp": (["x", "ids", "w_gate_up"], [("moe_hidden", None)]),
    "MoEDown": (["h", "weights", "ids", "w_down"], [("moe_out", None)]),
    "MoEGateUpFP8": (["x", "ids", "w_gate_up", "w_gate_up_scale"], [("moe_hidden", None)]),
    "MoEDownFP8": (["h", "weights", "ids", "w_down", "w_down_scale"], [("moe_out", None)]),
}

# Type combinations offered to TensorRT's autotuner, one entry per input then per output ("|" lists the
# alternatives that go together: the i-th choice of every position is one combination).
ACT = "FP32|BF16|FP16"
TYPE_COMBINATIONS: dict[str, str] = {
    "CausalConv1d": f"{ACT}, {ACT}, {ACT}, INT64, {ACT}, {ACT}",
    "GatedDeltaRule": f"{ACT}, {ACT}, {ACT}, FP32, FP32, FP32, {ACT}, FP32",
    "MoEGateUp": f"{ACT}, INT64, {ACT}, FP32",
    "MoEDown": f"FP32, {ACT}, INT64, {ACT}, {ACT}",
    "MoEGateUpFP8": f"{ACT}, INT64, FP8, FP32, FP32",
    "MoEDownFP8": f"FP32, {ACT}, INT64, FP8, FP32, {ACT}",
}


def describe(name: str, shapes: list[tuple], dtypes: list[str]) -> list[tuple[tuple, str]]:
    """(shape, dtype) of each output for concrete input shapes/dtypes: the rule the descriptors follow."""
    out = []
    for kind, j in PLUGINS[name][1]:
        if kind == "moe_hidden":
            out.append(((shapes[0][0], shapes[1][1], shapes[2][1] // 2), "float32"))
        elif kind == "moe_out":
            out.append(((shapes[0][0], shapes[3][1]), dtypes[1]))
        else:
            out.append((tuple(shapes[j]), dtypes[j]))
    return out
