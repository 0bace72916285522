"""Quickly Deployable Plugins (`tensorrt.plugin`, TensorRT >= 10) for the `qwen35` ONNX nodes.

For each plug-in `qwen35::<Name>` of specs.PLUGINS:
- `trt.plugin.register`: output descriptors from the table (`like` = a new buffer of an input's shape and
  dtype, `alias` = the input's buffer updated in place: the GDN and conv states; the MoE intermediates);
- `trt.plugin.autotune`: the type combinations of specs.TYPE_COMBINATIONS, linear layout;
- `trt.plugin.aot_impl`: our Triton kernels (through the adapters in aot_kernels.py) compiled to PTX,
  returned with symbolic launch parameters and extra scalar arguments. No Python runs in the engine.

Nothing here runs without the `tensorrt` module; `register_plugins()` imports it.
"""

from __future__ import annotations

from typing import Any, Tuple

from . import aot_kernels as A
from .specs import NAMESPACE, PLUGINS, TYPE_COMBINATIONS

_registered = False


def _dtype_name(trt: Any, dtype: Any) -> str:
    names = {trt.float32: "float32", trt.bfloat16: "bfloat16", trt.float16: "float16", trt.int64: "int64",
             trt.fp8: "float8_e4m3fn"}
    return names[dtype]


def _const(expr: Any, what: str) -> int:
    """A dim that must be fixed when the engine is built (weights' dims, top-k): kernels specialise on it."""
    if not expr.is_constant:
        raise ValueError(f"{what}: expected a build-time constant dimension")
    return int(expr.constant_value)


def _outputs(trt: Any, trtp: Any, name: str, inputs: tuple) -> tuple:
    out = []
    for kind, j in PLUGINS[name][1]:
        if kind == "like":
            out.append(inputs[j].like())
        elif kind == "alias":
            out.append(inputs[j].aliased())
        elif kind == "moe_hidden":  # x [N, H], ids [N, k], w_gate_up [E, 2I, H] -> [N, k, I] fp32
            x, ids, w13 = inputs[:3]
            shape = trtp.ShapeExprs.from_tuple((x.shape_expr[0], ids.shape_expr[1], w13.shape_expr[1] // 2))
            out.append(trtp.from_shape_expr(shape, dtype=trt.float32))
        else:  # moe_out: h [N, k, I], weights [N, k], w_down [E, H, I] -> [N, H] like weights' dtype
            h, weights, w2 = inputs[0], inputs[1], inputs[3]
            shape = trtp.ShapeExprs.from_tuple((h.shape_expr[0], w2.shape_expr[1]))
            out.append(trtp.from_shape_expr(shape, dtype=weights.dtype))
    return tuple(out)


def _launch(trtp: Any, kernel: A.AotKernel, grid: tuple, extra: tuple) -> tuple:
    """The (kernel name, PTX, launch params, extra args) an `aot_impl` returns."""
    compiled = A.compile_ptx(kernel)
    launch = trtp.KernelLaunchParams()
    launch.grid_x, launch.grid_y, launch.grid_z = (tuple(grid) + (1, 1))[:3]
    launch.block_x = compiled.metadata.num_warps * 32
    launch.shared_mem = compiled.metadata.shared
    args = trtp.SymIntExprs(len(extra))
    for i, e in enumerate(extra):
        args[i] = trtp.SymInt32(e)
    return compiled.metadata.name, compiled.asm["ptx"], launch, args


def _aot_kernel(trt: Any, name: str, inputs: tuple) -> tuple[A.AotKernel, tuple, tuple]:
    """(kernel, grid, extras) of plug-in `name` for these input descriptors."""
    dt = [_dtype_name(trt, t.dtype) for t in inputs]
    if name == "CausalConv1d":
        x, weight = inputs[0], inputs[1]
        k = A.causal_conv1d_kernel(dt[0], dt[2], _const(weight.shape_expr[1], "CausalConv1d weight [C, W]"))
        return (k, *A.causal_conv1d_launch(x.shape_expr[0], x.shape_expr[1], x.shape_expr[2]))
    if name == "GatedDeltaRule":
        q, v = inputs[0], inputs[2]
        H, K = _const(q.shape_expr[2], "q heads"), _const(q.shape_expr[3], "q head dim")
        HV, V = _const(v.shape_expr[2], "v heads"), _const(v.shape_expr[3], "v head dim")
        k = A.gated_delta_rule_kernel(dt[2], H, HV, K, V)
        return (k, *A.gated_delta_rule_launch(q.shape_expr[0], q.shape_expr[1], HV, V, k.constexprs["BV"]))
    top_k = _const(inputs[1 if name.startswith("MoEGateUp") else 2].shape_expr[1], "ids [N, k]")
    if name.startswith("MoEGateUp"):
        x, w13 = inputs[0], inputs[2]
        k = A.moe_gate_up_kernel(dt[0], dt[2], top_k)
        return (k, *A.moe_gate_up_launch(x.shape_expr[0], top_k, x.shape_expr[1], w13.shape_expr[1] // 2))
    h, w2 = inputs[0], inputs[3]
    k = A.moe_down_kernel(dt[1], dt[3], top_k)
    return (k, *A.moe_down_launch(h.shape_expr[0], w2.shape_expr[1], w2.shape_expr[2]))


def _register_one(trt: Any, trtp: Any, name: str) -> None:
    """register + autotune + aot_impl for one plug-in. QDP reads the input names from the decorated
    function's signature, so each gets a function with exactly the plug-in's input names."""
    pid = f"{NAMESPACE}::{name}"
    ins = PLUGINS[name][0]
    args = ", ".join(ins)
    ret = f"Tuple[{', '.join(['trtp.TensorDesc'] * len(PLUGINS[name][1]))}]"
    ns: dict[str, Any] = {"trtp": trtp, "Tuple": Tuple}
    src = (f"def desc({', '.join(i + ': trtp.TensorDesc' for i in ins)}) -> {ret}:\n    return _f(({args},))\n"
           f"def tune({args}, outputs):\n    return _t\n"
           f"def aot({args}, outputs, tactic):\n    return _a(({args},))\n")
    # dont_inherit: real annotation objects (this module's `from __future__ import annotations` would
    # turn them into strings)
    exec(compile(src, f"<qwen35 plug-in {name}>", "exec", dont_inherit=True), ns)
    ns["_f"] = lambda inputs: _outputs(trt, trtp, name, inputs)
    ns["_t"] = [trtp.AutoTuneCombination(TYPE_COMBINATIONS[name], "LINEAR")]
    ns["_a"] = lambda inputs: _launch(trtp, *_aot_kernel(trt, name, inputs))
    trtp.register(pid)(ns["desc"])
    trtp.autotune(pid)(ns["tune"])
    trtp.aot_impl(pid)(ns["aot"])


def register_plugins() -> None:
    """Register every plug-in of specs.PLUGINS with TensorRT's QDP registry (once per process)."""
    global _registered
    if _registered:
        return
    import tensorrt as trt
    import tensorrt.plugin as trtp

    for name in PLUGINS:
        _register_one(trt, trtp, name)
    _registered = True
