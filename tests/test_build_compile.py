"""The build's parallel compile step (exporter/build.py `_compile_all`): workers that fail, or are killed."""

from __future__ import annotations

import signal
import subprocess
from pathlib import Path

import pytest
import torch

from qwen35_export.errors import BuildError
from qwen35_export.exporter import build
from qwen35_export.exporter.build import BuildSettings, build_engine
from qwen35_export.exporter.manifest import GraphEntry


class _Add(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + 1


def _eps(names: list[str]) -> dict[str, tuple]:
    ep = torch.export.export(_Add(), (torch.zeros(2),))
    return {n: (ep, GraphEntry(f"graphs/{n}.pt2", "gdn", "decode")) for n in names}


def _fake_workers(monkeypatch, outcomes: dict[str, list[int]]) -> list[str]:
    """subprocess.run stand-in for compile workers: graph n exits with outcomes[n]'s next status (0 writes
    its package); returns the list of graphs run, in order."""
    calls: list[str] = []

    def run(cmd, capture_output, text):
        out = Path(cmd[-2] if cmd[-1] == "--kernels" else cmd[-1])
        name = out.stem
        calls.append(name)
        rc = outcomes[name].pop(0) if outcomes.get(name) else 0
        if rc == 0:
            out.write_bytes(b"package")
        return subprocess.CompletedProcess(cmd, rc, "", "Traceback: boom" if rc > 0 else "")

    monkeypatch.setattr(subprocess, "run", run)
    return calls


def _compile(tmp_path: Path, names: list[str]) -> None:
    (tmp_path / "graphs").mkdir()
    build._compile_all(_eps(names), tmp_path, BuildSettings(jobs=2, progress=False), kernels=False)


def test_killed_worker_is_retried_alone(tmp_path: Path, monkeypatch) -> None:
    calls = _fake_workers(monkeypatch, {"b": [-signal.SIGKILL]})
    _compile(tmp_path, ["a", "b", "c"])
    assert sorted(calls[:3]) == ["a", "b", "c"] and calls[3:] == ["b"]  # after the others, once
    assert all((tmp_path / "graphs" / f"{n}.pt2").read_bytes() == b"package" for n in "abc")
    assert not (tmp_path / "exported").exists()


def test_worker_killed_twice_names_the_signal(tmp_path: Path, monkeypatch) -> None:
    _fake_workers(monkeypatch, {"b": [-signal.SIGKILL, -signal.SIGKILL]})
    with pytest.raises(BuildError, match=r"compiling graph 'b' failed \(killed by SIGKILL \(most often the "
                                         r"out-of-memory killer: this graph alone needs more host memory"):
        _compile(tmp_path, ["a", "b"])


def test_failing_worker_is_not_retried(tmp_path: Path, monkeypatch) -> None:
    calls = _fake_workers(monkeypatch, {"a": [1]})
    with pytest.raises(BuildError, match=r"compiling graph 'a' failed \(exit code 1\):\nTraceback: boom"):
        _compile(tmp_path, ["a", "b"])
    assert calls.count("a") == 1


def test_exit_reason_words():
    assert build._exit_reason(2) == "exit code 2"
    assert "fewer --jobs" in build._exit_reason(-signal.SIGKILL)
    assert build._exit_reason(-signal.SIGSEGV) == "killed by SIGSEGV"


def test_negative_jobs_rejected_before_writing(tmp_path: Path) -> None:
    with pytest.raises(BuildError, match="--jobs: expected >= 0"):
        build_engine(tmp_path / "no_ckpt", tmp_path / "eng", BuildSettings(jobs=-1, progress=False))
    assert not (tmp_path / "eng").exists()
