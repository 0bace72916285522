"""Run one `qwen35` node (with its function body) in ONNX Runtime, and compare with the torch reference."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import torch
from onnx import helper

from qwen35_export.plugins.onnx.export import attach_functions
from qwen35_export.plugins.onnx.schemas import DOMAIN, SCHEMAS
from qwen35_export.runtime.ort_session import _ONNX_TYPE


def node_model(op_type: str, inputs: list[torch.Tensor], like: list[torch.Tensor], **attrs) -> onnx.ModelProto:
    """A model holding one `qwen35::<op_type>` node over graph inputs typed like `inputs`; its outputs are
    declared with the dtypes and ranks (symbolic sizes) of `like` (the reference's outputs)."""
    names = [p.name for p in SCHEMAS[op_type].inputs]
    outs = [p.name for p in SCHEMAS[op_type].outputs][: len(like)]
    g = helper.make_graph(
        [helper.make_node(op_type, names, outs, domain=DOMAIN, **attrs)], op_type,
        [helper.make_tensor_value_info(n, _ONNX_TYPE[t.dtype], list(t.shape)) for n, t in zip(names, inputs)],
        [helper.make_tensor_value_info(n, _ONNX_TYPE[t.dtype], [f"{n}_{i}" for i in range(t.dim())])
         for n, t in zip(outs, like)])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 23)])
    return attach_functions(m)


def run_node(op_type: str, inputs: list[torch.Tensor], like: list[torch.Tensor], **attrs) -> list[torch.Tensor]:
    """Check the one-node model with onnx.checker, run it on ORT CPU, return the outputs as tensors."""
    m = node_model(op_type, inputs, like, **attrs)
    onnx.checker.check_model(m, full_check=True)
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    s = ort.InferenceSession(m.SerializeToString(), so, providers=["CPUExecutionProvider"])
    feed = {i.name: _np(t) for i, t in zip(s.get_inputs(), inputs)}
    return [torch.from_numpy(np.asarray(o)) for o in s.run(None, feed)]


def _np(t: torch.Tensor):
    if t.dtype == torch.float8_e4m3fn:  # numpy has no e4m3: hand ORT the bytes with the ONNX type
        return ort.OrtValue.ortvalue_from_numpy_with_onnx_type(t.view(torch.uint8).numpy(),
                                                                onnx.TensorProto.FLOAT8E4M3FN)
    return t.numpy()


def assert_close(name: str, actual: torch.Tensor, ref: torch.Tensor, rel: float) -> None:
    """max|actual - ref| <= rel * max|ref| (fp32 bodies vs fp32 references: only rounding order differs)."""
    assert actual.shape == ref.shape, f"{name}: shape {tuple(actual.shape)} != reference {tuple(ref.shape)}"
    assert actual.dtype == ref.dtype, f"{name}: dtype {actual.dtype} != reference {ref.dtype}"
    assert torch.isfinite(actual).all() and torch.isfinite(ref).all(), f"{name}: non-finite values"
    d = (actual.double() - ref.double()).abs().max().item()
    scale = ref.double().abs().max().item()
    assert d <= rel * scale, f"{name}: max|d| {d:.3e} > {rel:g} * max|ref| {scale:.3e}"
