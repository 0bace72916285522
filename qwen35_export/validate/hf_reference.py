"""transformers' `Qwen3_5MoeForCausalLM` as a second, independent reference (fp32, one unpadded row at a
time, as transformers does not mask right padding out of the GDN state)."""

from __future__ import annotations

from pathlib import Path

import torch
from tqdm import tqdm

from ..errors import InputError
from .trace import RowTrace


def load_hf(checkpoint: str | Path, device: torch.device):
    try:
        import transformers
    except ImportError:
        raise InputError("--reference transformers needs the `transformers` package (pip install "
                         "'qwen35-export[test]')") from None
    model = transformers.Qwen3_5MoeForCausalLM.from_pretrained(checkpoint, dtype=torch.float32)
    return model.to(device).eval()


@torch.no_grad()
def hf_trace(model, prompts: list[list[int]], gen: int, n_layers: int, progress: bool = True) -> list[RowTrace]:
    """Per row: greedy gen tokens with transformers' cache, then one forward over prompt + tokens[:-1] that
    gives every position's logits and each decoder layer's output (`output_hidden_states`)."""
    dev = next(model.parameters()).device
    rows = []
    for p in tqdm(prompts, desc="transformers reference", leave=False, disable=not progress):
        ids = torch.tensor([p], device=dev)
        out = model(input_ids=ids, use_cache=True)
        past, tok = out.past_key_values, out.logits[0, -1].argmax()
        teacher = [int(tok)]
        for _ in range(gen - 1):
            out = model(input_ids=tok.view(1, 1), past_key_values=past, use_cache=True)
            past, tok = out.past_key_values, out.logits[0, -1].argmax()
            teacher.append(int(tok))
        full = torch.tensor([p + teacher[:-1]], device=dev)
        last: list[torch.Tensor] = []
        h = model.model.layers[-1].register_forward_hook(
            lambda mod, args, o: last.append(o[0] if isinstance(o, tuple) else o))
        try:
            out = model(input_ids=full, output_hidden_states=True)
        finally:
            h.remove()
        # (embeddings, layer 0 .. layer L-2, final norm of layer L-1): transformers 5.23 puts the *normed*
        # last layer output in the tuple, so the last layer's raw output comes from a forward hook.
        hs = out.hidden_states
        if len(hs) != n_layers + 1:
            raise InputError(f"transformers returned {len(hs)} hidden states, expected {n_layers + 1}")
        hidden = torch.stack([x[0] for x in hs[1:-1]] + [last[0][0]]).float().cpu()  # [L, T + S, H]
        logits = out.logits[0].float().cpu()  # [T + S, V]
        T = len(p)
        rows.append(RowTrace(p, teacher, hidden[:, :T], logits[:T], hidden[:, T:], logits[T:]))
    return rows
