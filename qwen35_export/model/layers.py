"""Functional layers of the reference model, written for export: weights and state are arguments,
no Python-side caches, no data-dependent Python control flow.

Each layer kind is one function `(hidden, weights, state...) -> (hidden, state...)`; the exporter captures
exactly these functions, so a compiled graph per layer kind serves every layer of that kind.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ..config import Qwen35Config
from . import ops  # noqa: F401  (registers torch.ops.qwen35.*)


def rms_norm(x: Tensor, w: Tensor, eps: float) -> Tensor:
    """Zero-centred RMSNorm: x / rms(x) * (1 + w), in fp32, cast back to x's dtype."""
    xf = x.float()
    y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return (y * (1.0 + w.float())).to(x.dtype)


def gated_rms_norm(o: Tensor, z: Tensor, w: Tensor, eps: float) -> Tensor:
    """GDN output norm: plain weight, normalise in fp32, times w in o's dtype, times silu(z) in fp32, as one
    node (`qwen35::gated_rms_norm`, body in ops.gated_rms_norm_math): Inductor's own kernel for it took
    ~160 us per 35B layer at 8K tokens on an H200, the Triton one reads each element once."""
    return torch.ops.qwen35.gated_rms_norm(o, z, w, eps)


def linear(x: Tensor, w: dict[str, Tensor], name: str) -> Tensor:
    """`x @ W.T` for weight `name`, through the FP8 op when the weight is kept block-quantised."""
    scale = w.get(name + "_scale_inv")
    if scale is not None:
        return torch.ops.qwen35.fp8_linear(x, w[name], scale)
    return F.linear(x, w[name])


def linear_parts(x: Tensor, w: dict[str, Tensor], fused: str, parts: list[str],
                 sizes: list[int]) -> tuple[Tensor, ...]:
    """The outputs of the linears `parts` ([..., size] each): one GEMM when the build stacked their rows under
    `fused` (graph/fuse_weights.py), else one per part."""
    if fused in w:
        return torch.split(linear(x, w, fused), sizes, dim=-1)
    return tuple(linear(x, w, n) for n in parts)


# -- rotary ----------------------------------------------------------------------------------------
def rope_cos_sin(positions: Tensor, cfg: Qwen35Config, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """cos/sin [B, T, rotary_dim] from M-RoPE positions [3, B, T] (temporal, height, width rows).

    Frequencies are interleaved by `mrope_section`: frequency j comes from row 1 (height) when
    j % 3 == 1 and j < 3*section[1], from row 2 (width) when j % 3 == 2 and j < 3*section[2], else row 0.
    For text all three rows are the token position, which makes this ordinary RoPE.
    """
    rot = cfg.rotary_dim
    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, rot, 2, dtype=torch.float32, device=positions.device)
                                         / rot))  # [rot/2]
    freqs = positions[..., None].float() * inv_freq  # [3, B, T, rot/2]
    j = torch.arange(rot // 2, device=positions.device)
    sec = cfg.mrope_section
    row = torch.zeros_like(j)
    row = torch.where((j % 3 == 1) & (j < 3 * sec[1]), torch.ones_like(j), row)
    row = torch.where((j % 3 == 2) & (j < 3 * sec[2]), torch.full_like(j, 2), row)
    f = torch.gather(freqs, 0, row.view(1, 1, 1, -1).expand(1, *freqs.shape[1:]))[0]  # [B, T, rot/2]
    emb = torch.cat([f, f], dim=-1)  # [B, T, rot]
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate-half RoPE on the first rotary_dim dims of each head; x [B, T, heads, D], cos/sin [B, T, rot]."""
    rot = cos.shape[-1]
    xr, xp = x[..., :rot], x[..., rot:]
    c, s = cos[:, :, None, :], sin[:, :, None, :]
    x1, x2 = xr[..., : rot // 2], xr[..., rot // 2:]
    rotated = torch.cat([-x2, x1], dim=-1)
    return torch.cat([xr * c + rotated * s, xp], dim=-1)


# -- mixers ----------------------------------------------------------------------------------------
def gdn_mixer(x: Tensor, w: dict[str, Tensor], conv_state: Tensor, rec_state: Tensor, lengths: Tensor,
              cfg: Qwen35Config) -> tuple[Tensor, Tensor, Tensor]:
    """Gated DeltaNet over x [B, T, H]; tokens t >= lengths[b] are padding and leave both states alone.

    conv_state [B, conv_dim, W-1], rec_state [B, HV, K, V] fp32 -> (out [B, T, H], conv_state, rec_state).
    """
    B, T, _ = x.shape
    HK, HV = cfg.linear_num_key_heads, cfg.linear_num_value_heads
    K, V = cfg.linear_key_head_dim, cfg.linear_value_head_dim
    p = "linear_attn."
    C = 2 * HK * K + HV * V
    names = [f"{p}in_proj_{n}.weight" for n in ("qkv", "z", "b", "a")]
    sizes = [C, HV * V, HV, HV]  # qkv [B, T, C], z [B, T, HV * V], b and a [B, T, HV]
    if p + "in_proj_qkvzba.weight" in w:  # all four fused at build, else qkv+z and b+a (FP8 builds)
        qkv, z, b, a = linear_parts(x, w, p + "in_proj_qkvzba.weight", names, sizes)
    else:
        qkv, z = linear_parts(x, w, p + "in_proj_qkvz.weight", names[:2], sizes[:2])
        b, a = linear_parts(x, w, p + "in_proj_ba.weight", names[2:], sizes[2:])
    z = z.reshape(B, T, HV, V)

    conv_w = w[p + "conv1d.weight"][:, 0, :]  # [C, W]
    qkv, conv_state = torch.ops.qwen35.causal_conv1d(qkv, conv_w, conv_state, lengths)
    q, k, v = torch.split(qkv, [HK * K, HK * K, HV * V], dim=-1)
    q = q.reshape(B, T, HK, K)
    k = k.reshape(B, T, HK, K)
    v = v.reshape(B, T, HV, V)

    valid = (torch.arange(T, device=x.device)[None, :] < lengths[:, None])[:, :, None]  # [B, T, 1]
    beta = torch.where(valid, torch.sigmoid(b.float()), 0.0)
    g = -w[p + "A_log"].float().exp() * F.softplus(a.float() + w[p + "dt_bias"].float())
    g = torch.where(valid, g, 0.0)

    o, rec_state = torch.ops.qwen35.gated_delta_rule(q, k, v, g, beta, rec_state)  # o [B, T, HV, V]
    o = gated_rms_norm(o, z, w[p + "norm.weight"], cfg.rms_norm_eps)
    out = linear(o.reshape(B, T, HV * V), w, p + "out_proj.weight")
    return out, conv_state, rec_state


def attention_mixer(x: Tensor, w: dict[str, Tensor], k_cache: Tensor, v_cache: Tensor, start: Tensor,
                    lengths: Tensor, cfg: Qwen35Config, cache_op: bool = False) -> tuple[Tensor, Tensor, Tensor]:
    """Gated GQA attention over x [B, T, H] with a KV cache [B, KVH, T_max, D].

    `cache_op`: every T through `qwen35::decode_attention` (else T > 8 or a symbolic T through SDPA).

    Row b's new tokens sit at positions start[b] + t; tokens t >= lengths[b] are padding: they leave the
    cache as it was.
    """
    B, T, _ = x.shape
    NH, KVH, D = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    Tmax = k_cache.shape[2]
    p = "self_attn."
    qg, k, v = linear_parts(x, w, p + "qkv_proj.weight", [p + n + "_proj.weight" for n in ("q", "k", "v")],
                            [NH * 2 * D, KVH * D, KVH * D])
    qg = qg.reshape(B, T, NH, 2 * D)
    q, gate = qg[..., :D], qg[..., D:]  # [B, T, NH, D] each
    gate = gate.reshape(B, T, NH * D)
    q = rms_norm(q, w[p + "q_norm.weight"], cfg.rms_norm_eps)
    k = rms_norm(k.reshape(B, T, KVH, D), w[p + "k_norm.weight"], cfg.rms_norm_eps)
    v = v.reshape(B, T, KVH, D)

    pos = start[:, None] + torch.arange(T, device=x.device)[None, :]  # [B, T]
    cos, sin = rope_cos_sin(pos[None].expand(3, B, T), cfg, x.dtype)
    q = apply_rope(q, cos, sin)
    k = apply_rope(k, cos, sin)

    # Write the new keys/values into the cache at their positions. A padding token rewrites the value
    # already at a slot no real token of this call writes: start + lengths, or start - 1 when the row ends
    # at the cache end (clamping its position to T_max - 1 would race with the last real token's write).
    total = start + lengths  # [B]
    valid = torch.arange(T, device=x.device)[None, :] < lengths[:, None]  # [B, T]
    pad_slot = torch.where(total < Tmax, total, start - 1).clamp(min=0, max=Tmax - 1)  # [B]
    slot = torch.where(valid, pos.clamp(max=Tmax - 1), pad_slot[:, None])  # [B, T]
    # index_put (not scatter) so that Inductor writes the T new rows into the cache input in place instead of
    # copying the whole [B, KVH, T_max, D] cache every step.
    idx = (torch.arange(B, device=x.device)[:, None, None], torch.arange(KVH, device=x.device)[None, :, None],
           slot[:, None, :])  # broadcast to [B, KVH, T]
    keep = valid[:, None, :, None]  # [B, 1, T, 1]
    k_cache = k_cache.index_put(idx, torch.where(keep, k.transpose(1, 2).to(k_cache.dtype), k_cache[idx]))
    v_cache = v_cache.index_put(idx, torch.where(keep, v.transpose(1, 2).to(v_cache.dtype), v_cache[idx]))

    if cache_op or (isinstance(T, int) and T <= 8):
        # One op that reads each live cache position once per KV head, for its G query heads together: at
        # decode (T static there), and at prefill when the build runs it as the flash kernel (GPU targets:
        # kernels/attention; SDPA with a boolean mask ran over all T_max positions in a non-flash kernel,
        # 4.2 ms of a 7 ms 35B-A3B layer at T = 8192 on an H200).
        attn = torch.ops.qwen35.decode_attention(q, k_cache, v_cache, start, lengths, D ** -0.5)
        attn = attn.reshape(B, T, NH * D)
    else:
        # Prefill elsewhere (reference model, cpu / ONNX / TensorRT graphs): SDPA, which those backends fuse.
        # The cpu target's AOTI graph returned wrong numbers for the op above at a symbolic T (its call through
        # the proxy executor; torch 2.13, 2026-12-01), so it keeps this form.
        total = total.clamp(min=1)
        kv_pos = torch.arange(Tmax, device=x.device)
        mask = (kv_pos[None, None, :] <= pos[:, :, None]) & (kv_pos[None, None, :] < total[:, None, None])
        G = NH // KVH
        kf = k_cache.to(q.dtype).repeat_interleave(G, dim=1)  # [B, NH, Tmax, D]
        vf = v_cache.to(q.dtype).repeat_interleave(G, dim=1)
        attn = F.scaled_dot_product_attention(q.transpose(1, 2), kf, vf, attn_mask=mask[:, None, :, :],
                                              scale=D ** -0.5)  # [B, NH, T, D]
        attn = attn.transpose(1, 2).reshape(B, T, NH * D)
    attn = attn * torch.sigmoid(gate)
    return linear(attn, w, p + "o_proj.weight"), k_cache, v_cache


# -- MoE -------------------------------------------------------------------------------------------
def _experts(xf: Tensor, rw: Tensor, ids: Tensor, w: dict[str, Tensor]) -> Tensor:
    """The routed experts op (BF16 or FP8 weights) over xf [N, H] with slots (rw, ids) [N, k(+1)]."""
    if "mlp.experts.gate_up_proj_scale_inv" in w:
        return torch.ops.qwen35.moe_experts_fp8(
            xf, rw, ids, w["mlp.experts.gate_up_proj"], w["mlp.experts.gate_up_proj_scale_inv"],
            w["mlp.experts.down_proj"], w["mlp.experts.down_proj_scale_inv"])
    return torch.ops.qwen35.moe_experts(xf, rw, ids, w["mlp.experts.gate_up_proj"], w["mlp.experts.down_proj"])


def moe_block(x: Tensor, w: dict[str, Tensor], cfg: Qwen35Config, expert_map: Tensor | None = None,
              real: Tensor | None = None, fused_route: bool = False) -> Tensor:
    """Sparse MoE over x [B, T, H]: routed top-k experts plus the sigmoid-gated shared expert.

    `expert_map` [E] (expert parallelism) maps global expert ids to this rank's local ones, -1 for experts
    another rank owns: those slots go to local expert 0 with weight 0, adding exactly 0 here.
    `real` [B * T] bool, real tokens first (decode: the rows of a CUDA-graph bucket past the batch are
    padding): a padding token's slots take the experts of real token (i mod n_real) with weight 0, so the
    step reads no expert weights for it. Its output is then 0 plus its shared expert, never read.
    `fused_route`: route through `qwen35::moe_route` where it applies (fused gate rows, folded shared
    expert): the same math as one node, which GPU builds asking for it run as two Triton kernels.
    """
    B, T, H = x.shape
    xf = x.reshape(B * T, H)  # [N, H]
    E = cfg.num_experts
    folded = w["mlp.experts.down_proj"].shape[0] == cfg.num_experts + 1 and expert_map is None
    if fused_route and folded and "mlp.gate_shared.weight" in w:
        # Gate GEMM, router, shared slot and padding redirect as one op (a GPU build's decode graph runs it
        # as two Triton launches at decode instead of ~6 ops); its math (ops.moe_route_math) is this folded
        # case of the sequence below, op for op.
        rw, ids = torch.ops.qwen35.moe_route(xf, w["mlp.gate_shared.weight"], E, cfg.num_experts_per_tok, real)
        return _experts(xf, rw, ids, w).reshape(B, T, H)
    if "mlp.gate_shared.weight" in w:  # router + shared-expert gate rows in one GEMM (graph/fuse_weights.py)
        lg = F.linear(xf, w["mlp.gate_shared.weight"])  # [N, E + 1 + zero rows' columns]
        logits, sg_logit = lg[:, :E], lg[:, E:E + 1]  # [N, E], [N, 1]
    else:
        logits = F.linear(xf, w["mlp.gate.weight"])  # [N, E] over all experts: routing is global
        sg_logit = F.linear(xf, w["mlp.shared_expert_gate.weight"])  # [N, 1]
    rw, ids = torch.ops.qwen35.moe_router(logits, cfg.num_experts_per_tok)
    rw = rw.to(x.dtype)  # HF casts the renormalised weights to the activation dtype
    if expert_map is not None:
        local = expert_map[ids]  # [N, k]
        own = local >= 0
        rw = torch.where(own, rw, torch.zeros_like(rw))
        ids = torch.where(own, local, torch.zeros_like(local))
    if folded:
        # The shared expert is expert E (graph/fuse_weights.py): one more slot per token, weighted by its gate.
        sg = torch.sigmoid(sg_logit).to(rw.dtype)  # [N, 1]
        rw = torch.cat([rw, sg], dim=1)  # [N, k+1]
        ids = torch.cat([ids, torch.full_like(ids[:, :1], cfg.num_experts)], dim=1)
    if real is not None:
        n_real = real.sum().clamp(min=1)
        tok = torch.arange(ids.shape[0], device=x.device)
        ids = ids[torch.where(real, tok, tok % n_real)]  # [N, k(+1)]
        rw = torch.where(real[:, None], rw, torch.zeros_like(rw))
    routed = _experts(xf, rw, ids, w)
    if folded:
        return routed.reshape(B, T, H)
    s = "mlp.shared_expert."
    if s + "gate_up_proj.weight" in w:
        gate, up = linear(xf, w, s + "gate_up_proj.weight").chunk(2, dim=-1)
    else:
        gate, up = linear(xf, w, s + "gate_proj.weight"), linear(xf, w, s + "up_proj.weight")
    shared = linear(F.silu(gate) * up, w, s + "down_proj.weight")
    shared = torch.sigmoid(sg_logit) * shared
    return (routed + shared).reshape(B, T, H)


# -- decoder layers (one per kind) ---------------------------------------------------------------
def _decode_rows_real(x: Tensor, lengths: Tensor) -> Tensor | None:
    """Decode (one token per row, T static): rows with length 0 are a bucket's padding, real rows first
    (runtime/engine.py); None for prefill, where every row holds real tokens, and for a batch that is the
    int 1 (a batch-1 decode graph, exporter/capture.py DECODE1: the runtime pads batches to buckets of 2 and
    more, so its one row is real; the mask would be a launch per layer)."""
    B, T = x.shape[0], x.shape[1]
    if isinstance(B, int) and B == 1:
        return None
    return lengths > 0 if isinstance(T, int) and T == 1 else None


def gdn_layer(x: Tensor, w: dict[str, Tensor], conv_state: Tensor, rec_state: Tensor, lengths: Tensor,
              cfg: Qwen35Config, fused_route: bool = False) -> tuple[Tensor, Tensor, Tensor]:
    h, conv_state, rec_state = gdn_mixer(rms_norm(x, w["input_layernorm.weight"], cfg.rms_norm_eps), w,
                                         conv_state, rec_state, lengths, cfg)
    x = x + h
    x = x + moe_block(rms_norm(x, w["post_attention_layernorm.weight"], cfg.rms_norm_eps), w, cfg,
                      real=_decode_rows_real(x, lengths), fused_route=fused_route)
    return x, conv_state, rec_state


def attention_layer(x: Tensor, w: dict[str, Tensor], k_cache: Tensor, v_cache: Tensor, start: Tensor,
                    lengths: Tensor, cfg: Qwen35Config, cache_op: bool = False, fused_route: bool = False
                    ) -> tuple[Tensor, Tensor, Tensor]:
    h, k_cache, v_cache = attention_mixer(rms_norm(x, w["input_layernorm.weight"], cfg.rms_norm_eps), w,
                                          k_cache, v_cache, start, lengths, cfg, cache_op)
    x = x + h
    x = x + moe_block(rms_norm(x, w["post_attention_layernorm.weight"], cfg.rms_norm_eps), w, cfg,
                      real=_decode_rows_real(x, lengths), fused_route=fused_route)
    return x, k_cache, v_cache


def embed(input_ids: Tensor, embed_w: Tensor) -> Tensor:
    return F.embedding(input_ids, embed_w)


def final_logits(x: Tensor, norm_w: Tensor, lm_head_w: Tensor, eps: float) -> Tensor:
    return F.linear(rms_norm(x, norm_w, eps), lm_head_w)
