"""Prepare an exported ONNX graph for TensorRT's ONNX parser.

- `qwen35` nodes with a plug-in get the attributes the parser maps to a `trt.plugin` by (op name,
  `plugin_namespace`), and `aot=1` (take the AOT implementation: the engine then runs without Python).
- `MoE` / `MoEFP8` are split into MoEGateUp(FP8) -> h -> MoEDown(FP8): one kernel each (aot_kernels.py).
- Plug-in nodes lose their function bodies (the parser would otherwise import the body instead of
  looking up the plug-in); MoERouter, which has no plug-in, keeps its body.
"""

from __future__ import annotations

import onnx
from onnx import helper

from ..onnx.schemas import DOMAIN
from .specs import NAMESPACE, PLUGINS

_SPLIT = {"MoE": ("MoEGateUp", "MoEDown"), "MoEFP8": ("MoEGateUpFP8", "MoEDownFP8")}


def _plugin_node(op: str, inputs: list[str], outputs: list[str], name: str, extra: list) -> onnx.NodeProto:
    n = helper.make_node(op, inputs, outputs, name=name, domain=DOMAIN)
    n.attribute.extend(extra)
    n.attribute.extend([helper.make_attribute("plugin_namespace", NAMESPACE),
                        helper.make_attribute("plugin_version", "1"), helper.make_attribute("aot", 1)])
    return n


def _rewrite(node: onnx.NodeProto) -> list[onnx.NodeProto]:
    keep = [a for a in node.attribute if a.name not in ("plugin_namespace", "plugin_version", "aot")]
    if node.op_type in _SPLIT:
        up, down = _SPLIT[node.op_type]
        fp8 = node.op_type == "MoEFP8"
        x, weights, ids, w13 = node.input[:4]
        h = f"{node.output[0]}.moe_hidden"
        s13 = [node.input[4]] if fp8 else []
        w2 = node.input[5:7] if fp8 else node.input[4:5]
        return [_plugin_node(up, [x, ids, w13, *s13], [h], f"{node.name}.gate_up", keep),
                _plugin_node(down, [h, weights, ids, *w2], list(node.output), f"{node.name}.down", [])]
    return [_plugin_node(node.op_type, list(node.input), list(node.output), node.name, keep)]


def prepare_for_tensorrt(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of `model` with plug-in nodes in place of the `qwen35` nodes that have one."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    nodes = []
    for node in m.graph.node:
        if node.domain == DOMAIN and (node.op_type in PLUGINS or node.op_type in _SPLIT):
            nodes += _rewrite(node)
        else:
            nodes.append(node)
    del m.graph.node[:]
    m.graph.node.extend(nodes)
    # keep a body only while a node still calls it (nested calls included)
    called, grew = {n.op_type for n in m.graph.node if n.domain == DOMAIN}, True
    while grew:
        more = {n.op_type for f in m.functions if f.name in called for n in f.node if n.domain == DOMAIN}
        grew = not more <= called
        called |= more
    bodies = [f for f in m.functions if f.domain != DOMAIN or (f.name in called and f.name not in PLUGINS)]
    del m.functions[:]
    m.functions.extend(bodies)
    return m
