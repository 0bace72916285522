"""Triton kernels, one folder per op, each beside its torch reference and tuned configs.

Each op is registered as `qwen35_triton::<name>` with the same signature as the reference op
`qwen35::<name>` in `qwen35_export.model.ops`, so a graph pass can swap one for the other.
"""
