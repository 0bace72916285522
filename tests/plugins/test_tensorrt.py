"""TensorRT backend. Without a builder (CI): the plug-in contract against the torch fake kernels and the
ONNX schemas, the ONNX graph the parser will see, the AOT kernel adapters (numbers under Triton's
interpreter, PTX for sm_90 with the parameter list TensorRT launches). With `tensorrt` importable:
plug-in registration and a tiny engine build."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import onnx
import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from qwen35_export.errors import BuildError
from qwen35_export.model import ops  # noqa: F401  (registers torch.ops.qwen35.*)
from qwen35_export.plugins.onnx.schemas import DOMAIN, SCHEMAS
from qwen35_export.plugins.tensorrt.build import profile_shapes, require_tensorrt
from qwen35_export.plugins.tensorrt.onnx_prep import AOT_PLUGINS, prepare_for_tensorrt
from qwen35_export.plugins.tensorrt.specs import PLUGIN_OUTPUTS, TYPE_COMBINATIONS

try:
    import tensorrt  # noqa: F401

    HAVE_TRT = True
except ImportError:
    HAVE_TRT = False
needs_trt = pytest.mark.skipif(not HAVE_TRT, reason="needs tensorrt (the TensorRT builder cannot be installed on "
                                                    "this machine)")

_TORCH_OP = {"CausalConv1d": "causal_conv1d", "GatedDeltaRule": "gated_delta_rule", "MoE": "moe_experts",
             "MoEFP8": "moe_experts_fp8"}


def _example_inputs(name: str) -> list[torch.Tensor]:
    """Odd sizes so that no two dims coincide by accident (a wrong `like` index would go unnoticed)."""
    B, T, C, W, HK, HV, K, V, N, E, k, H, I = 3, 5, 24, 4, 2, 6, 16, 8, 7, 9, 2, 20, 128
    bf = torch.bfloat16
    if name == "CausalConv1d":
        return [torch.empty(B, T, C, dtype=bf), torch.empty(C, W, dtype=bf), torch.empty(B, C, W - 1, dtype=bf),
                torch.empty(B, dtype=torch.int64)]
    if name == "GatedDeltaRule":
        return [torch.empty(B, T, HK, K, dtype=bf), torch.empty(B, T, HK, K, dtype=bf), torch.empty(B, T, HV, V, dtype=bf),
                torch.empty(B, T, HV), torch.empty(B, T, HV), torch.empty(B, HV, K, V)]
    x, w, ids = torch.empty(N, H, dtype=bf), torch.empty(N, k, dtype=bf), torch.empty(N, k, dtype=torch.int64)
    if name == "MoE":
        return [x, w, ids, torch.empty(E, 2 * I, H, dtype=bf), torch.empty(E, H, I, dtype=bf)]
    f8 = torch.float8_e4m3fn
    return [x, w, ids, torch.empty(E, 2 * I, H, dtype=f8), torch.empty(E, 2, 1), torch.empty(E, H, I, dtype=f8),
            torch.empty(E, 1, 1)]


@pytest.mark.parametrize("name", sorted(PLUGIN_OUTPUTS))
def test_plugin_outputs_match_fake_kernels(name: str) -> None:
    """Each declared output (`like`/`alias` input j) has the shape and dtype the torch op's fake kernel
    gives, and aliased outputs alias an input of exactly that shape and dtype."""
    with FakeTensorMode() as mode:
        inputs = [mode.from_tensor(t) for t in _example_inputs(name)]
        res = getattr(torch.ops.qwen35, _TORCH_OP[name])(*inputs)
    res = res if isinstance(res, tuple) else (res,)
    assert len(res) == len(PLUGIN_OUTPUTS[name])
    for (kind, j), r in zip(PLUGIN_OUTPUTS[name], res):
        assert kind in ("like", "alias")
        assert (tuple(inputs[j].shape), inputs[j].dtype) == (tuple(r.shape), r.dtype), f"{name}: {kind} input {j}"


@pytest.mark.parametrize("name", sorted(PLUGIN_OUTPUTS))
def test_plugin_signature_matches_onnx_schema(name: str) -> None:
    schema = SCHEMAS[name]
    assert len(PLUGIN_OUTPUTS[name]) == len(schema.outputs)
    # one type entry per input and per output, the int64/fp8/fp32 positions where the schema has them
    types = [t.strip() for t in TYPE_COMBINATIONS[name].split(",")]
    assert len(types) == len(schema.inputs) + len(schema.outputs)
    fixed = {"tensor(int64)": "INT64", "tensor(float)": "FP32", "tensor(float8e4m3fn)": "FP8"}
    for p, t in zip([*schema.inputs, *schema.outputs], types):
        assert t == fixed.get(p.type_str, "FP32|BF16|FP16"), f"{name}.{p.name}: {t} vs {p.type_str}"


def test_prepare_for_tensorrt(ort_engine_fp32: Path) -> None:
    m = onnx.load(str(ort_engine_fp32 / "graphs" / "gdn_decode.onnx"))
    p = prepare_for_tensorrt(m)
    nodes = {n.op_type: n for n in p.graph.node if n.domain == DOMAIN}
    assert set(nodes) == {"CausalConv1d", "GatedDeltaRule", "MoERouter", "MoE"}
    for name in ("CausalConv1d", "GatedDeltaRule", "MoE"):
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in nodes[name].attribute}
        assert attrs == {"plugin_namespace": b"qwen35", "plugin_version": b"1", "aot": int(name in AOT_PLUGINS)}
    assert not any(a.name == "plugin_namespace" for a in nodes["MoERouter"].attribute)
    # plug-in nodes lose their bodies (else the parser imports the body); the router keeps its own
    assert {f.name for f in p.functions if f.domain == DOMAIN} == {"MoERouter"}
    onnx.checker.check_model(p)
    assert {f.name for f in m.functions if f.domain == DOMAIN} == {"CausalConv1d", "GatedDeltaRule", "MoERouter",
                                                                  "MoE"}, "the input model is left alone"


def test_profile_shapes() -> None:
    assert profile_shapes((-1, -1, 256), 8, 512) == ((1, 1, 256), (4, 128, 256), (8, 512, 256))
    assert profile_shapes((-1, 1024, 3), 8, 512) == ((1, 1024, 3), (4, 1024, 3), (8, 1024, 3))
    assert profile_shapes((16, 256), 8, 512) == ((16, 256),) * 3


@pytest.mark.skipif(HAVE_TRT, reason="checks the message on a machine without tensorrt")
def test_require_tensorrt_names_the_module() -> None:
    with pytest.raises(BuildError, match=r"the `tensorrt` Python module \(TensorRT >= 10\) cannot be imported"):
        require_tensorrt()


def _run(code: str, interpret: bool) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    if interpret:
        env["TRITON_INTERPRET"] = "1"
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=240, env=env)
    assert p.returncode == 0, p.stderr[-3000:]
    return json.loads(p.stdout.strip().splitlines()[-1])


_ADAPTERS = """
import json, torch
from qwen35_export.model import ops
from qwen35_export.plugins.tensorrt import aot_kernels as A
torch.manual_seed(0)
B, T, C, W = 3, 70, 200, 4
x, w, s, L = torch.randn(B, T, C), torch.randn(C, W), torch.randn(B, C, W - 1), torch.tensor([70, 1, 33])
ry, rs = ops.causal_conv1d(x, w, s, L)
k = A.causal_conv1d_kernel("float32", "float32", W)
grid, extra = A.causal_conv1d_launch(B, T, C)
y = torch.empty_like(x)
k.fn[grid](x, w, s, L, *extra, y, s, **k.constexprs)  # final state written over the initial one
B, T, H, HV, K, V = 2, 5, 2, 4, 16, 32
q, kk = torch.randn(B, T, H, K), torch.randn(B, T, H, K)
v, g, be, h = torch.randn(B, T, HV, V), -torch.rand(B, T, HV), torch.rand(B, T, HV), torch.randn(B, HV, K, V)
ro, rh = ops.gated_delta_rule(q, kk, v, g, be, h)
kern = A.gated_delta_rule_kernel("float32", H, HV, K, V)
grid, extra = A.gated_delta_rule_launch(B, T, HV, V, kern.constexprs["BV"])
o = torch.empty_like(v)
kern.fn[grid](q, kk, v, g, be, h, *extra, o, h, **kern.constexprs, num_warps=kern.num_warps)
d = lambda a, b: float((a - b).abs().max() / b.abs().max())
print(json.dumps({"y": d(y, ry), "conv_state": d(s, rs), "o": d(o, ro), "ht": d(h, rh)}))
"""


def test_aot_adapters_match_reference_in_place() -> None:
    """The adapters, launched with the AOT parameter order and the states aliased in/out, on the CPU
    through Triton's interpreter: fp32 rounding-order differences only."""
    err = _run(_ADAPTERS, interpret=True)
    assert all(e <= 1e-5 for e in err.values()), err


_PTX = """
import json
from qwen35_export.plugins.tensorrt import aot_kernels as A
out = {}
for name, k in [("conv_bf16", A.causal_conv1d_kernel("bfloat16", "bfloat16", 4)),
                ("conv_fp32", A.causal_conv1d_kernel("float32", "float32", 4)),
                ("gdn_bf16", A.gated_delta_rule_kernel("bfloat16", 16, 64, 128, 128)),
                ("gdn_fp32", A.gated_delta_rule_kernel("float32", 2, 4, 128, 128))]:
    c = A.compile_ptx(k, arch=90)
    ptx = c.asm["ptx"]
    entry = ptx[ptx.index(".entry"):ptx.index(")", ptx.index(".entry"))]
    out[name] = {"params": entry.count(".param"), "declared": k.n_inputs + k.n_extras + k.n_outputs,
                 "target": ".target sm_90" in ptx, "name": c.metadata.name}
print(json.dumps(out))
"""


def test_aot_kernels_compile_to_ptx_for_sm90() -> None:
    """What `aot_impl` hands TensorRT: PTX for sm_90 whose entry takes (inputs, extras, outputs) and
    nothing more than Triton's two trailing scratch pointers (asserted unused by compile_ptx)."""
    res = _run(_PTX, interpret=False)
    for name, r in res.items():
        assert r["target"], name
        assert r["params"] == r["declared"] + 2, (name, r)
        assert r["name"].endswith("_aot"), name


@needs_trt
def test_plugins_register() -> None:
    import tensorrt.plugin as trtp

    from qwen35_export.plugins.tensorrt.plugins import register_plugins

    register_plugins()
    for name in PLUGIN_OUTPUTS:
        assert hasattr(trtp.op.qwen35, name)


@needs_trt
@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability() != (9, 0),
                    reason="needs an sm_90 GPU (TensorRT builds for the GPU it runs on)")
def test_tiny_engine_builds(engine_ckpt_fp32: Path, tmp_path: Path) -> None:
    from qwen35_export.exporter.build import BuildSettings
    from qwen35_export.plugins.build import build_backend_engine

    out = build_backend_engine(engine_ckpt_fp32, tmp_path / "trt", BuildSettings(
        target="h100", backend="tensorrt", dtype="bf16", max_batch=2, max_seq_len=32, progress=False))
    m = json.loads((out / "manifest.json").read_text())
    assert m["backend"] == "tensorrt" and all(g["file"].endswith(".engine") for g in m["graphs"].values())
