"""`qwen35-export quickstart`: the main job end to end on the built-in tiny checkpoint.

init-checkpoint (random tiny, written by the tool) -> info -> build --target cpu -> run -> validate.
Each step is the same function the separate commands call.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch


def quickstart(workdir: str | Path = "qwen35-quickstart", target: str = "cpu", max_new_tokens: int = 16) -> int:
    from .checkpoint.info import checkpoint_summary
    from .checkpoint.writer import write_random_checkpoint
    from .config import preset
    from .exporter.build import BuildSettings, build_engine
    from .runtime.engine import Engine
    from .runtime.sampling import SamplingParams
    from .validate.run import validate

    work = Path(workdir)
    ckpt, engine = work / "tiny-checkpoint", work / "tiny-engine"
    print(f"== 1/5 write the tiny random checkpoint -> {ckpt}")
    if not (ckpt / "config.json").is_file():
        write_random_checkpoint(preset("tiny"), ckpt, dtype="fp32", seed=0)
    print(checkpoint_summary(ckpt))
    print(f"\n== 2/5 build an engine for --target {target} -> {engine}")
    if not (engine / "manifest.json").is_file():
        build_engine(ckpt, engine, BuildSettings(target=target, max_batch=4, max_seq_len=128))
    print("\n== 3/5 load it and generate (greedy)")
    eng = Engine.load(engine)
    prompts = [[11, 12, 13, 14, 15], [7], [300, 301, 302]]
    t0 = time.perf_counter()
    out = eng.generate(prompts, SamplingParams(max_new_tokens=max_new_tokens))
    dt = time.perf_counter() - t0
    for p, o in zip(prompts, out):
        print(f"  prompt {p} -> {o}")
    print(f"  {sum(map(len, out))} tokens in {dt:.2f} s on {eng.device}")
    print("\n== 4/5 the same prompts through the PyTorch reference (fp32)")
    from .checkpoint.reader import load_model_weights
    from .model.model import Qwen35Model

    ref = Qwen35Model(load_model_weights(ckpt, torch.float32, progress=False)).generate_greedy(prompts, max_new_tokens)
    same = out == ref
    print(f"  greedy tokens identical to the reference: {same}")
    print("\n== 5/5 validate the engine against the reference (per layer, end to end)")
    res = validate(eng, ckpt, gen=8, report_dir=work / "report")
    print(res.summary())
    print(f"\nreport written to {work / 'report'}")
    return 0 if (same and res.passed) else 1
