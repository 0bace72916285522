"""Single graphs of the ONNX export: FP8 layers (block DequantizeLinear + MoEFP8) against the torch layer,
and the external-data path for models past protobuf's 2 GiB."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import helper, numpy_helper

from onnx_helpers import assert_close
from qwen35_export.config import preset
from qwen35_export.exporter import capture as C
from qwen35_export.graph.quantize_fp8 import quantize_layer_fp8
from qwen35_export.model import layers
from qwen35_export.model.weights import layer_weight_shapes
from qwen35_export.plugins.onnx.export import PROTOBUF_LIMIT, export_layer, save_model
from qwen35_export.runtime.ort_session import OrtGraph

CFG = preset("tiny")


def _layer_weights(i: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(i)
    return {n: torch.randn(s, generator=g) * (0.05 if len(s) > 1 else 0.1)
            for n, s in layer_weight_shapes(CFG, i).items()}


def _fp8_layer(i: int) -> dict[str, torch.Tensor]:
    w, n = quantize_layer_fp8(_layer_weights(i))
    assert n > 0
    return w


@pytest.mark.parametrize("layer,phase", [pytest.param(0, C.PREFILL, id="gdn-prefill"),
                                         pytest.param(3, C.DECODE, id="attn-decode")])
def test_fp8_layer_matches_torch_layer(layer: int, phase: str, tmp_path: Path) -> None:
    """Weights on the spec's FP8 list are e4m3 + 128x128 scales: the graph dequantises them with
    DequantizeLinear(block_size=128) (linears) and MoEFP8 (experts), as the reference ops do."""
    w = _fp8_layer(layer)
    kind = C.GDN if layer == 0 else C.ATTN
    model, names = export_layer(CFG, kind, phase, w, C.CaptureShapes(4, 32), torch.float32)
    onnx.checker.check_model(model, full_check=True)
    ops = {n.op_type for n in model.graph.node}
    assert "DequantizeLinear" in ops
    assert "MoEFP8" in ops and "MoE" not in ops
    save_model(model, tmp_path / "g.onnx")
    graph = OrtGraph(tmp_path / "g.onnx", torch.device("cpu"))
    g = torch.Generator().manual_seed(7)
    B, T = 3, (6 if phase == C.PREFILL else 1)
    x = torch.randn(B, T, CFG.hidden_size, generator=g)
    lengths = torch.tensor([T, 1, T])
    if kind == C.GDN:
        conv = torch.randn(B, CFG.conv_dim, CFG.linear_conv_kernel_dim - 1, generator=g)
        rec = torch.randn(B, CFG.linear_num_value_heads, CFG.linear_key_head_dim, CFG.linear_value_head_dim,
                          generator=g)
        ref = layers.gdn_layer(x, w, conv, rec, lengths, CFG)
        states = [conv.clone(), rec.clone()]
        y = graph(x, lengths, *states, *[w[n] for n in names])
    else:
        kv = (B, CFG.num_key_value_heads, 32, CFG.head_dim)
        kc, vc, start = torch.randn(kv, generator=g), torch.randn(kv, generator=g), torch.tensor([4, 0, 9])
        ref = layers.attention_layer(x, w, kc, vc, start, lengths, CFG)
        states = [kc.clone(), vc.clone()]
        y = graph(x, start, lengths, *states, *[w[n] for n in names])
    for name, a, r in zip(["y", "state 0", "state 1"], [y, *states], ref):
        assert_close(name, a, r, 1e-4)


def test_bf16_layer_types_consistent() -> None:
    """bf16 activations (the GPU targets' default): with the functions inlined, strict ONNX type
    inference accepts the graph (the exporter's RMSNormalization fusion needs export.cast_rms_norm_inputs)."""
    import onnx.inliner

    # as the build prepares them: everything bf16 but A_log (exporter/build.py _prepare_layer)
    w = {n: t if n.endswith("A_log") else t.to(torch.bfloat16) for n, t in _layer_weights(0).items()}
    model, _ = export_layer(CFG, C.GDN, C.DECODE, w, C.CaptureShapes(2, 16), torch.bfloat16)
    assert "RMSNormalization" in {n.op_type for n in model.graph.node}
    onnx.shape_inference.infer_shapes(onnx.inliner.inline_local_functions(model), strict_mode=True,
                                      check_type=True)


def test_ort_cpu_bf16_refused_before_writing(engine_ckpt_fp32: Path, tmp_path: Path) -> None:
    from qwen35_export.errors import BuildError
    from qwen35_export.exporter.build import BuildSettings
    from qwen35_export.plugins.build import build_backend_engine

    with pytest.raises(BuildError, match="no bfloat16 MatMul"):
        build_backend_engine(engine_ckpt_fp32, tmp_path / "e", BuildSettings(target="cpu", backend="onnxruntime",
                                                                             dtype="bf16", progress=False))
    assert list(tmp_path.iterdir()) == []


def _matmul_model(w: np.ndarray) -> onnx.ModelProto:
    g = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "mm",
                          [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["n", w.shape[0]])],
                          [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["n", w.shape[1]])],
                          [numpy_helper.from_array(w, "w")])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 23)])


def test_external_data_written_past_threshold(tmp_path: Path) -> None:
    """The same writer the build uses, with the 2 GiB threshold lowered to 64 KiB for a 256 KiB tensor:
    the tensor goes to `<file>.data`, the graph file stays small, and ORT computes the same."""
    w = np.random.default_rng(0).standard_normal((256, 256)).astype(np.float32)
    x = np.random.default_rng(1).standard_normal((3, 256)).astype(np.float32)
    files = save_model(_matmul_model(w), tmp_path / "big.onnx", external_threshold=64 << 10)
    assert files == [tmp_path / "big.onnx", tmp_path / "big.onnx.data"]
    assert (tmp_path / "big.onnx").stat().st_size < 4096
    assert (tmp_path / "big.onnx.data").stat().st_size >= w.nbytes
    onnx.checker.check_model(str(tmp_path / "big.onnx"), full_check=True)
    s = ort.InferenceSession(str(tmp_path / "big.onnx"), providers=["CPUExecutionProvider"])
    np.testing.assert_array_equal(s.run(None, {"x": x})[0],
                                  ort.InferenceSession(_matmul_model(w).SerializeToString()).run(None, {"x": x})[0])
    # under the threshold: one file
    assert save_model(_matmul_model(w), tmp_path / "small.onnx") == [tmp_path / "small.onnx"]
    assert PROTOBUF_LIMIT == 2**31


def test_graph_with_2gib_external_initializer_is_valid(tmp_path: Path) -> None:
    """A graph whose initializer is past 2 GiB, stored the way save_model stores it (external data
    beside the file), passes onnx.checker by path. The data file is sparse: no 2 GiB are allocated."""
    n = (PROTOBUF_LIMIT // 4) + 1024  # fp32 elements: just past 2 GiB
    data = tmp_path / "huge.onnx.data"
    with open(data, "wb") as f:
        f.truncate(n * 4)
    t = onnx.TensorProto(name="w", data_type=onnx.TensorProto.FLOAT, dims=[n])
    t.data_location = onnx.TensorProto.EXTERNAL
    for k, v in {"location": data.name, "offset": "0", "length": str(n * 4)}.items():
        t.external_data.add(key=k, value=v)
    g = helper.make_graph([helper.make_node("ReduceSum", ["w"], ["y"], keepdims=0)], "huge", [],
                          [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [])], [t])
    onnx.save_model(helper.make_model(g, opset_imports=[helper.make_opsetid("", 23)]), str(tmp_path / "huge.onnx"))
    assert os.path.getsize(tmp_path / "huge.onnx") < 4096
    onnx.checker.check_model(str(tmp_path / "huge.onnx"), full_check=True)
    m = onnx.load(str(tmp_path / "huge.onnx"), load_external_data=False)
    assert m.graph.initializer[0].dims[0] * 4 > PROTOBUF_LIMIT
