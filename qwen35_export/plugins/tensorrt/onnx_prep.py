"""Prepare an exported ONNX graph for TensorRT's ONNX parser: `qwen35` nodes with a plug-in get the
attributes the parser maps to a `trt.plugin` by (op name, `plugin_namespace`), `aot=1` to take the AOT
implementation where one exists, and lose their function bodies (the parser would otherwise import the
body instead of looking up the plug-in). Nodes without a plug-in (MoERouter) keep their bodies.
"""

from __future__ import annotations

import onnx
from onnx import helper

from ..onnx.schemas import DOMAIN
from .specs import NAMESPACE, PLUGIN_OUTPUTS

# plug-ins with an AOT (PTX) implementation; the others run their JIT implementation (needs Python)
AOT_PLUGINS = ("CausalConv1d", "GatedDeltaRule")


def prepare_for_tensorrt(model: onnx.ModelProto) -> onnx.ModelProto:
    """Returns a copy of `model` with plug-in attributes set and plug-in function bodies removed."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    for node in m.graph.node:
        if node.domain != DOMAIN or node.op_type not in PLUGIN_OUTPUTS:
            continue
        keep = [a for a in node.attribute if a.name not in ("plugin_namespace", "plugin_version", "aot")]
        del node.attribute[:]
        node.attribute.extend(keep)
        node.attribute.extend([helper.make_attribute("plugin_namespace", NAMESPACE),
                               helper.make_attribute("plugin_version", "1"),
                               helper.make_attribute("aot", int(node.op_type in AOT_PLUGINS))])
    used = {n.op_type for n in m.graph.node if n.domain == DOMAIN}
    bodies = [f for f in m.functions if not (f.domain == DOMAIN and f.name in PLUGIN_OUTPUTS)]
    # keep a body only while something still calls it (MoEFP8's nested MoE/BlockDequant go with it)
    called, grew = set(used), True
    while grew:
        more = {n.op_type for f in bodies if f.name in called for n in f.node if n.domain == DOMAIN}
        grew = not more <= called
        called |= more
    del m.functions[:]
    m.functions.extend(f for f in bodies if f.domain != DOMAIN or f.name in called)
    return m
