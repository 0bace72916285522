"""ONNX export of each layer kind with the custom ops as `qwen35::` nodes carrying ONNX function bodies."""
