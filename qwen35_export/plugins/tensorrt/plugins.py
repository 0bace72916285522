"""Quickly Deployable Plugins (`tensorrt.plugin`, TensorRT >= 10) for the `qwen35` ONNX nodes.

For each plug-in `qwen35::<Node>`:
- `trt.plugin.register`: output descriptors from specs.PLUGIN_OUTPUTS (`like` = new buffer of the input's
  shape and dtype, `alias` = the input's buffer updated in place: the GDN and conv states);
- `trt.plugin.autotune`: the type combinations of specs.TYPE_COMBINATIONS, linear layout;
- `trt.plugin.aot_impl` (CausalConv1d, GatedDeltaRule): our Triton kernels compiled to PTX
  (aot_kernels.py), so engines run without Python;
- `trt.plugin.impl` (all four): the JIT path through our `qwen35_triton` torch ops. MoE and MoEFP8 have
  only this one (four kernels, see aot_kernels.py), so engines holding them need Python at run time.

Nothing here runs without the `tensorrt` module; `register_plugins()` imports it.
"""

from __future__ import annotations

from typing import Any

from . import aot_kernels as A
from .specs import NAMESPACE, PLUGIN_OUTPUTS, TYPE_COMBINATIONS

_registered = False


def _dtype_name(trt: Any, dtype: Any) -> str:
    names = {trt.float32: "float32", trt.bfloat16: "bfloat16", trt.float16: "float16", trt.int64: "int64"}
    return names[dtype]


def _const(expr: Any, what: str) -> int:
    """A dim that must be fixed when the engine is built (weights' dims): kernels specialise on it."""
    if not expr.is_constant:
        raise ValueError(f"{what}: expected a build-time constant dimension")
    return int(expr.constant_value)


def _outputs(name: str, inputs: tuple) -> tuple:
    return tuple(inputs[j].like() if kind == "like" else inputs[j].aliased() for kind, j in PLUGIN_OUTPUTS[name])


def _launch(trtp: Any, compiled: Any, grid: tuple, extra: tuple) -> tuple:
    """The (kernel name, PTX, launch params, extra args) an `aot_impl` returns."""
    launch = trtp.KernelLaunchParams()
    launch.grid_x, launch.grid_y, launch.grid_z = (grid + (1, 1))[:3]
    launch.block_x = compiled.metadata.num_warps * 32
    launch.shared_mem = compiled.metadata.shared
    args = trtp.SymIntExprs(len(extra))
    for i, e in enumerate(extra):
        args[i] = trtp.SymInt32(e)
    return compiled.metadata.name, compiled.asm["ptx"], launch, args


def _jit(op_name: str, inputs: tuple, outputs: tuple, stream: int) -> None:
    """Run `torch.ops.qwen35_triton.<op_name>` on TensorRT's buffers and stream; copy into the outputs
    (for aliased outputs that is the in-place state update)."""
    import torch

    import qwen35_export.kernels.causal_conv1d.op  # noqa: F401  (registers the qwen35_triton ops)
    import qwen35_export.kernels.gated_delta_rule.op  # noqa: F401
    import qwen35_export.kernels.moe.ops  # noqa: F401

    with torch.cuda.stream(torch.cuda.ExternalStream(stream)):
        args = [torch.as_tensor(t, device="cuda") for t in inputs]
        res = getattr(torch.ops.qwen35_triton, op_name)(*args)
        res = res if isinstance(res, tuple) else (res,)
        for out, r in zip(outputs, res):
            torch.as_tensor(out, device="cuda").copy_(r)


def register_plugins() -> None:
    """Register the plug-ins with TensorRT's QDP registry (once per process)."""
    global _registered
    if _registered:
        return
    import tensorrt as trt
    import tensorrt.plugin as trtp

    def combos(name: str):
        return [trtp.AutoTuneCombination(TYPE_COMBINATIONS[name], "LINEAR")]

    # -- CausalConv1d --------------------------------------------------------------------------------
    conv = f"{NAMESPACE}::CausalConv1d"

    @trtp.register(conv)
    def _conv_desc(x: trtp.TensorDesc, weight: trtp.TensorDesc, conv_state: trtp.TensorDesc,
                   lengths: trtp.TensorDesc) -> tuple[trtp.TensorDesc, trtp.TensorDesc]:
        return _outputs("CausalConv1d", (x, weight, conv_state, lengths))

    @trtp.autotune(conv)
    def _conv_tune(x, weight, conv_state, lengths, outputs):
        return combos("CausalConv1d")

    @trtp.aot_impl(conv)
    def _conv_aot(x, weight, conv_state, lengths, outputs, tactic):
        W = _const(weight.shape_expr[1], "CausalConv1d weight [C, W]")
        k = A.causal_conv1d_kernel(_dtype_name(trt, x.dtype), _dtype_name(trt, conv_state.dtype), W)
        grid, extra = A.causal_conv1d_launch(x.shape_expr[0], x.shape_expr[1], x.shape_expr[2])
        return _launch(trtp, A.compile_ptx(k), grid, extra)

    @trtp.impl(conv)
    def _conv_jit(x, weight, conv_state, lengths, outputs, stream):
        _jit("causal_conv1d", (x, weight, conv_state, lengths), outputs, stream)

    # -- GatedDeltaRule ------------------------------------------------------------------------------
    gdr = f"{NAMESPACE}::GatedDeltaRule"

    @trtp.register(gdr)
    def _gdr_desc(q: trtp.TensorDesc, k: trtp.TensorDesc, v: trtp.TensorDesc, g: trtp.TensorDesc,
                  beta: trtp.TensorDesc, h0: trtp.TensorDesc) -> tuple[trtp.TensorDesc, trtp.TensorDesc]:
        return _outputs("GatedDeltaRule", (q, k, v, g, beta, h0))

    @trtp.autotune(gdr)
    def _gdr_tune(q, k, v, g, beta, h0, outputs):
        return combos("GatedDeltaRule")

    @trtp.aot_impl(gdr)
    def _gdr_aot(q, k, v, g, beta, h0, outputs, tactic):
        H, K = _const(q.shape_expr[2], "q heads"), _const(q.shape_expr[3], "q head dim")
        HV, V = _const(v.shape_expr[2], "v heads"), _const(v.shape_expr[3], "v head dim")
        kern = A.gated_delta_rule_kernel(_dtype_name(trt, v.dtype), H, HV, K, V)
        grid, extra = A.gated_delta_rule_launch(q.shape_expr[0], q.shape_expr[1], HV, V, kern.constexprs["BV"])
        return _launch(trtp, A.compile_ptx(kern), grid, extra)

    @trtp.impl(gdr)
    def _gdr_jit(q, k, v, g, beta, h0, outputs, stream):
        _jit("gated_delta_rule", (q, k, v, g, beta, h0), outputs, stream)

    # -- MoE (BF16) and MoEFP8 (e4m3, 128x128 block scales): JIT only ----------------------------------
    moe = f"{NAMESPACE}::MoE"

    @trtp.register(moe)
    def _moe_desc(x: trtp.TensorDesc, weights: trtp.TensorDesc, ids: trtp.TensorDesc, w_gate_up: trtp.TensorDesc,
                  w_down: trtp.TensorDesc) -> trtp.TensorDesc:
        return _outputs("MoE", (x, weights, ids, w_gate_up, w_down))[0]

    @trtp.autotune(moe)
    def _moe_tune(x, weights, ids, w_gate_up, w_down, outputs):
        return combos("MoE")

    @trtp.impl(moe)
    def _moe_jit(x, weights, ids, w_gate_up, w_down, outputs, stream):
        _jit("moe_experts", (x, weights, ids, w_gate_up, w_down), outputs, stream)

    moe8 = f"{NAMESPACE}::MoEFP8"

    @trtp.register(moe8)
    def _moe8_desc(x: trtp.TensorDesc, weights: trtp.TensorDesc, ids: trtp.TensorDesc,
                   w_gate_up: trtp.TensorDesc, w_gate_up_scale: trtp.TensorDesc, w_down: trtp.TensorDesc,
                   w_down_scale: trtp.TensorDesc) -> trtp.TensorDesc:
        return _outputs("MoEFP8", (x, weights, ids, w_gate_up, w_gate_up_scale, w_down, w_down_scale))[0]

    @trtp.autotune(moe8)
    def _moe8_tune(x, weights, ids, w_gate_up, w_gate_up_scale, w_down, w_down_scale, outputs):
        return combos("MoEFP8")

    @trtp.impl(moe8)
    def _moe8_jit(x, weights, ids, w_gate_up, w_gate_up_scale, w_down, w_down_scale, outputs, stream):
        _jit("moe_experts_fp8", (x, weights, ids, w_gate_up, w_gate_up_scale, w_down, w_down_scale), outputs,
             stream)

    _registered = True
