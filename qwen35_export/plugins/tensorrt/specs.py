"""What each TensorRT plug-in declares, as data: output i is either `like` input j (same shape and dtype,
a new buffer) or `alias` of input j (the same buffer, updated in place). plugins.py builds the
`trt.plugin.register` descriptors from this table; CI checks it against the torch fake kernels and the
ONNX schemas without TensorRT.
"""

from __future__ import annotations

# ONNX op (plug-in name in namespace `qwen35`) -> [(kind, input index) per output]
PLUGIN_OUTPUTS: dict[str, list[tuple[str, int]]] = {
    "CausalConv1d": [("like", 0), ("alias", 2)],  # y like x; final_state in place of conv_state
    "GatedDeltaRule": [("like", 2), ("alias", 5)],  # o like v; ht in place of h0 (fp32)
    "MoE": [("like", 0)],
    "MoEFP8": [("like", 0)],
}

# The ONNX node each plug-in replaces is the `qwen35` node of the same name; MoERouter has no plug-in:
# its function body (Softmax + TopK) is standard ops TensorRT builds itself.
NAMESPACE = "qwen35"

# Type combinations offered to TensorRT's autotuner, one string per input then per output ("|" lists the
# alternatives that go together: the i-th choice of every position is one combination).
ACT = "FP32|BF16|FP16"
TYPE_COMBINATIONS: dict[str, str] = {
    "CausalConv1d": f"{ACT}, {ACT}, {ACT}, INT64, {ACT}, {ACT}",
    "GatedDeltaRule": f"{ACT}, {ACT}, {ACT}, FP32, FP32, FP32, {ACT}, FP32",
    "MoE": f"{ACT}, {ACT}, INT64, {ACT}, {ACT}, {ACT}",
    "MoEFP8": f"{ACT}, {ACT}, INT64, FP8, FP32, FP8, FP32, {ACT}",
}
