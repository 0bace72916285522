"""Writing an engine directory atomically: everything goes into a temp dir beside the destination, which
is swapped into place at the end, so a failed build leaves nothing half-written and an existing engine is
replaced only by a complete one."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from ..errors import BuildError
from .manifest import sha256_file


def check_out(out: Path, force: bool) -> None:
    """Fail before anything is written when `out` exists and may not be replaced: without --force, or when
    it is a non-empty folder that is no engine (the swap would delete it)."""
    if not out.exists():
        return
    if not force:
        raise BuildError(f"{out}: already exists; pass --force to replace it (the old engine is kept until the "
                         "new one is complete)")
    if out.is_dir() and any(out.iterdir()) and not (out / "manifest.json").is_file():
        raise BuildError(f"{out}: exists and is not an engine directory (no manifest.json); --force replaces "
                         "only engines: choose another --out or remove it yourself")


def staging_dir(out: Path) -> Path:
    out.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".{out.name}.building-", dir=out.parent))


def file_table(root: Path, skip: tuple[str, ...] = ("graphs_dump",)) -> dict[str, dict]:
    """relpath -> {sha256, bytes} for every file under `root` (debug dumps excluded)."""
    files = [p for p in sorted(root.rglob("*")) if p.is_file() and not set(skip) & set(p.relative_to(root).parts)]
    return {str(p.relative_to(root)): {"sha256": sha256_file(p), "bytes": p.stat().st_size} for p in files}


def swap_into_place(tmp: Path, out: Path) -> None:
    """Move the finished `tmp` to `out`; an old engine at `out` is removed only after the swap."""
    if out.exists():
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        os.replace(out, old)
        os.replace(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, out)
