"""TensorRT backend (TensorRT >= 10): QDP plug-ins for the `qwen35` ONNX nodes (plugins.py, specs.py), their
AOT Triton kernels (aot_kernels.py), ONNX preparation for the parser (onnx_prep.py), the strongly typed
engine build (build.py), the torch-tensorrt path that compiles some graphs from their ExportedPrograms with
the same plug-ins (torch_trt.py), and the runtime of both (runtime.py). specs, aot_kernels and onnx_prep
work without the `tensorrt` module (CI tests them); the rest imports it (and `torch_tensorrt`) lazily."""
