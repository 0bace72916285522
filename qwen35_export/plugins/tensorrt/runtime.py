"""TensorRT engines behind the calling convention of the AOTInductor graphs (runtime/engine.py), as
runtime/ort_session.py does for ONNX Runtime: positional torch inputs, the main output returned, each
`<state>.next` output copied back into the state tensor passed in. The same for the programs of the
torch-tensorrt path (torch_trt.py, `graphs/<name>.ep`), whose new states follow the main output.

Written to the public TensorRT >= 10 API (Runtime, ICudaEngine, IExecutionContext.execute_async_v3) and to
torch-tensorrt's (`torch.export.load` of its saved programs once `torch_tensorrt` is imported); unverified:
neither can be installed on our machines.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ...errors import EngineError
from ..onnx.naming import STATE_SUFFIX


def _trt() -> Any:
    try:
        import tensorrt as trt
    except ImportError as e:
        raise EngineError(f"this engine was built with --backend tensorrt: loading it needs the `tensorrt` Python "
                          f"module (TensorRT >= 10), which cannot be imported here ({e})") from None
    return trt


class TrtGraph:
    """One serialised TensorRT engine as a callable `graph(*inputs) -> Tensor` (CUDA tensors)."""

    def __init__(self, path: str | Path, device: torch.device):
        trt = _trt()
        from .plugins import register_plugins

        register_plugins()  # the plug-in descriptors must be known to deserialise (AOT kernels are inside)
        self.path, self.device = Path(path), device
        self._logger = trt.Logger(trt.Logger.WARNING)
        self._runtime = trt.Runtime(self._logger)
        self.engine = self._runtime.deserialize_cuda_engine(self.path.read_bytes())
        if self.engine is None:
            raise EngineError(f"{self.path}: TensorRT could not deserialise the engine (version or GPU mismatch?)")
        self.context = self.engine.create_execution_context()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        is_in = {n: self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT for n in names}
        self.inputs = [n for n in names if is_in[n]]
        self.outputs = [n for n in names if not is_in[n]]
        self.aliases = {o: self.inputs.index(o[: -len(STATE_SUFFIX)]) for o in self.outputs
                        if o.endswith(STATE_SUFFIX)}
        main = [o for o in self.outputs if o not in self.aliases]
        if len(main) != 1:
            raise EngineError(f"{self.path}: expected one output besides the states, found {self.outputs}")
        self._main = main[0]
        to_torch = {trt.float32: torch.float32, trt.bfloat16: torch.bfloat16, trt.float16: torch.float16,
                    trt.int64: torch.int64, trt.int32: torch.int32, trt.bool: torch.bool}
        self._dtype = {n: to_torch[self.engine.get_tensor_dtype(n)] for n in self.outputs}

    def __call__(self, *args: Tensor) -> Tensor:
        if len(args) != len(self.inputs):
            raise EngineError(f"{self.path}: engine takes {len(self.inputs)} inputs, called with {len(args)}")
        keep = []
        for name, t in zip(self.inputs, args):
            t = t.contiguous()
            keep.append(t)
            self.context.set_input_shape(name, tuple(t.shape))
            self.context.set_tensor_address(name, t.data_ptr())
        outs = {}
        for name in self.outputs:
            shape = tuple(self.context.get_tensor_shape(name))
            outs[name] = torch.empty(shape, dtype=self._dtype[name], device=self.device)
            self.context.set_tensor_address(name, outs[name].data_ptr())
        if not self.context.execute_async_v3(torch.cuda.current_stream(self.device).cuda_stream):
            raise EngineError(f"{self.path}: TensorRT execution failed")
        for name, i in self.aliases.items():
            args[i].copy_(outs[name])
        return outs[self._main]


class TorchTrtGraph:
    """A torch-tensorrt program as a callable `graph(*inputs) -> Tensor`: it returns (main output, new
    states), and each new state is copied into the input `<name>.states.json` lists for it."""

    def __init__(self, path: str | Path, device: torch.device):
        try:
            import torch_tensorrt  # noqa: F401  (registers the engine op and class the program calls)
        except ImportError as e:
            raise EngineError(f"{path}: built with --backend torch-tensorrt; loading it needs the `torch_tensorrt` "
                              f"Python module, which cannot be imported here ({e})") from None
        from .plugins import register_plugins

        register_plugins()  # the engines inside hold our plug-ins
        self.path, self.device = Path(path), device
        self.states = json.loads(self.path.with_suffix(".states.json").read_text())["state_inputs"]
        self.module = torch.export.load(str(self.path)).module()

    def __call__(self, *args: Tensor) -> Tensor:
        out = self.module(*args)
        if not self.states:
            return out
        for i, new in zip(self.states, out[1:]):
            args[i].copy_(new)
        return out[0]


def load_trt_graph(path: str | Path, device: torch.device) -> TrtGraph | TorchTrtGraph:
    """Load one TensorRT graph of an engine (same signature as aoti_loader.load_package): a serialised engine
    (`.engine`, the ONNX parser route) or a torch-tensorrt program (`.ep`)."""
    return TorchTrtGraph(path, device) if Path(path).suffix == ".ep" else TrtGraph(path, device)
