"""Compile one saved ExportedProgram with AOTInductor in its own process (the build runs several at once).

    python -m qwen35_export.exporter.compile_worker IN.pt2 OUT.pt2 [--kernels]
"""

from __future__ import annotations

import sys

import torch


def main(argv: list[str]) -> int:
    src, dst = argv[0], argv[1]
    from ..model import ops  # noqa: F401  (qwen35:: schemas for deserialisation)

    if "--kernels" in argv:
        from ..graph.substitute_custom_ops import triton_implementations

        triton_implementations()  # registers qwen35_triton:: ops
    ep = torch.export.load(src)
    torch._inductor.aoti_compile_and_package(ep, package_path=dst)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
