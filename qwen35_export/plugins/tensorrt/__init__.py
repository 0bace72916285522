"""TensorRT backend (TensorRT >= 10): QDP plug-ins for the `qwen35` ONNX nodes, ONNX preparation for the
parser, and the strongly typed engine build. Only aot_kernels.py and onnx_prep.py/specs.py work without
the `tensorrt` module; everything that needs it imports it lazily."""
