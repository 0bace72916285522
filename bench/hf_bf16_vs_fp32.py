"""How identical can BF16 greedy tokens be to FP32 ones on a random checkpoint? transformers' own model in
BF16 against itself in FP32 (CPU), free-running greedy decode: the bar issue 3's "identical in BF16" asks of us.

    python bench/hf_bf16_vs_fp32.py CHECKPOINT [--gen 64]    # e.g. qwen35-export init-checkpoint --preset tiny
"""

from __future__ import annotations

import argparse
import json

import torch


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("checkpoint")
    ap.add_argument("--gen", type=int, default=64)
    ap.add_argument("--prompt-lens", default="7,1,5")  # those of the device check in bench/device_engine.py
    a = ap.parse_args()
    import transformers

    m32 = transformers.Qwen3_5MoeForCausalLM.from_pretrained(a.checkpoint, dtype=torch.float32).eval()
    m16 = transformers.Qwen3_5MoeForCausalLM.from_pretrained(a.checkpoint, dtype=torch.bfloat16).eval()
    g = torch.Generator().manual_seed(0)
    rows, same, total = [], 0, 0
    for L in map(int, a.prompt_lens.split(",")):
        ids = torch.randint(0, m32.config.vocab_size, (1, L), generator=g)
        with torch.no_grad():
            t32 = m32.generate(ids, max_new_tokens=a.gen, do_sample=False)[0, L:]
            t16 = m16.generate(ids, max_new_tokens=a.gen, do_sample=False)[0, L:]
        n = min(len(t32), len(t16))
        eq = t32[:n] == t16[:n]
        first = int((~eq).nonzero()[0]) if (~eq).any() else None
        rows.append({"prompt_len": L, "identical": int(eq.sum()), "of": n, "first_flip": first})
        same, total = same + int(eq.sum()), total + n
        print(f"prompt {L}: {int(eq.sum())}/{n} identical, first flip at {first}")
    print(json.dumps({"rows": rows, "identical_fraction": same / total}))


if __name__ == "__main__":
    main()
