"""Invariants of the reference model's explicit state: decode continues prefill, a split prefill equals one
call, right-padding is invisible (to logits and to every piece of state), all in fp32 on the tiny model.

Bounds: the two sides of each comparison run the same fp32 arithmetic in a different grouping (a GEMM over
T rows vs T+1, a batch of 2 vs 1), so they differ only by fp32 rounding of the matmul blocking: relative
1e-5 of max|logit| (10x tighter than the transformers-parity bound). Padding's effect on state is exact:
a pad token has g = 0 and beta = 0, which leaves the recurrent state bit-for-bit unchanged, and the conv
state is gathered from real tokens only.
"""

from __future__ import annotations

import pytest
import torch

from qwen35_export.checkpoint.reader import load_model_weights
from qwen35_export.model.model import Qwen35Model, State

REL = 1e-5


@pytest.fixture(scope="module")
def model(tiny_ckpt_fp32) -> Qwen35Model:
    return Qwen35Model(load_model_weights(tiny_ckpt_fp32, torch.float32, progress=False))


def tokens(n: int, seed: int, vocab: int = 1024) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (n,), generator=g)


def run(model: Qwen35Model, rows: list[torch.Tensor], max_len: int = 160, pad_seed: int = 99,
        state: State | None = None) -> tuple[torch.Tensor, State]:
    """Prefill right-padded rows (pad positions filled with random ids) -> logits [B, T, V], state."""
    B, T = len(rows), max(len(r) for r in rows)
    ids = tokens(B * T, pad_seed).reshape(B, T)
    for b, r in enumerate(rows):
        ids[b, : len(r)] = r
    lengths = torch.tensor([len(r) for r in rows])
    return model.prefill(ids, lengths, state if state is not None else model.init_state(B, max_len))


def row_state(s: State, b: int) -> State:
    return State([c[b:b + 1] for c in s.conv], [r[b:b + 1] for r in s.recurrent],
                 [k[b:b + 1] for k in s.k_cache], [v[b:b + 1] for v in s.v_cache], s.lengths[b:b + 1])


def assert_state_close(a: State, b: State, rel: float, n_kv: int) -> None:
    """States equal within rel (relative to each tensor's max); KV caches compared on the first n_kv slots."""
    assert torch.equal(a.lengths, b.lengths)
    pairs = [("conv", x, y) for x, y in zip(a.conv, b.conv)]
    pairs += [("recurrent", x, y) for x, y in zip(a.recurrent, b.recurrent)]
    pairs += [("k_cache", x[:, :, :n_kv], y[:, :, :n_kv]) for x, y in zip(a.k_cache, b.k_cache)]
    pairs += [("v_cache", x[:, :, :n_kv], y[:, :, :n_kv]) for x, y in zip(a.v_cache, b.v_cache)]
    for name, x, y in pairs:
        d = (x - y).abs().max().item()
        assert d <= rel * y.abs().max().item(), f"{name}: max|d| = {d:.3e}"


def test_forward_finite_and_position_dependent(model: Qwen35Model) -> None:
    logits, _ = run(model, [tokens(65, 0)])
    assert torch.isfinite(logits).all()
    # Random weights must still give a model whose output depends on the position (not a constant row).
    spread = (logits[0] - logits[0].mean(0)).abs().max().item()
    assert spread > 0.1 * logits.abs().max().item()
    assert logits[0].argmax(-1).unique().numel() > 5


@pytest.mark.parametrize("T", [1, 64, 65])
def test_prefill_then_decode_equals_longer_prefill(model: Qwen35Model, assert_logits_close, T: int) -> None:
    x = tokens(T + 1, T)
    full, s_full = run(model, [x])
    part, s = run(model, [x[:T]])
    step, s = model.decode(x[T:][None], s)
    assert_logits_close(part[0], full[0, :T], REL, "prefill(T) vs prefill(T+1)[:T]")
    assert_logits_close(step[0, 0], full[0, T], REL, "decode after prefill(T) vs prefill(T+1)[T]")
    assert_state_close(s, s_full, REL, n_kv=T + 1)


def test_split_prefill_equals_one_call(model: Qwen35Model, assert_logits_close) -> None:
    x, y = tokens(70, 1), tokens(70, 2)
    one, s_one = run(model, [x, y])
    # Two calls with unequal splits per row: row 0 gets 40 + 30, row 1 gets 63 + 7.
    a, s = run(model, [x[:40], y[:63]])
    b, s = run(model, [x[40:], y[63:]], state=s)
    assert_logits_close(a[0, :40], one[0, :40], REL, "first part, row 0")
    assert_logits_close(a[1, :63], one[1, :63], REL, "first part, row 1")
    assert_logits_close(b[0, :30], one[0, 40:], REL, "second part, row 0")
    assert_logits_close(b[1, :7], one[1, 63:], REL, "second part, row 1")
    assert_state_close(s, s_one, REL, n_kv=70)


def test_padded_batch_row_equals_row_alone(model: Qwen35Model, assert_logits_close) -> None:
    long, short = tokens(65, 3), tokens(23, 4)
    both, s_both = run(model, [long, short])
    alone, s_alone = run(model, [short])
    assert_logits_close(both[1, :23], alone[0], REL, "padded row vs alone")
    assert_state_close(row_state(s_both, 1), s_alone, REL, n_kv=23)
    # The KV slots the padding wrote must be masked now and overwritten by the next decode step.
    nxt = tokens(2, 5)[:, None]
    d_both, _ = model.decode(nxt, s_both)
    d_alone, _ = model.decode(nxt[1:], s_alone)
    assert_logits_close(d_both[1], d_alone[0], REL, "decode after padded prefill vs alone")


def test_padding_tokens_never_touch_gdn_or_conv_state(model: Qwen35Model) -> None:
    """Same real tokens, different padding content and amount: the state after prefill is bit-identical."""
    rows = [tokens(50, 6), tokens(17, 7)]
    _, s1 = run(model, rows, pad_seed=11)
    _, s2 = run(model, rows, pad_seed=12)  # other pad ids
    _, s3 = run(model, [rows[0][:17], rows[1]], pad_seed=13)  # row 1 unpadded
    for a, b in zip(s1.conv + s1.recurrent, s2.conv + s2.recurrent):
        assert torch.equal(a, b)
    # Row 1 against the same row run with no padding at all (other batch-mate, so only rounding may differ).
    for a, b in zip(s1.conv + s1.recurrent, s3.conv + s3.recurrent):
        assert (a[1] - b[1]).abs().max() <= REL * b[1].abs().max()


def test_padding_past_the_cache_end_never_overwrites_a_real_token(model: Qwen35Model, assert_logits_close) -> None:
    """Row 1 ends exactly at the cache end while row 0 is longer: row 1's padding positions lie past T_max
    and must not land on its last real token (position T_max - 1)."""
    x, y = tokens(30, 21), tokens(30, 22)
    one, s_one = run(model, [x, y], max_len=30)
    _, s = run(model, [x[:10], y[:20]], max_len=30)
    b, s = run(model, [x[10:], y[20:]], state=s)  # T = 20; row 1 has 10 real tokens, start 20
    assert_logits_close(b[1, :10], one[1, 20:], REL, "second part, row 1 (ends at the cache end)")
    assert_state_close(s, s_one, REL, n_kv=30)


def test_short_chunks_through_decode_attention_equal_one_call(model: Qwen35Model, assert_logits_close) -> None:
    """Calls of T <= 8 tokens take qwen35::decode_attention instead of SDPA: with a padded row, a row of no
    real token (lengths 0) and a row that ends exactly at the cache end, they continue one long call."""
    x, y = tokens(20, 31), tokens(13, 32)
    one, s_one = run(model, [x, y], max_len=20)
    _, s = run(model, [x[:12], y[:6]], max_len=20)
    b, s = run(model, [x[12:17], y[6:13]], state=s)  # T = 7: row 0 has 5 real tokens
    c, s = run(model, [x[17:20], y[13:]], state=s)  # T = 3: row 0 ends at T_max, row 1 has none
    assert_logits_close(b[0, :5], one[0, 12:17], REL, "T=7 call, padded row 0")
    assert_logits_close(b[1], one[1, 6:13], REL, "T=7 call, row 1")
    assert_logits_close(c[0], one[0, 17:20], REL, "T=3 call, row 0 up to the cache end")
    assert_state_close(s, s_one, REL, n_kv=13)


@pytest.mark.parametrize("layer", [0, 3])  # a GDN layer and an attention layer of the tiny preset
def test_decode_padding_rows_reuse_real_rows_experts(model: Qwen35Model, layer: int, monkeypatch) -> None:
    """Decode rows of length 0 (a CUDA-graph bucket's padding, real rows first) leave the real rows' output
    as it is, send their MoE slots to experts the real rows already use, with weight 0, and keep their own
    states: the step reads no expert weights for them."""
    from qwen35_export.model import layers as L

    cfg, lw = model.cfg, model.w.layers[layer]
    seen = []
    real_op = torch.ops.qwen35.moe_experts

    def spy(x, rw, ids, *rest):
        seen.append((rw.clone(), ids.clone()))
        return real_op(x, rw, ids, *rest)

    monkeypatch.setattr(L.torch.ops.qwen35, "moe_experts", spy)
    g = torch.Generator().manual_seed(layer)
    B, n_real = 7, 3
    x = torch.randn(B, 1, cfg.hidden_size, generator=g)
    lengths = torch.tensor([1] * n_real + [0] * (B - n_real))

    def step(xs, lens):
        if cfg.layer_types[layer] == "linear_attention":
            conv = torch.randn(len(lens), cfg.conv_dim, cfg.linear_conv_kernel_dim - 1, generator=torch.Generator().manual_seed(5))
            rec = torch.randn(len(lens), cfg.linear_num_value_heads, cfg.linear_key_head_dim, cfg.linear_value_head_dim,
                              generator=torch.Generator().manual_seed(6))
            out, c2, r2 = L.gdn_layer(xs, lw, conv.clone(), rec.clone(), lens, cfg)
            return out, [(conv, c2), (rec, r2)]
        kc = torch.randn(len(lens), cfg.num_key_value_heads, 16, cfg.head_dim, generator=torch.Generator().manual_seed(7))
        start = torch.full((len(lens),), 4)
        out, k2, v2 = L.attention_layer(xs, lw, kc.clone(), kc.clone(), start, lens, cfg)
        return out, [(kc, k2), (kc, v2)]

    out, states = step(x, lengths)
    (rw_pad, ids_pad), = seen
    alone, _ = step(x[:n_real], lengths[:n_real])
    torch.testing.assert_close(out[:n_real], alone, rtol=1e-5, atol=1e-5)  # fp32: summation order only
    assert set(ids_pad[n_real:].flatten().tolist()) <= set(ids_pad[:n_real].flatten().tolist())
    assert not rw_pad[n_real:].any() and rw_pad[:n_real].any()
    for before, after in states:  # padding rows' states untouched (they would be spare slots' states)
        assert torch.equal(after[n_real:], before[n_real:])
