"""`qwen35-export run`: generate from one prompt with an engine, printing tokens as they come."""

from __future__ import annotations

import json
import sys
import time

from .engine import Engine
from .sampling import SamplingParams


def stop_token_ids(eng: Engine) -> tuple[int, ...]:
    """config.json's eos_token_id plus every eos_token_id of the engine's generation_config.json: chat
    checkpoints list several there (end of turn, end of text), and config.json keeps only one."""
    ids = [] if eng.cfg.eos_token_id is None else [eng.cfg.eos_token_id]
    f = eng.dir / "generation_config.json"
    if f.is_file():
        try:
            g = json.loads(f.read_text()).get("eos_token_id")
        except (json.JSONDecodeError, AttributeError):
            g = None
        ids += [t for t in (g if isinstance(g, list) else [g]) if isinstance(t, int)]
    return tuple(dict.fromkeys(ids))


def run_prompt(engine_dir, prompt: str | None, token_ids: list[int] | None, max_new_tokens: int,
               temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0, seed: int = 0,
               device: str | None = None) -> int:
    eng = Engine.load(engine_dir, device=device)
    ids = eng.encode(prompt) if prompt is not None else list(token_ids or [])
    params = SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                            seed=seed, stop_token_ids=stop_token_ids(eng))
    print(f"prompt: {len(ids)} tokens; generating up to {max_new_tokens} on {eng.device}", file=sys.stderr)
    t0 = time.perf_counter()
    first = None
    out: list[int] = []
    for step in eng.stream([ids], params):
        tok = step[0]
        if tok is None:
            break
        if first is None:
            first = time.perf_counter() - t0
        out.append(tok)
        text = eng.decode_text([tok])
        print(text if text is not None else tok, end="" if text is not None else " ", flush=True)
    dt = time.perf_counter() - t0
    print()
    n = len(out)
    rate = (n - 1) / (dt - first) if n > 1 and dt > first else float("nan")
    print(f"{n} tokens; first token {first * 1e3:.1f} ms; decode {rate:.1f} tokens/s", file=sys.stderr)
    return 0
