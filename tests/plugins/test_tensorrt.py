"""TensorRT backend. Without a builder (CI): the plug-in contract against the torch fake kernels and the
ONNX schemas, the ONNX graph the parser will see, the builder config, the AOT kernel adapters (numbers
under Triton's interpreter, PTX for sm_90 with the parameter list TensorRT launches). With `tensorrt`
importable: plug-in registration and a tiny engine build (also with `--backend torch-tensorrt`)."""

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
from qwen35_export.plugins.tensorrt.onnx_prep import prepare_for_tensorrt
from qwen35_export.plugins.tensorrt.specs import PLUGINS, TYPE_COMBINATIONS, describe
from trt_markers import HAVE_TRT, needs_trt, needs_ttrt


needs_sm90 = pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability() != (9, 0),
                                reason="needs an sm_90 GPU (TensorRT builds for the GPU it runs on)")
HERE = Path(__file__).parent
# torch op -> the plug-ins that replace it, in order (MoE is split in two for TensorRT)
_CHAINS = {"causal_conv1d": ["CausalConv1d"], "gated_delta_rule": ["GatedDeltaRule"],
           "moe_experts": ["MoEGateUp", "MoEDown"], "moe_experts_fp8": ["MoEGateUpFP8", "MoEDownFP8"]}
_ONNX_NODE = {"causal_conv1d": "CausalConv1d", "gated_delta_rule": "GatedDeltaRule", "moe_experts": "MoE",
              "moe_experts_fp8": "MoEFP8"}


def _example_inputs(op: str) -> dict[str, torch.Tensor]:
    """Odd sizes so that no two dims coincide by accident (a wrong input index would go unnoticed)."""
    B, T, C, W, HK, HV, K, V, N, E, k, H, I = 3, 5, 24, 4, 2, 6, 16, 8, 7, 9, 2, 20, 256
    bf, f8 = torch.bfloat16, torch.float8_e4m3fn
    if op == "causal_conv1d":
        return {"x": torch.empty(B, T, C, dtype=bf), "weight": torch.empty(C, W, dtype=bf),
                "conv_state": torch.empty(B, C, W - 1, dtype=bf), "lengths": torch.empty(B, dtype=torch.int64)}
    if op == "gated_delta_rule":
        return {"q": torch.empty(B, T, HK, K, dtype=bf), "k": torch.empty(B, T, HK, K, dtype=bf),
                "v": torch.empty(B, T, HV, V, dtype=bf), "g": torch.empty(B, T, HV), "beta": torch.empty(B, T, HV),
                "h0": torch.empty(B, HV, K, V)}
    d = {"x": torch.empty(N, H, dtype=bf), "weights": torch.empty(N, k, dtype=bf),
         "ids": torch.empty(N, k, dtype=torch.int64)}
    if op == "moe_experts":
        return {**d, "w_gate_up": torch.empty(E, 2 * I, H, dtype=bf), "w_down": torch.empty(E, H, I, dtype=bf)}
    return {**d, "w_gate_up": torch.empty(E, 2 * I, H, dtype=f8), "w_gate_up_scale": torch.empty(E, 4, 1),
            "w_down": torch.empty(E, H, I, dtype=f8), "w_down_scale": torch.empty(E, 1, 2)}


def _dt(t: torch.Tensor) -> str:
    return str(t.dtype).replace("torch.", "")


@pytest.mark.parametrize("op", sorted(_CHAINS))
def test_plugin_outputs_match_fake_kernels(op: str) -> None:
    """The plug-ins' declared outputs (specs.describe), chained as onnx_prep chains them, have the shapes
    and dtypes of the torch op's fake kernel; aliased outputs alias an input of that shape and dtype."""
    inputs = _example_inputs(op)
    with FakeTensorMode() as mode:
        res = getattr(torch.ops.qwen35, op)(*[mode.from_tensor(t) for t in inputs.values()])
    res = res if isinstance(res, tuple) else (res,)
    env = {n: (tuple(t.shape), _dt(t)) for n, t in inputs.items()}
    for name in _CHAINS[op]:
        names, outs = PLUGINS[name]
        got = describe(name, [env[n][0] for n in names], [env[n][1] for n in names])
        for (kind, j), o in zip(outs, got):
            if kind == "alias":
                assert o == env[names[j]], f"{name}: alias of {names[j]}"
        env["h"] = got[0]  # the MoE intermediate feeds the second plug-in
    assert [(tuple(r.shape), _dt(r)) for r in res] == got


@pytest.mark.parametrize("op", sorted(_CHAINS))
def test_plugin_inputs_and_types_match_onnx_schema(op: str) -> None:
    """The plug-ins take the ONNX node's inputs (plus the MoE intermediate `h`), and their type lists
    put INT64 / FP32 / FP8 exactly where the schema fixes the type."""
    schema = SCHEMAS[_ONNX_NODE[op]]
    fixed = {"tensor(int64)": "INT64", "tensor(float)": "FP32", "tensor(float8e4m3fn)": "FP8"}
    want = {p.name: fixed.get(p.type_str, "FP32|BF16|FP16") for p in schema.inputs}
    want["h"] = "FP32"
    used = set()
    for name in _CHAINS[op]:
        names, outs = PLUGINS[name]
        types = [t.strip() for t in TYPE_COMBINATIONS[name].split(",")]
        assert len(types) == len(names) + len(outs), name
        for n, t in zip(names, types):
            assert t == want[n], f"{name}.{n}: {t}, schema says {want[n]}"
        used |= set(names)
    assert used - {"h"} == {p.name for p in schema.inputs}


def test_prepare_for_tensorrt(ort_engine_fp32: Path) -> None:
    m = onnx.load(str(ort_engine_fp32 / "graphs" / "gdn_decode.onnx"))
    p = prepare_for_tensorrt(m)
    onnx.checker.check_model(p)  # includes: nodes still topologically sorted after the MoE split
    nodes = [n for n in p.graph.node if n.domain == DOMAIN]
    assert [n.op_type for n in nodes] == ["CausalConv1d", "GatedDeltaRule", "MoERouter", "MoEGateUp", "MoEDown"]
    for n in nodes:
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in n.attribute}
        if n.op_type == "MoERouter":
            assert attrs == {"top_k": 4}
        else:
            assert attrs == {"plugin_namespace": b"qwen35", "plugin_version": b"1", "aot": 1}, n.op_type
            assert list(n.input) and all(i for i in n.input)
    up, down = nodes[3], nodes[4]
    moe = next(n for n in m.graph.node if n.op_type == "MoE")
    assert list(up.input) == [moe.input[0], moe.input[2], moe.input[3]]
    assert list(down.input) == [up.output[0], moe.input[1], moe.input[2], moe.input[4]]
    assert list(down.output) == list(moe.output)
    # plug-in nodes lose their bodies (else the parser imports the body); the router keeps its own
    assert {f.name for f in p.functions if f.domain == DOMAIN} == {"MoERouter"}
    assert {f.name for f in m.functions if f.domain == DOMAIN} == {"CausalConv1d", "GatedDeltaRule", "MoERouter",
                                                                  "MoE"}, "the input model is left alone"


def test_profile_shapes() -> None:
    assert profile_shapes((-1, -1, 256), 8, 512) == ((1, 1, 256), (4, 128, 256), (8, 512, 256))
    assert profile_shapes((-1, 1024, 3), 8, 512) == ((1, 1024, 3), (4, 1024, 3), (8, 1024, 3))
    assert profile_shapes((16, 256), 8, 512) == ((16, 256),) * 3


def test_builder_config_enables_aliased_plugin_io() -> None:
    """The state plug-ins declare aliased outputs: TensorRT builds them only with ALIASED_PLUGIN_IO_10_03 on
    (stand-ins for the tensorrt enums and IBuilderConfig record what builder_config sets)."""
    import types

    from qwen35_export.plugins.tensorrt.build import TARGET_CONFIGS, builder_config

    calls: list = []

    class Config:
        def __getattr__(self, name):
            return lambda *a, **k: calls.append((name, a))

    trt = types.SimpleNamespace(MemoryPoolType=types.SimpleNamespace(WORKSPACE="WORKSPACE"),
                                HardwareCompatibilityLevel=types.SimpleNamespace(NONE="NONE"),
                                PreviewFeature=types.SimpleNamespace(ALIASED_PLUGIN_IO_10_03="ALIASED_PLUGIN_IO"))
    config = builder_config(trt, types.SimpleNamespace(create_builder_config=Config), "h200", b"")
    assert ("set_preview_feature", ("ALIASED_PLUGIN_IO", True)) in calls
    assert ("set_memory_pool_limit", ("WORKSPACE", TARGET_CONFIGS["h200"].workspace_gib << 30)) in calls
    assert config.hardware_compatibility_level == "NONE"


@pytest.mark.skipif(HAVE_TRT, reason="checks the message on a machine without tensorrt")
def test_require_tensorrt_names_the_module() -> None:
    with pytest.raises(BuildError, match=r"the `tensorrt` Python module \(TensorRT >= 10\) cannot be imported"):
        require_tensorrt()


@pytest.mark.skipif(HAVE_TRT, reason="checks the message on a machine without tensorrt")
def test_loading_a_tensorrt_engine_names_the_module(ort_engine_fp32: Path, tmp_path: Path) -> None:
    """Engine.load dispatches on manifest.backend: a TensorRT engine goes to plugins/tensorrt/runtime.py."""
    import shutil

    from qwen35_export.errors import EngineError
    from qwen35_export.runtime.engine import Engine

    d = tmp_path / "e"
    shutil.copytree(ort_engine_fp32, d)
    m = json.loads((d / "manifest.json").read_text())
    m["backend"] = "tensorrt"
    (d / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(EngineError, match=r"--backend tensorrt: loading it needs the `tensorrt` Python module"):
        Engine.load(d)


def _run(code: str, interpret: bool) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    if interpret:
        env["TRITON_INTERPRET"] = "1"
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=240, env=env)
    assert p.returncode == 0, p.stderr[-3000:]
    return json.loads(p.stdout.strip().splitlines()[-1])


def test_aot_launches_match_reference() -> None:
    """tests/plugins/trt_sim.py: each plug-in's kernel, grid and extra arguments as its `aot_impl` picks
    them, launched in TensorRT's parameter order (states aliased in/out) through Triton's interpreter,
    against the reference ops: fp32 rounding-order differences only."""
    err = _run((HERE / "trt_sim.py").read_text(), interpret=True)
    assert err.pop("conv.in_place") == 0 and err.pop("gdr.in_place") == 0
    assert set(err) == {"conv.y", "conv.state", "gdr.o", "gdr.ht", "moe", "moe_fp8"}
    assert all(e <= 1e-5 for e in err.values()), err


_PTX = """
import json
from qwen35_export.plugins.tensorrt import aot_kernels as A
out = {}
for name, k in [("conv_bf16", A.causal_conv1d_kernel("bfloat16", "bfloat16", 4)),
                ("conv_fp32", A.causal_conv1d_kernel("float32", "float32", 4)),
                ("gdn_bf16", A.gated_delta_rule_kernel("bfloat16", 16, 64, 128, 128)),
                ("gdn_fp32", A.gated_delta_rule_kernel("float32", 2, 4, 128, 128)),
                ("moe_up_bf16", A.moe_gate_up_kernel("bfloat16", "bfloat16", 8)),
                ("moe_down_bf16", A.moe_down_kernel("bfloat16", "bfloat16", 8)),
                ("moe_up_fp8", A.moe_gate_up_kernel("bfloat16", "float8_e4m3fn", 8)),
                ("moe_down_fp8", A.moe_down_kernel("bfloat16", "float8_e4m3fn", 8))]:
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
    for name in PLUGINS:
        assert hasattr(trtp.op.qwen35, name)


@pytest.mark.parametrize("backend", [pytest.param("tensorrt", marks=[needs_trt, needs_sm90]),
                                     pytest.param("torch-tensorrt", marks=[needs_ttrt, needs_trt, needs_sm90])])
def test_tiny_engine_builds(backend: str, engine_ckpt_fp32: Path, tmp_path: Path) -> None:
    """torch-tensorrt compiles the attention, embed and final graphs itself (.ep); GDN takes the parser."""
    from qwen35_export.exporter.build import BuildSettings
    from qwen35_export.plugins.build import build_backend_engine
    from qwen35_export.runtime.engine import Engine
    from qwen35_export.runtime.sampling import SamplingParams

    out = build_backend_engine(engine_ckpt_fp32, tmp_path / "trt", BuildSettings(
        target="h100", backend=backend, dtype="bf16", max_batch=2, max_seq_len=32, progress=False))
    m = json.loads((out / "manifest.json").read_text())
    want = {n: ".engine" if backend == "tensorrt" or n.startswith("gdn") else ".ep" for n in m["graphs"]}
    assert m["backend"] == backend and {n: Path(g["file"]).suffix for n, g in m["graphs"].items()} == want
    assert len(Engine.load(out).generate([[5, 6, 7]], SamplingParams(max_new_tokens=4))[0]) == 4
