"""Backend plug-ins: how each `qwen35::` custom op becomes a backend's node (onnx/, tensorrt/), and the
build entry point for non-AOTInductor backends (build.py)."""
