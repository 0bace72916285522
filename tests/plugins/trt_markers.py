"""Skip markers of the TensorRT tests: neither the TensorRT builder nor torch-tensorrt can be installed on our
machines, so the tests that need them skip there and run wherever the modules import."""

from __future__ import annotations

import importlib

import pytest


def _imports(module: str) -> bool:
    try:
        importlib.import_module(module)
    except ImportError:
        return False
    return True


HAVE_TRT, HAVE_TTRT = _imports("tensorrt"), _imports("torch_tensorrt")
needs_trt = pytest.mark.skipif(not HAVE_TRT, reason="needs tensorrt (the TensorRT builder cannot be installed on "
                                                    "this machine)")
needs_ttrt = pytest.mark.skipif(not HAVE_TTRT, reason="needs torch_tensorrt (the TensorRT builder cannot be "
                                                      "installed on this machine)")
