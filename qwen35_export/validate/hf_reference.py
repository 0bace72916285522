"""transformers' `Qwen3_5MoeForCausalLM` as a second, independent reference (fp32, one unpadded row at a
time, as transformers does not mask right padding out of the GDN state)."""

from __future__ import annotations

from pathlib import Path

import torch
from tqdm import tqdm

from ..errors import InputError
from .trace import RowTrace


def load_hf(checkpoint: str | Path, device: torch.device):
    """transformers' model of the checkpoint in fp32 on `device`.

    An FP8 checkpoint loads through `Qwen3_5MoeForConditionalGeneration` with its blocks dequantised: only
    that class honours the top-level `quantization_config` of a multimodal checkpoint
    (`Qwen3_5MoeForCausalLM` reads `text_config` alone and takes the e4m3 bytes for weights: every layer
    wrong, seen on the H200, transformers 5.17, 2026-12-01), and on a GPU the quantizer would otherwise keep
    FP8 matmuls, which is not an fp32 reference. A text-only FP8 checkpoint (`qwen3_5_moe_text`, `model.`
    prefix, the quantization_config at its top level) loads through the CausalLM class, which honours it:
    ConditionalGeneration would build its default full-size multimodal model around the flat text config
    and find none of its `model.language_model.` keys."""
    from ..config import Qwen35Config

    try:
        import transformers
    except ImportError:
        raise InputError("--reference transformers needs the `transformers` package (pip install "
                         "'qwen35-export[test]')") from None
    cfg = Qwen35Config.from_json_file(Path(checkpoint) / "config.json")
    if cfg.fp8 is None:
        model = transformers.Qwen3_5MoeForCausalLM.from_pretrained(checkpoint, dtype=torch.float32)
    else:
        try:
            import accelerate  # noqa: F401
        except ImportError:
            raise InputError(f"{checkpoint}: --reference transformers on an FP8 checkpoint needs `accelerate` "
                             "(transformers' FP8 loader imports it)") from None
        q = transformers.FineGrainedFP8Config(weight_block_size=tuple(cfg.fp8.weight_block_size),
                                              dequantize=True)
        cls = (transformers.Qwen3_5MoeForConditionalGeneration if cfg.model_type == "qwen3_5_moe"
               else transformers.Qwen3_5MoeForCausalLM)
        model = cls.from_pretrained(checkpoint, dtype=torch.float32, quantization_config=q)
    # Keep-in-BF16 tensors load as bf16; bf16 -> fp32 is exact.
    return model.float().to(device).eval()


def decoder_layers(model) -> torch.nn.ModuleList:
    """The text decoder layers of a CausalLM (`model.layers`) or ConditionalGeneration
    (`model.language_model.layers`) model."""
    inner = model.model
    return getattr(inner, "language_model", inner).layers


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
        h = decoder_layers(model)[-1].register_forward_hook(
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
