"""Export each layer kind to ONNX: functional wrappers that return the new states (ONNX graphs cannot
mutate their inputs), weights as graph inputs so one model file serves every layer of its kind.

Names: inputs are `x, lengths, conv_state, rec_state, <weights...>` (gdn) or `x, start, lengths, k_cache,
v_cache, <weights...>` (attn); outputs are `y` plus `<state>.next` for each state input, which the runtime
(runtime/ort_session.py) copies back into the state tensor it passed in.
"""

from __future__ import annotations

from pathlib import Path

import onnx
import torch
from torch import Tensor, nn

from ...config import Qwen35Config
from ...exporter import capture as C
from ...graph.inline_ops import inline_ops
from ...model import layers
from .functions import function_protos
from .naming import STATE_SUFFIX
from .schemas import DOMAIN, VERSION
from .translate import translation_table

OPSET = 23  # Attention (the SDPA lowering) and blocked DequantizeLinear
PROTOBUF_LIMIT = 2**31  # protobuf refuses messages past 2 GiB: larger tensors go to an external-data file


class GDNLayerFn(nn.Module):
    """x, lengths, conv_state, rec_state, *weights -> (y, conv_state', rec_state')."""

    def __init__(self, cfg: Qwen35Config, weight_names: list[str]):
        super().__init__()
        self.cfg, self.weight_names = cfg, list(weight_names)

    def forward(self, x: Tensor, lengths: Tensor, conv_state: Tensor, rec_state: Tensor, *weights: Tensor):
        return layers.gdn_layer(x, dict(zip(self.weight_names, weights)), conv_state, rec_state, lengths, self.cfg)


class AttentionLayerFn(nn.Module):
    """x, start, lengths, k_cache, v_cache, *weights -> (y, k_cache', v_cache')."""

    def __init__(self, cfg: Qwen35Config, weight_names: list[str]):
        super().__init__()
        self.cfg, self.weight_names = cfg, list(weight_names)

    def forward(self, x: Tensor, start: Tensor, lengths: Tensor, k_cache: Tensor, v_cache: Tensor,
                *weights: Tensor):
        return layers.attention_layer(x, dict(zip(self.weight_names, weights)), k_cache, v_cache, start, lengths,
                                      self.cfg)


def _to_onnx(ep: torch.export.ExportedProgram, input_names: list[str], output_names: list[str]) -> onnx.ModelProto:
    ep, _ = inline_ops(ep)  # plain-math qwen35 ops become standard ops (no ONNX node of their own)
    prog = torch.onnx.export(ep, (), input_names=input_names, output_names=output_names, dynamo=True,
                             opset_version=OPSET, custom_translation_table=translation_table(), optimize=True,
                             verbose=False)
    return attach_functions(cast_rms_norm_inputs(prog.model_proto))


def cast_rms_norm_inputs(model: onnx.ModelProto) -> onnx.ModelProto:
    """Cast X to the scale's dtype in front of each RMSNormalization the exporter's optimizer fused from
    our RMSNorm: with bf16 activations it fuses `x.float()` away and leaves X bf16 with an fp32 scale
    (1 + w, fp32 as in the reference), which ORT rejects (RMSNormalization's body multiplies X-typed by
    scale-typed values). Casting X to fp32 first is exactly the reference's `x.float()`.

    Workaround for onnxscript 0.7.2 (torch 2.13 exporter, optimize=True); delete once
    tests/plugins/test_onnx_export.py::test_bf16_layer_types_consistent passes without it.
    """
    types = {v.name: v.type.tensor_type.elem_type for v in [*model.graph.input, *model.graph.value_info,
                                                             *model.graph.output]}
    types.update({t.name: t.data_type for t in model.graph.initializer})
    nodes = []
    for n in model.graph.node:
        if n.op_type == "RMSNormalization" and n.domain in ("", "ai.onnx"):
            x_t, scale_t = types.get(n.input[0]), types.get(n.input[1])
            if x_t is not None and scale_t is not None and x_t != scale_t:
                wide = n.input[0] + ".as_scale_type"
                nodes.append(onnx.helper.make_node("Cast", [n.input[0]], [wide], to=scale_t, name=n.name + ".cast"))
                model.graph.value_info.append(onnx.helper.make_tensor_value_info(wide, scale_t, None))
                n.input[0] = wide
        nodes.append(n)
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    return model


def export_layer(cfg: Qwen35Config, kind: str, phase: str, weights: dict[str, Tensor], shapes: C.CaptureShapes,
                 act: torch.dtype) -> tuple[onnx.ModelProto, list[str]]:
    """ONNX model of one (layer kind, phase), and the order of its weight inputs.

    The capture is exporter/capture.py's (same example inputs and dynamic dims as the AOTI build), with
    the functional layer module in place of the in-place one.
    """
    cpu = torch.device("cpu")
    if kind == C.GDN:
        ep, names = C.capture_gdn(cfg, weights, phase, shapes, act, cpu, layer=GDNLayerFn)
        ins, states = ["x", "lengths", "conv_state", "rec_state"], ["conv_state", "rec_state"]
    else:
        ep, names = C.capture_attention(cfg, weights, phase, shapes, act, cpu, layer=AttentionLayerFn)
        ins, states = ["x", "start", "lengths", "k_cache", "v_cache"], ["k_cache", "v_cache"]
    return _to_onnx(ep, [*ins, *names], ["y", *(s + STATE_SUFFIX for s in states)]), names


def export_embed(cfg: Qwen35Config, embed_w: Tensor, shapes: C.CaptureShapes) -> onnx.ModelProto:
    ep = C.capture_embed(cfg, embed_w, shapes, torch.device("cpu"))
    return _to_onnx(ep, ["ids", "embed_tokens.weight"], ["x"])


def export_final(cfg: Qwen35Config, norm_w: Tensor, lm_head_w: Tensor, shapes: C.CaptureShapes,
                 act: torch.dtype) -> onnx.ModelProto:
    ep = C.capture_final(cfg, norm_w, lm_head_w, shapes, act, torch.device("cpu"))
    return _to_onnx(ep, ["x", "norm.weight", "lm_head.weight"], ["logits"])


def attach_functions(model: onnx.ModelProto) -> onnx.ModelProto:
    """Add the body of every `qwen35` function the graph calls (transitively), and the domain's opset.

    Bodies are attached after export because the exporter's version conversion inlines every function it
    finds; attached afterwards, the custom nodes stay nodes.
    """
    protos = {f.name: f for f in function_protos()}
    used: list[str] = []
    todo = [n.op_type for n in model.graph.node if n.domain == DOMAIN]
    while todo:
        name = todo.pop()
        if name in used:
            continue
        used.append(name)
        todo += [n.op_type for n in protos[name].node if n.domain == DOMAIN]
    have = {f.name for f in model.functions if f.domain == DOMAIN}
    model.functions.extend(protos[n] for n in sorted(used) if n not in have)
    if used and not any(o.domain == DOMAIN for o in model.opset_import):
        model.opset_import.append(onnx.helper.make_opsetid(DOMAIN, VERSION))
    return model


def save_model(model: onnx.ModelProto, path: Path, external_threshold: int = PROTOBUF_LIMIT) -> list[Path]:
    """Write `model` to `path`; if its tensors reach `external_threshold` bytes in all, store them in
    `<path>.data` beside it (protobuf cannot hold more than 2 GiB). Returns the files written."""
    path = Path(path)
    size = sum(_tensor_bytes(t) for t in _all_tensors(model))
    if size < external_threshold:
        onnx.save_model(model, str(path))
        return [path]
    data = path.name + ".data"
    onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True, location=data,
                    size_threshold=1024, convert_attribute=True)
    return [path, path.with_name(data)]


def _all_tensors(model: onnx.ModelProto):
    from onnx.external_data_helper import _get_all_tensors

    return _get_all_tensors(model)


def _tensor_bytes(t: onnx.TensorProto) -> int:
    if t.HasField("raw_data"):
        return len(t.raw_data)
    n = 1
    for d in t.dims:
        n *= d
    return n * onnx.helper.tensor_dtype_to_np_dtype(t.data_type).itemsize if t.data_type else 0
