"""Swap the reference `qwen35::*` custom ops for a backend's implementation of the same signature.

GPU targets take the Triton ops `qwen35_triton::*` (registered with `triton_op`, so AOTInductor embeds the
kernels in the package); the cpu target keeps the references (called through AOTI's proxy executor),
except the plain-math ops that graph/inline_ops.py turned back into torch ops first.
"""

from __future__ import annotations

import logging

import torch
from torch.export import ExportedProgram

log = logging.getLogger(__name__)


def triton_implementations() -> dict[str, object]:
    """The `qwen35_triton` ops that are registered (importing the kernel packages registers them)."""
    found: dict[str, object] = {}
    for name in _PACKAGE:
        try:
            __import__(f"qwen35_export.kernels.{_PACKAGE[name]}")
        except ImportError as e:  # a kernel package that has not landed (or no triton): keep the reference
            log.info("no Triton kernel for %s (%s)", name, e)
            continue
        ns = getattr(torch.ops, "qwen35_triton", None)
        if ns is not None and hasattr(ns, name):
            found[name] = getattr(ns, name).default
    return found


_PACKAGE = {"causal_conv1d": "causal_conv1d", "gated_delta_rule": "gated_delta_rule", "moe_router": "moe",
            "moe_route": "moe", "moe_experts": "moe", "moe_experts_fp8": "moe", "fp8_linear": "fp8_linear",
            "decode_attention": "attention", "gated_rms_norm": "gdn_gating"}


def substitute_custom_ops(ep: ExportedProgram, impls: dict[str, object]) -> tuple[ExportedProgram, dict[str, int]]:
    """Retarget every `qwen35::<name>` node whose name has an implementation in `impls`.

    Returns the program (changed in place) and a count of rewritten nodes per op name.
    """
    counts: dict[str, int] = {}
    for node in ep.graph.nodes:
        if node.op != "call_function" or not isinstance(node.target, torch._ops.OpOverload):
            continue
        if node.target.namespace != "qwen35":
            continue
        name = node.target._opname
        if name in impls:
            node.target = impls[name]
            counts[name] = counts.get(name, 0) + 1
    ep.graph_module.recompile()
    log.info("substitute_custom_ops: %s", counts)
    return ep, counts
