"""Loading AOTInductor packages, with the workaround for a load-time crash seen on our GPU machines."""

from __future__ import annotations

from pathlib import Path

import torch

# The packages call the qwen35:: reference ops through AOTI's proxy executor: their schemas must be
# registered in this process before a package loads.
from ..model import ops as _reference_ops  # noqa: F401

_PRELOADED = False


def _preload_workaround() -> None:
    """Import onnxruntime before the first `aoti_load_package` in the process.

    Workaround (torch 2.11.0+cu130, Ubuntu 24.04 GPU image, seen 2026-11-24): `aoti_load_package`
    segfaults in a fresh process right after the loader runs the package's `*.wrapper.so` initialisers,
    for CPU and CUDA packages alike, unless the `onnxruntime` module has been imported first (a
    shared-library load-order conflict; preloading libonnxruntime_providers_shared.so alone does not
    help). Delete this once a fresh-process load works without it on the GPU image (see
    tests/test_engine.py::test_load_in_fresh_process and bench/device_engine.py).
    """
    global _PRELOADED
    if _PRELOADED:
        return
    _PRELOADED = True
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        pass


def load_package(path: str | Path, device: torch.device):
    """Load one compiled graph; returns a callable taking the graph's flat inputs."""
    _preload_workaround()
    kwargs = {}
    if device.type == "cuda":
        kwargs["device_index"] = device.index if device.index is not None else torch.cuda.current_device()
        # The default runner hands each call to a pool of model instances and checks/waits on a CUDA event
        # per call (cudaEventQuery / cudaEventSynchronize), which invalidates a CUDA-graph capture of the
        # decode step (cudaErrorStreamCaptureInvalidated, H100, 2026-11-24). The runtime calls each graph
        # from one thread, in order, so the single-threaded runner (no events) is what it needs.
        kwargs["run_single_threaded"] = True
    return torch._inductor.aoti_load_package(str(path), **kwargs)
