"""ONNX Runtime graphs behind the calling convention of the AOTInductor graphs (runtime/engine.py).

An `OrtGraph` is called with the graph's flat inputs as torch tensors, in order, and returns its main
output as a tensor. ONNX graphs cannot mutate their inputs, so each state input `s` has an output
`s.next` (plugins/onnx/export.py); the call copies it back into the tensor passed in, so the engine's
state pools advance exactly as with the AOTI graphs. Inputs and outputs are bound by pointer (IO binding):
ORT reads the torch tensors in place and writes into torch buffers, so the only copy per call is the
state write-back (ORT gives no guarantee that an output bound to an input's buffer is computed safely).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import Tensor

from ..errors import EngineError
from ..plugins.onnx.naming import STATE_SUFFIX


# torch dtype -> onnx.TensorProto element type (ORT's IO binding takes the ONNX enum for any dtype).
_ONNX_TYPE = {torch.float32: 1, torch.uint8: 2, torch.int8: 3, torch.int32: 6, torch.int64: 7, torch.bool: 9,
              torch.float16: 10, torch.float64: 11, torch.bfloat16: 16, torch.float8_e4m3fn: 17}
_TORCH_TYPE = {"tensor(float)": torch.float32, "tensor(int64)": torch.int64, "tensor(float16)": torch.float16,
               "tensor(bfloat16)": torch.bfloat16, "tensor(int32)": torch.int32, "tensor(bool)": torch.bool}


def default_threads() -> int:
    """ORT intra-op threads per session: `QWEN35_ORT_THREADS` if set (0 = ORT's choice), else 1.

    One thread is the default because the graphs run one after another and small layers do not split
    well: on the tiny model (2 cores, ORT 1.32) a decode step took 13 ms with 1 thread, 67 ms with 2.
    Large models on many cores want more; set the variable.
    """
    return int(os.environ.get("QWEN35_ORT_THREADS", "1"))


def _providers(device: torch.device) -> list:
    if device.type == "cuda":
        return [("CUDAExecutionProvider", {"device_id": device.index or 0}), "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


class OrtGraph:
    """One ONNX model as a callable `graph(*inputs) -> Tensor` that updates state inputs in place."""

    def __init__(self, path: str | Path, device: torch.device, intra_op_threads: int | None = None):
        import onnxruntime as ort  # imported here: the AOTI path must not need onnxruntime installed

        self.path, self.device = Path(path), device
        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        so.intra_op_num_threads = default_threads() if intra_op_threads is None else intra_op_threads
        # An engine holds one session per graph and calls them one after another: threads left spinning
        # by the previous session take the cores from the next (10x slower decode on 2 cores, ORT 1.32).
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
        try:
            self.session = ort.InferenceSession(str(self.path), so, providers=_providers(device))
        except Exception as e:  # ORT raises its own untyped errors; name the file
            raise EngineError(f"{self.path}: ONNX Runtime cannot load the graph ({str(e).splitlines()[0]})") from e
        self.inputs = [i.name for i in self.session.get_inputs()]
        self._input_dims = [i.shape for i in self.session.get_inputs()]
        outs = self.session.get_outputs()
        # output index -> index of the input it updates
        self.aliases = {k: self.inputs.index(o.name[: -len(STATE_SUFFIX)]) for k, o in enumerate(outs)
                        if o.name.endswith(STATE_SUFFIX)}
        self.outputs = [(o.name, o.shape, _TORCH_TYPE.get(o.type)) for o in outs]
        if len(self.outputs) - len(self.aliases) != 1:
            raise EngineError(f"{self.path}: expected one output besides the '*{STATE_SUFFIX}' states, found "
                              f"{[o.name for o in outs]}")
        self._main = next(k for k in range(len(outs)) if k not in self.aliases)

    def _out_shape(self, dims: list, sizes: dict[str, int]) -> tuple[int, ...] | None:
        """Concrete output shape from the symbolic dims the inputs fixed, or None if one stays unknown."""
        shape = []
        for d in dims:
            if isinstance(d, int):
                shape.append(d)
            elif d in sizes:
                shape.append(sizes[d])
            else:
                return None
        return tuple(shape)

    def __call__(self, *args: Tensor) -> Tensor:
        if len(args) != len(self.inputs):
            raise EngineError(f"{self.path}: graph takes {len(self.inputs)} inputs, called with {len(args)}")
        dev = self.device.type
        dev_id = self.device.index or 0
        io = self.session.io_binding()
        sizes: dict[str, int] = {}
        keep = []  # contiguous copies must outlive the run
        for name, dims, t in zip(self.inputs, self._input_dims, args):
            t = t.contiguous()
            keep.append(t)
            for d, n in zip(dims, t.shape):
                if isinstance(d, str):
                    sizes[d] = int(n)
            io.bind_input(name, dev, dev_id, _ONNX_TYPE[t.dtype], tuple(t.shape), t.data_ptr())
        results: dict[int, Tensor] = {}
        for k, (name, dims, dtype) in enumerate(self.outputs):
            if k in self.aliases:
                buf = torch.empty_like(args[self.aliases[k]])
            else:
                shape = self._out_shape(dims, sizes)
                if shape is None or dtype is None:
                    io.bind_output(name, dev, dev_id)  # ORT allocates; fetched below
                    continue
                buf = torch.empty(shape, dtype=dtype, device=self.device)
            io.bind_output(name, dev, dev_id, _ONNX_TYPE[buf.dtype], tuple(buf.shape), buf.data_ptr())
            results[k] = buf
        self.session.run_with_iobinding(io)
        if self._main not in results:
            results[self._main] = torch.from_numpy(io.get_outputs()[self._main].numpy()).to(self.device)
        for k, i in self.aliases.items():
            args[i].copy_(results[k])
        return results[self._main]


def load_onnx_graph(path: str | Path, device: torch.device) -> OrtGraph:
    """Load one ONNX graph of an engine (same signature as aoti_loader.load_package)."""
    return OrtGraph(path, device)
