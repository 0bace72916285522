"""The torch-tensorrt path of the TensorRT backend (plugins/tensorrt/torch_trt.py). Without torch_tensorrt (CI):
which graphs take it, the op -> plug-in chains against specs.PLUGINS and onnx_prep's MoE split, the router
decomposition, the input ranges, the runtime's calling convention (saved programs behind Engine.load, with a
stand-in `torch_tensorrt` module: the programs run uncompiled), and the errors when the module is missing.
With torch_tensorrt: converter registration (the tiny sm_90 build is test_tensorrt.py's)."""

from __future__ import annotations

import shutil
import sys
import types
from pathlib import Path

import pytest
import torch
from onnx import helper
from safetensors.torch import load_file

from qwen35_export.checkpoint.reader import load_model_weights
from qwen35_export.cli import main as cli_main
from qwen35_export.config import FULL_ATTENTION, LINEAR_ATTENTION, preset
from qwen35_export.errors import BuildError, EngineError
from qwen35_export.exporter import capture as C
from qwen35_export.exporter.engine_dir import file_table
from qwen35_export.exporter.manifest import GraphEntry, Manifest
from qwen35_export.graph.quantize_fp8 import quantize_layer_fp8
from qwen35_export.model.model import Qwen35Model
from qwen35_export.model.weights import global_weight_shapes, layer_weight_shapes
from qwen35_export.plugins.build import functional_capture
from qwen35_export.plugins.onnx.schemas import DOMAIN
from qwen35_export.plugins.tensorrt import plugins as P
from qwen35_export.plugins.tensorrt import torch_trt as T
from qwen35_export.plugins.tensorrt.onnx_prep import prepare_for_tensorrt
from qwen35_export.plugins.tensorrt.runtime import TorchTrtGraph
from qwen35_export.plugins.tensorrt.specs import PLUGINS
from qwen35_export.runtime.engine import Engine
from qwen35_export.runtime.sampling import SamplingParams
from trt_markers import HAVE_TTRT, needs_ttrt


CFG = preset("tiny")
SHAPES = C.CaptureShapes(4, 32)
GDN_LAYER, ATTN_LAYER = CFG.layer_types.index(LINEAR_ATTENTION), CFG.layer_types.index(FULL_ATTENTION)


def _random(shapes: dict[str, tuple], seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {n: torch.randn(s, generator=g) * 0.05 for n, s in shapes.items()}


def _capture(fp8: bool = False):
    """functional_capture (the build's) over random tiny weights, on the CPU."""
    examples = {kind: _random(layer_weight_shapes(CFG, i), i) for kind, i in [(C.GDN, GDN_LAYER), (C.ATTN, ATTN_LAYER)]}
    if fp8:
        examples = {k: quantize_layer_fp8(w)[0] for k, w in examples.items()}
    return functional_capture(CFG, _random(global_weight_shapes(CFG), 99), examples, SHAPES, torch.float32,
                              torch.device("cpu"))


@pytest.fixture(scope="module")
def programs() -> dict[str, torch.export.ExportedProgram]:
    cap, cap8 = _capture(), _capture(fp8=True)
    entry = {n: GraphEntry("", k, p, []) for n, k, p in [("gdn_decode", C.GDN, C.DECODE), ("embed", C.EMBED, "any"),
                                                         ("attn_prefill", C.ATTN, C.PREFILL), ("final", C.FINAL, "any"),
                                                         ("attn_decode", C.ATTN, C.DECODE)]}
    out = {name: cap(e) for name, e in entry.items()}
    out["attn_decode_fp8"] = cap8(entry["attn_decode"])
    return out


@pytest.mark.parametrize("name,reason", [
    pytest.param("gdn_decode", "qwen35::CausalConv1d (qwen35::causal_conv1d) updates an input in place", id="gdn"),
    pytest.param("attn_decode_fp8", "qwen35::fp8_linear has no torch-tensorrt converter", id="attn-fp8"),
    pytest.param("attn_prefill", None, id="attn-prefill"), pytest.param("attn_decode", None, id="attn-decode"),
    pytest.param("embed", None, id="embed"), pytest.param("final", None, id="final")])
def test_route(programs: dict, name: str, reason: str | None) -> None:
    """GDN layers alias their states through the plug-ins (parser route); attention without FP8 linears,
    embed and final are compiled by torch-tensorrt."""
    why = T.route(programs[name])
    assert why == reason if reason is None else reason in why, why


def test_chains_cover_every_plugin_once() -> None:
    """Each plug-in of specs.PLUGINS serves one op; its inputs are that op's arguments by name (or `h`, the
    previous plug-in's output); every argument reaches a plug-in; the last plug-in gives the op's outputs."""
    assert sorted(p for chain in T.CHAINS.values() for p in chain) == sorted(PLUGINS)
    for op, chain in T.CHAINS.items():
        schema = getattr(torch.ops.qwen35, op).default._schema
        args, used = {a.name for a in schema.arguments}, set()
        for i, name in enumerate(chain):
            ins = PLUGINS[name][0]
            assert set(ins) <= args | ({"h"} if i else set()), (op, name)
            used |= set(ins)
        assert args <= used, op
        assert len(schema.returns) == len(PLUGINS[chain[-1]][1]), op


class _Layer:
    def __init__(self, i: int):
        self.i = i

    def get_output(self, j: int) -> tuple:
        return ("out", self.i, j)


@pytest.mark.parametrize("op,node", [("causal_conv1d", "CausalConv1d"), ("gated_delta_rule", "GatedDeltaRule"),
                                     ("moe_experts", "MoE"), ("moe_experts_fp8", "MoEFP8")])
def test_chain_wiring_matches_onnx_prep(op: str, node: str) -> None:
    """add_chain (the converter's body, with stand-ins for `trtp.op` and `add_plugin`) adds the plug-ins
    onnx_prep.py puts in the ONNX graph, in the same order, wired the same way."""
    args = [a.name for a in getattr(torch.ops.qwen35, op).default._schema.arguments]
    n_out = len(getattr(torch.ops.qwen35, op).default._schema.returns)
    onnx_node = helper.make_node(node, args, [f"y{j}" for j in range(n_out)], name="n", domain=DOMAIN)
    prepared = prepare_for_tensorrt(helper.make_model(helper.make_graph([onnx_node], "g", [], [])))
    made = {o: ("out", i, j) for i, n in enumerate(prepared.graph.node) for j, o in enumerate(n.output)}
    want = [(n.op_type, [made.get(x, x) for x in n.input]) for n in prepared.graph.node]

    calls: list = []

    def add(name: str, call: tuple) -> _Layer:
        assert name == call[0]
        calls.append(call)
        return _Layer(len(calls) - 1)

    trtp = types.SimpleNamespace(op=types.SimpleNamespace(qwen35=types.SimpleNamespace(
        **{p: (lambda *ins, p=p: (p, list(ins))) for p in PLUGINS})))
    outs = T.add_chain(trtp, add, op, {a: a for a in args})
    assert calls == want
    assert outs == [made[o] for o in prepared.graph.node[-1].output]


@pytest.mark.parametrize("name,ops", [("attn_decode", {"moe_router", "decode_attention"}),
                                      ("gdn_decode", {"moe_router", "gated_rms_norm"})])
def test_decompositions_match_reference(programs: dict, name: str, ops: set[str]) -> None:
    """prepare() leaves no moe_router / decode_attention / gated_rms_norm node (standard ops instead) and
    changes no result."""
    ep = programs[name]
    prepared = T.prepare(ep)
    assert ops <= set(T.qwen35_ops(ep)) and ops <= set(T.DECOMPOSITIONS)
    assert T.qwen35_ops(prepared) == [op for op in T.qwen35_ops(ep) if op not in T.DECOMPOSITIONS]
    assert any(n.target == torch.ops.aten.topk.default for n in prepared.graph.nodes)
    g = torch.Generator().manual_seed(3)
    args = [torch.randn(a.shape, generator=g) if a.is_floating_point() else a for a in ep.example_inputs[0]]
    for a, b in zip(ep.module()(*args), prepared.module()(*args)):
        assert torch.equal(a, b)


def test_input_specs(programs: dict) -> None:
    """Batch dims range over 1..max_batch and the prefill tokens over 1..max_seq_len; every other dim is the
    capture's. x is dynamic in batch and tokens, the caches and per-row vectors in batch, weights not at all."""
    ep = programs["attn_prefill"]
    specs = T.input_specs(ep, SHAPES.max_batch, SHAPES.max_seq_len)
    names = list(ep.graph_signature.user_inputs)
    for name, (lo, opt, hi, dt), ex in zip(names, specs, ep.example_inputs[0]):
        dyn = {"x": {0, 1}, "start": {0}, "lengths": {0}, "k_cache": {0}, "v_cache": {0}}.get(name, set())
        assert dt == ex.dtype, name
        for ax, n in enumerate(ex.shape):
            if ax in dyn:
                top = SHAPES.max_batch if ax == 0 else SHAPES.max_seq_len
                assert (lo[ax], hi[ax]) == (1, top) and 1 <= opt[ax] <= top, (name, ax)
            else:
                assert lo[ax] == opt[ax] == hi[ax] == n, (name, ax)


def test_state_inputs_follow_the_functional_outputs(programs: dict) -> None:
    """The inputs whose new values follow the main output are the states, by name; programs without
    states return one output."""
    for name, kind in [("attn_decode", C.ATTN), ("gdn_decode", C.GDN), ("embed", C.EMBED)]:
        user = list(programs[name].graph_signature.user_inputs)
        assert [user[i] for i in T.state_inputs(programs[name], kind)] == list(T.STATES.get(kind, ()))
    with pytest.raises(BuildError, match=r"attn program: expected state inputs \['k_cache', 'v_cache'\]"):
        T.state_inputs(programs["embed"], C.ATTN)


@pytest.fixture(scope="module")
def ep_engine(ort_engine_fp32: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny cpu ONNX engine with every graph replaced by its program as torch_trt.compile_program would
    hand it to torch-tensorrt (prepared, captured by the build's functional_capture), saved uncompiled as
    `graphs/<name>.ep` with its states file; manifest backend torch-tensorrt."""
    d = tmp_path_factory.mktemp("ttrt") / "engine"
    shutil.copytree(ort_engine_fp32, d)
    man = Manifest.load(d)
    first = {C.GDN if t == LINEAR_ATTENTION else C.ATTN: i for i, t in reversed(list(enumerate(CFG.layer_types)))}
    examples = {k: load_file(str(d / man.layer_files[i])) for k, i in first.items()}
    capture = functional_capture(CFG, load_file(str(d / man.globals_file)), examples,
                                 C.CaptureShapes(man.max_batch, man.max_seq_len), torch.float32, torch.device("cpu"))
    for name, entry in man.graphs.items():
        ep = T.prepare(capture(entry))
        torch.export.save(ep, str(d / "graphs" / f"{name}.ep"))
        T.save_states(ep, entry.kind, d / "graphs" / f"{name}.ep")
        entry.file = f"graphs/{name}.ep"
    man.backend = "torch-tensorrt"
    (d / "manifest.json").unlink()  # the file table lists everything but the manifest (plugins/build.py _finish)
    man.files = file_table(d)
    man.save(d / "manifest.json")
    return d


def test_engine_runs_saved_programs(ep_engine: Path, engine_ckpt_fp32: Path, monkeypatch) -> None:
    """Engine.load dispatches `.ep` graphs to TorchTrtGraph, which registers the plug-ins and copies the
    returned states back: greedy tokens identical to the fp32 reference (prefill and decode)."""
    monkeypatch.setitem(sys.modules, "torch_tensorrt", types.ModuleType("torch_tensorrt"))
    registered = []
    monkeypatch.setattr(P, "register_plugins", lambda: registered.append(1))
    engine = Engine.load(ep_engine)
    assert all(isinstance(g, TorchTrtGraph) for g in engine.graphs.values()) and registered
    prompts, gen = [[5, 6, 7, 8, 9, 10, 11], [3], [100, 200, 300]], 12
    ref = Qwen35Model(load_model_weights(engine_ckpt_fp32, torch.float32, progress=False))
    assert engine.generate(prompts, SamplingParams(max_new_tokens=gen)) == ref.generate_greedy(prompts, gen)


@pytest.mark.skipif(HAVE_TTRT, reason="checks the message on a machine without torch_tensorrt")
def test_loading_names_the_module(ep_engine: Path) -> None:
    with pytest.raises(EngineError, match=r"--backend torch-tensorrt; loading it needs the `torch_tensorrt` Python "
                                          r"module"):
        Engine.load(ep_engine)


@pytest.mark.skipif(HAVE_TTRT, reason="checks the message on a machine without torch_tensorrt")
def test_require_torch_tensorrt_names_the_module() -> None:
    with pytest.raises(BuildError, match=r"--backend torch-tensorrt: the `torch_tensorrt` Python module cannot be "
                                         r"imported"):
        T.require_torch_tensorrt()


@pytest.mark.parametrize("target,message", [
    pytest.param("cpu", "--backend torch-tensorrt: TensorRT engines run on NVIDIA GPUs", id="cpu"),
    pytest.param("h100", "--backend torch-tensorrt: the `torch_tensorrt` Python module cannot be imported", id="h100",
                 marks=pytest.mark.skipif(HAVE_TTRT, reason="checks the message on a machine without "
                                                            "torch_tensorrt"))])
def test_cli_build_backend_torch_tensorrt(engine_ckpt_fp32: Path, tmp_path: Path, capsys, target: str,
                                          message: str) -> None:
    """`build --backend torch-tensorrt` reaches build_backend_engine and fails before writing anything."""
    out = tmp_path / "engine"
    rc = cli_main(["build", str(engine_ckpt_fp32), "--target", target, "--backend", "torch-tensorrt",
                   "--out", str(out)])
    assert rc == 2 and message in capsys.readouterr().err
    assert not out.exists() and not list(tmp_path.iterdir())


@needs_ttrt
def test_converters_register() -> None:
    from torch_tensorrt.dynamo.conversion._ConverterRegistry import DYNAMO_CONVERTERS

    T.register_converters()
    for op in T.CHAINS:
        assert getattr(torch.ops.qwen35, op).default in DYNAMO_CONVERTERS, op

