"""Simulate TensorRT's AOT plug-in launches (prints JSON errors): on the CPU with TRITON_INTERPRET=1 (CI),
or compiled on a GPU with `python tests/plugins/trt_sim.py cuda`.

For each plug-in, the descriptors TensorRT would hand `aot_impl` are built from torch tensors (static
shapes, so every shape expression is a constant), `plugins._aot_kernel` picks the kernel, grid and extra
arguments exactly as the `aot_impl` does, output buffers are made per specs.describe (aliased outputs
are the input tensors themselves), and the kernel is launched the way TensorRT launches it:
`kernel[grid](*inputs, *extras, *outputs)`. The results are compared with the torch reference ops.
"""

from __future__ import annotations

import json
import sys
import types

import torch

from qwen35_export.checkpoint.fp8 import quantize_fp8_block
from qwen35_export.model import ops
from qwen35_export.plugins.tensorrt import plugins as P
from qwen35_export.plugins.tensorrt.specs import PLUGINS, describe

# stand-ins for tensorrt's DataType members (only identity matters to plugins._dtype_name)
TRT = types.SimpleNamespace(float32="f32", bfloat16="bf16", float16="f16", int64="i64", fp8="fp8")
_TRT_DTYPE = {torch.float32: "f32", torch.bfloat16: "bf16", torch.int64: "i64", torch.float8_e4m3fn: "fp8"}
_TORCH = {"float32": torch.float32, "bfloat16": torch.bfloat16, "int64": torch.int64}


class Dim(int):
    """A shape expression that is a build-time constant (what TensorRT gives for static dims)."""

    is_constant = True

    @property
    def constant_value(self) -> int:
        return int(self)


DEV = torch.device(sys.argv[1] if len(sys.argv) > 1 else "cpu")


def desc(t: torch.Tensor) -> types.SimpleNamespace:
    return types.SimpleNamespace(shape_expr=[Dim(d) for d in t.shape], dtype=_TRT_DTYPE[t.dtype])


def launch(name: str, inputs: list[torch.Tensor]) -> list[torch.Tensor]:
    kernel, grid, extra = P._aot_kernel(TRT, name, tuple(desc(t) for t in inputs))
    outs = []
    shapes = describe(name, [tuple(t.shape) for t in inputs], [str(t.dtype).replace("torch.", "") for t in inputs])
    for (kind, j), (shape, dtype) in zip(PLUGINS[name][1], shapes):
        outs.append(inputs[j] if kind == "alias" else torch.empty(shape, dtype=_TORCH[dtype], device=DEV))
    assert kernel.n_inputs == len(inputs) and kernel.n_extras == len(extra) and kernel.n_outputs == len(outs)
    kernel.fn[tuple(int(g) for g in grid)](*inputs, *[int(e) for e in extra], *outs, **kernel.constexprs,
                                           num_warps=kernel.num_warps)
    return outs


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).abs().max() / b.float().abs().max())


def main() -> None:
    torch.manual_seed(0)
    torch.set_default_device(DEV)
    err = {}
    B, T, C, W = 3, 70, 200, 4
    x, w, s, L = torch.randn(B, T, C), torch.randn(C, W), torch.randn(B, C, W - 1), torch.tensor([70, 1, 33])
    ry, rs = ops.causal_conv1d(x, w, s, L)
    y, st = launch("CausalConv1d", [x, w, s, L])
    err["conv.y"], err["conv.state"] = rel(y, ry), rel(st, rs)
    err["conv.in_place"] = float(st.data_ptr() != s.data_ptr())

    B, T, HK, HV, K, V = 2, 5, 2, 4, 16, 32
    q, k = torch.randn(B, T, HK, K), torch.randn(B, T, HK, K)
    v, g, be, h = torch.randn(B, T, HV, V), -torch.rand(B, T, HV), torch.rand(B, T, HV), torch.randn(B, HV, K, V)
    ro, rh = ops.gated_delta_rule(q, k, v, g, be, h)
    o, ht = launch("GatedDeltaRule", [q, k, v, g, be, h])
    err["gdr.o"], err["gdr.ht"], err["gdr.in_place"] = rel(o, ro), rel(ht, rh), float(ht.data_ptr() != h.data_ptr())

    N, E, top_k, H, I = 5, 6, 2, 200, 128
    x = torch.randn(N, H)
    wts, ids = ops.moe_router(torch.randn(N, E), top_k)
    w13, w2 = torch.randn(E, 2 * I, H) * 0.05, torch.randn(E, H, I) * 0.05
    (hid,) = launch("MoEGateUp", [x, ids, w13])
    (out,) = launch("MoEDown", [hid, wts, ids, w2])
    err["moe"] = rel(out, ops.moe_experts(x, wts, ids, w13, w2))
    (q13, s13), (q2, s2) = quantize_fp8_block(w13), quantize_fp8_block(w2)
    (hid,) = launch("MoEGateUpFP8", [x, ids, q13, s13])
    (out,) = launch("MoEDownFP8", [hid, wts, ids, q2, s2])
    err["moe_fp8"] = rel(out, ops.moe_experts_fp8(x, wts, ids, q13, s13, q2, s2))
    if DEV.type == "cuda":
        torch.cuda.synchronize()
        err["device"] = torch.cuda.get_device_name()
    print(json.dumps(err))


if __name__ == "__main__":
    main()
