"""The torch-tensorrt path of the TensorRT backend (`build --backend torch-tensorrt`): a graph whose `qwen35`
ops all convert here is compiled from its ExportedProgram by `torch_tensorrt.dynamo.compile`; the others
take build.py's ONNX parser route. Same plug-ins: the converters add the QDP plug-ins of plugins.py.

- Converters (`torch_tensorrt.dynamo.conversion.dynamo_tensorrt_converter`): each op of CHAINS becomes its
  plug-ins, `INetworkDefinition.add_plugin(trtp.op.qwen35.<Name>(...), aot=True)`, inputs by name from the
  op's schema, MoE split in two as onnx_prep.py splits it. `plugins.custom_op` / `generate_plugin_converter`
  do not fit: they bind torch op `ns::name` to the plug-in of that same id, tensors by position (and
  `custom_op` generates a JIT plug-in from the fake kernel: a second set).
- `moe_router` and `decode_attention` become standard ops before compiling, as in their ONNX forms.
- `route`: a program comes here when every qwen35 op in it converts and none of its plug-ins aliases an
  input: aliased plug-in I/O needs TensorRT's ALIASED_PLUGIN_IO_10_03 preview feature, which build.py's
  builder config sets and torch-tensorrt's compile cannot (pytorch/TensorRT#4240; in-place plug-ins are
  its open PR #4279). So attention (without `fp8_linear`, whose block dequantisation is written as ONNX
  DequantizeLinear), embed and final come here; the GDN layers stay on the parser route.
- Compile: strongly typed (`use_explicit_typing`), one engine per graph, build.TARGET_CONFIGS' workspace
  and optimisation level, build.profile_shapes' batch/token ranges, the parser route's timing cache file.
  `torch_tensorrt.save` writes `graphs/<name>.ep`; `<name>.states.json` lists the state inputs whose new
  values follow the main output, which runtime.py copies back (a full KV-cache copy per attention layer
  and step, as the parser route's `.next` outputs cost).

Written to the public torch-tensorrt API (2.x over TensorRT >= 10); never run: neither torch_tensorrt nor
the TensorRT builder can be installed on our machines.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable

import torch
from torch.export import ExportedProgram

from ...config import Qwen35Config
from ...errors import BuildError
from ...exporter import capture as C
from ...exporter.build import BuildSettings, check_target
from ...exporter.manifest import GraphEntry
from ...model.ops import INLINE_OPS, LIB, decode_attention_math, moe_router_math
from . import build as B
from .specs import NAMESPACE, PLUGINS

# qwen35 op -> the plug-ins its converter adds, in order; input `h` of a later one is the earlier one's output
CHAINS: dict[str, tuple[str, ...]] = {
    "causal_conv1d": ("CausalConv1d",), "gated_delta_rule": ("GatedDeltaRule",),
    "moe_experts": ("MoEGateUp", "MoEDown"), "moe_experts_fp8": ("MoEGateUpFP8", "MoEDownFP8")}


def _overload(op: str) -> Any:
    return getattr(getattr(torch.ops, LIB), op).default


# qwen35 ops replaced by standard ops before compiling (TensorRT has layers for them), as their ONNX forms are
DECOMPOSITIONS: dict[str, Callable] = {"moe_router": moe_router_math, "decode_attention": decode_attention_math,
                                       **INLINE_OPS}

# The state inputs of a layer kind, by name: its functional program (plugins/onnx/export.py) returns their
# new values after the main output, in this order.
STATES = {C.GDN: ("conv_state", "rec_state"), C.ATTN: ("k_cache", "v_cache")}


def require_torch_tensorrt() -> Any:
    """The `torch_tensorrt` module, or a BuildError naming it."""
    try:
        import torch_tensorrt
    except ImportError as e:
        raise BuildError(f"--backend torch-tensorrt: the `torch_tensorrt` Python module cannot be imported here "
                         f"({e}). Install torch-tensorrt built for torch {torch.__version__} (TensorRT >= "
                         f"{B.MIN_MAJOR}) on a machine with an sm_90 GPU, or build with --backend tensorrt / "
                         "onnxruntime / aoti.") from None
    return torch_tensorrt


def qwen35_ops(ep: ExportedProgram) -> list[str]:
    """Names of the `qwen35` ops in `ep`'s graph."""
    return sorted({n.target.name().split("::")[1] for n in ep.graph.nodes
                   if n.op == "call_function" and getattr(n.target, "namespace", None) == LIB})


def route(ep: ExportedProgram) -> str | None:
    """None when torch-tensorrt compiles `ep`; else why it takes the ONNX parser route."""
    for op in qwen35_ops(ep):
        if op in DECOMPOSITIONS:
            continue
        if op not in CHAINS:
            return f"{LIB}::{op} has no torch-tensorrt converter"
        aliased = [p for p in CHAINS[op] if any(kind == "alias" for kind, _ in PLUGINS[p][1])]
        if aliased:
            return (f"plug-in {NAMESPACE}::{aliased[0]} ({LIB}::{op}) updates an input in place, and torch-tensorrt "
                    "cannot build aliased plug-in I/O (pytorch/TensorRT#4240)")
    return None


def add_chain(trtp: Any, add_plugin: Callable[[str, Any], Any], op: str, tensors: dict[str, Any]) -> list:
    """Add the plug-ins of `op` (tensors: its arguments by name) through `add_plugin(name, plugin call) ->
    layer`; returns the last plug-in's outputs, which are the op's."""
    env = dict(tensors)
    for name in CHAINS[op]:
        ins, outs = PLUGINS[name]
        layer = add_plugin(name, getattr(getattr(trtp.op, NAMESPACE), name)(*[env[i] for i in ins]))
        results = [layer.get_output(i) for i in range(len(outs))]
        env["h"] = results[0]  # the MoE intermediate, input of MoEDown(FP8)
    return results


def _converter(trtp: Any, get_trt_tensor: Callable, op: str) -> Callable:
    schema = _overload(op)._schema
    names, n_out = [a.name for a in schema.arguments], len(schema.returns)

    def convert(ctx: Any, target: Any, args: tuple, kwargs: dict, name: str) -> Any:
        vals = {**dict(zip(names, args)), **kwargs}
        tensors = {k: get_trt_tensor(ctx, v, f"{name}.{k}") for k, v in vals.items()}

        def add(plugin: str, call: Any) -> Any:
            layer = ctx.net.add_plugin(call, aot=True)  # plugins.py's AOT PTX: no Python in the engine
            layer.name = f"{name}.{plugin}"
            return layer

        outs = add_chain(trtp, add, op, tensors)
        return outs[0] if n_out == 1 else tuple(outs)

    return convert


_registered = False


def register_converters() -> None:
    """Our QDP plug-ins (plugins.register_plugins) and a converter for each op of CHAINS (once per process)."""
    global _registered
    if _registered:
        return
    import tensorrt.plugin as trtp
    from torch_tensorrt.dynamo.conversion import dynamo_tensorrt_converter
    from torch_tensorrt.dynamo.conversion.converter_utils import get_trt_tensor

    from .plugins import register_plugins

    register_plugins()
    for op in CHAINS:
        dynamo_tensorrt_converter(_overload(op), supports_dynamic_shapes=True)(_converter(trtp, get_trt_tensor, op))
    _registered = True


def prepare(ep: ExportedProgram) -> ExportedProgram:
    """`ep` with the ops of DECOMPOSITIONS replaced by standard ops."""
    return ep.run_decompositions({_overload(op): fn for op, fn in DECOMPOSITIONS.items()})


def _user_inputs(ep: ExportedProgram) -> list[torch.Tensor]:
    """The fake tensor of each user input, in call order."""
    nodes = {n.name: n for n in ep.graph.nodes if n.op == "placeholder"}
    return [nodes[name].meta["val"] for name in ep.graph_signature.user_inputs]


def input_specs(ep: ExportedProgram, max_batch: int, max_seq_len: int) -> list[tuple[tuple, tuple, tuple, Any]]:
    """(min, opt, max shape, dtype) of each user input: the symbolic dims get build.profile_shapes's ranges."""
    return [(*B.profile_shapes(tuple(d if isinstance(d, int) else -1 for d in v.shape), max_batch, max_seq_len),
             v.dtype) for v in _user_inputs(ep)]


def state_inputs(ep: ExportedProgram, kind: str) -> list[int]:
    """Positions of the state inputs whose new values `ep` returns after its main output."""
    user, states = list(ep.graph_signature.user_inputs), STATES.get(kind, ())
    n_out = len(ep.graph_signature.user_outputs)
    if not set(states) <= set(user) or n_out != 1 + len(states):
        raise BuildError(f"{kind} program: expected state inputs {list(states)} and {1 + len(states)} outputs, "
                         f"found inputs {user[:len(states) + 3]}... and {n_out} outputs")
    return [user.index(s) for s in states]


def save_states(ep: ExportedProgram, kind: str, path: Path) -> None:
    """`<path stem>.states.json` beside the saved program `path`, read by runtime.TorchTrtGraph."""
    path.with_suffix(".states.json").write_text(json.dumps({"state_inputs": state_inputs(ep, kind)}))


def compile_program(ttrt: Any, ep: ExportedProgram, kind: str, settings: BuildSettings, path: Path,
                    timing_cache: Path) -> None:
    """Compile one functional program (capture on the GPU) into `path` (.ep) and its states file."""
    ep = prepare(ep)
    t = B.TARGET_CONFIGS[settings.target]
    inputs = [ttrt.Input(min_shape=lo, opt_shape=opt, max_shape=hi, dtype=dt)
              for lo, opt, hi, dt in input_specs(ep, settings.max_batch, settings.max_seq_len)]
    gm = ttrt.dynamo.compile(
        ep, arg_inputs=inputs, device=torch.device("cuda", torch.cuda.current_device()),
        use_explicit_typing=True,  # strongly typed, as the parser route's network (enabled_precisions unset)
        min_block_size=1, require_full_compilation=True,  # one engine: an op without converter fails the build
        workspace_size=t.workspace_gib << 30, optimization_level=t.optimization_level,
        timing_cache_path=str(timing_cache),
        use_python_runtime=False)  # the C++ runtime: ExportedProgram serialisation needs it
    # retrace=False saves the compiled graph with its symbolic batch/token dims; a retrace from the example
    # inputs would need every dim's range again (dynamic_shapes) or fix them to the example sizes
    ttrt.save(gm, str(path), output_format="exported_program", arg_inputs=list(ep.example_inputs[0]),
              retrace=False)
    save_states(ep, kind, path)


def compile_graphs(tmp: Path, graphs_dir: Path, entries: dict[str, GraphEntry], cfg: Qwen35Config,
                   settings: BuildSettings, capture: Callable[[GraphEntry], ExportedProgram]
                   ) -> tuple[dict[str, str], dict[str, str]]:
    """plugins/build.py's Compiler for --backend torch-tensorrt: `graphs/<name>.ep` for each graph `route`
    admits (captured again by `capture`), `graphs/<name>.engine` (build.compile_graphs) for the others."""
    ttrt = require_torch_tensorrt()
    check_target(settings.target)
    register_converters()
    cache = graphs_dir / "timing_cache.bin"  # build.compile_graphs reads it next: one cache per build
    files: dict[str, str] = {}
    parser: dict[str, GraphEntry] = {}
    for name, entry in entries.items():
        ep = capture(entry)
        why = route(ep)
        if settings.progress:
            print(f"{name}: " + ("torch-tensorrt" if why is None else f"ONNX parser route ({why})"))
        if why is not None:
            parser[name] = entry
            continue
        compile_program(ttrt, ep, entry.kind, settings, graphs_dir / f"{name}.ep", cache)
        files[name] = f"graphs/{name}.ep"
    more, versions = B.compile_graphs(tmp, graphs_dir, parser, cfg, settings)
    return {**files, **more}, {**versions, "torch_tensorrt": ttrt.__version__}
