"""qwen35-export: lower the Qwen3.5 hybrid MoE family to compiled engines, run them, and check them
numerically against PyTorch."""

__version__ = "0.1.0"
