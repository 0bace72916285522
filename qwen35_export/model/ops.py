"""Custom ops the reference model calls, declared with `torch.library` so that `torch.export` sees each as
one node a graph pass can swap for a Triton kernel or a backend plugin.

Each op's default implementation here is the plain-torch reference (fp32 math); each has a fake kernel so
export and AOTInductor can trace shapes. Signatures (all shapes are contracts the kernels follow too):

- `qwen35::causal_conv1d(x [B,T,C], weight [C,W], conv_state [B,C,W-1], lengths [B] int64)
   -> (y [B,T,C] = silu(conv), final_conv_state [B,C,W-1])`; the final state holds the last W-1 inputs of
   each row's first `lengths[b]` tokens (state included), so right-padding never enters the state.
- `qwen35::gated_delta_rule(q [B,T,HK,K], k [B,T,HK,K], v [B,T,HV,V], g [B,T,HV] fp32, beta [B,T,HV] fp32,
   h0 [B,HV,K,V] fp32) -> (o [B,T,HV,V] in v's dtype, ht [B,HV,K,V] fp32)`; q/k are L2-normalised inside
   (fp32, eps 1e-6) and q scaled by K^-0.5; key head j serves value heads j*G .. j*G+G-1 (G = HV/HK).
   A token with g = 0 and beta = 0 leaves the state untouched exactly: that is how padding is masked.
- `qwen35::gated_rms_norm(o [..., V], z [..., V], weight [V], eps) -> [..., V]` in o's dtype: the GDN output
   norm, norm(o) (fp32, rounded to o's dtype) times weight, times silu(z) in fp32 (Qwen3_5MoeRMSNormGated).
   Plain torch math: a backend without a kernel for it inlines `gated_rms_norm_math` (INLINE_OPS).
- `qwen35::moe_router(logits [N,E], top_k) -> (weights [N,k] fp32, ids [N,k] int64)`: softmax in fp32 over
   all E, top-k (ties as torch.topk), renormalised to sum 1.
- `qwen35::moe_route(x [N,H], w_gate [L,H], num_experts E, top_k, real [N] bool | None) -> (weights [N,k+1] in
   x's dtype, ids [N,k+1] int64)`: the whole routing of a MoE layer whose gate holds the router rows, then the
   shared expert's gate row E (zero rows after; graph/fuse_weights.py) and whose shared expert is expert E:
   logits = x @ w_gate.T in x's dtype, `moe_router` over the first E, weights cast to x's dtype, then the
   shared slot (id E, weight sigmoid(logit E) in x's dtype); with `real`, a padding row (real[i] False)
   takes the ids of real row i mod max(sum(real), 1) and weight 0 in every slot. Plain torch math
   (`moe_route_math`, which calls `moe_router`): a backend without a kernel for it inlines it (INLINE_OPS).
- `qwen35::moe_experts(x [N,H], weights [N,k], ids [N,k] int64, w_gate_up [E,2I,H], w_down [E,H,I]) -> [N,H]`
- `qwen35::moe_experts_fp8(x, weights, ids, w_gate_up fp8, w_gate_up_scale [E,2I/128,ceil(H/128)],
   w_down fp8, w_down_scale [E,ceil(H/128),ceil(I/128)]) -> [N,H]`: block-scaled e4m3 experts.
- `qwen35::fp8_linear(x [..., in], w fp8 [out, in], w_scale [ceil(out/128), ceil(in/128)]) -> [..., out]`.
- `qwen35::decode_attention(q [B,T,NH,D], k_cache [B,KVH,T_max,D], v_cache, start [B], lengths [B] int64,
   scale) -> [B,T,NH,D]` in q's dtype: the caches already hold this call's keys; query t of row b (position
   start[b] + t) attends to positions j <= its own and j < max(start[b] + lengths[b], 1); query head h reads
   KV head h // (NH / KVH). Any T: decode, speculative verification and prefill.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ..checkpoint.fp8 import dequantize_fp8_block

LIB = "qwen35"


# -- causal conv1d ---------------------------------------------------------------------------------
@torch.library.custom_op(f"{LIB}::causal_conv1d", mutates_args=())
def causal_conv1d(x: Tensor, weight: Tensor, conv_state: Tensor, lengths: Tensor) -> tuple[Tensor, Tensor]:
    B, T, C = x.shape
    W = weight.shape[1]
    xx = torch.cat([conv_state.transpose(1, 2).float(), x.float()], dim=1)  # [B, W-1+T, C]
    w = weight.float()
    y = sum(xx[:, j:j + T, :] * w[:, j] for j in range(W))  # [B, T, C]
    y = F.silu(y).to(x.dtype)
    idx = lengths.to(torch.long)[:, None] + torch.arange(W - 1, device=x.device)  # [B, W-1]
    final = xx.gather(1, idx[:, :, None].expand(B, W - 1, C))  # [B, W-1, C]
    return y, final.transpose(1, 2).to(conv_state.dtype).contiguous()


@causal_conv1d.register_fake
def _(x, weight, conv_state, lengths):
    return torch.empty_like(x), torch.empty_like(conv_state)


# -- gated delta rule -------------------------------------------------------------------------------
def l2norm(x: Tensor, eps: float = 1e-6) -> Tensor:
    return x * torch.rsqrt((x * x).sum(dim=-1, keepdim=True) + eps)


@torch.library.custom_op(f"{LIB}::gated_delta_rule", mutates_args=())
def gated_delta_rule(q: Tensor, k: Tensor, v: Tensor, g: Tensor, beta: Tensor,
                     h0: Tensor) -> tuple[Tensor, Tensor]:
    B, T, HK, K = q.shape
    HV, V = v.shape[2], v.shape[3]
    G = HV // HK
    qf = l2norm(q.float()).repeat_interleave(G, dim=2) * (K ** -0.5)  # [B, T, HV, K]
    kf = l2norm(k.float()).repeat_interleave(G, dim=2)  # [B, T, HV, K]
    vf, gf, bf = v.float(), g.float(), beta.float()
    h = h0.float().clone()  # [B, HV, K, V]
    o = torch.empty(B, T, HV, V, dtype=torch.float32, device=v.device)
    for t in range(T):
        h = h * gf[:, t].exp()[:, :, None, None]
        kv_mem = torch.einsum("bhkv,bhk->bhv", h, kf[:, t])
        delta = (vf[:, t] - kv_mem) * bf[:, t][:, :, None]
        h = h + kf[:, t][:, :, :, None] * delta[:, :, None, :]
        o[:, t] = torch.einsum("bhkv,bhk->bhv", h, qf[:, t])
    return o.to(v.dtype), h


@gated_delta_rule.register_fake
def _(q, k, v, g, beta, h0):
    return torch.empty_like(v), torch.empty_like(h0, dtype=torch.float32)


# -- GDN output norm -------------------------------------------------------------------------------
def gated_rms_norm_math(o: Tensor, z: Tensor, weight: Tensor, eps: float) -> Tensor:
    """The body of `qwen35::gated_rms_norm` in standard torch ops (also what backends inline): the kernel's
    oracle, transformers' Qwen3_5MoeRMSNormGated formula."""
    from ..kernels.gdn_gating.reference import naive_gated_rms_norm

    return naive_gated_rms_norm(o, z, weight, eps)


@torch.library.custom_op(f"{LIB}::gated_rms_norm", mutates_args=())
def gated_rms_norm(o: Tensor, z: Tensor, weight: Tensor, eps: float) -> Tensor:
    return gated_rms_norm_math(o, z, weight, eps)


@gated_rms_norm.register_fake
def _(o, z, weight, eps):
    return torch.empty(o.shape, dtype=o.dtype, device=o.device)


# -- MoE --------------------------------------------------------------------------------------------
def moe_router_math(logits: Tensor, top_k: int) -> tuple[Tensor, Tensor]:
    """The body of `qwen35::moe_router` in standard torch ops (also what backends decompose the op into)."""
    probs = torch.softmax(logits.float(), dim=-1)
    w, ids = torch.topk(probs, top_k, dim=-1)
    w = w / w.sum(dim=-1, keepdim=True)
    return w, ids.to(torch.int64)


@torch.library.custom_op(f"{LIB}::moe_router", mutates_args=())
def moe_router(logits: Tensor, top_k: int) -> tuple[Tensor, Tensor]:
    return moe_router_math(logits, top_k)


@moe_router.register_fake
def _(logits, top_k):
    n = logits.shape[0]
    return (logits.new_empty(n, top_k, dtype=torch.float32),
            logits.new_empty(n, top_k, dtype=torch.int64))


def moe_route_math(x: Tensor, w_gate: Tensor, num_experts: int, top_k: int,
                   real: Tensor | None) -> tuple[Tensor, Tensor]:
    """The body of `qwen35::moe_route` in standard torch ops plus `qwen35::moe_router` (what backends without
    a kernel inline): the op-by-op routing of the model before the op existed, rounding for rounding."""
    return route_from_logits_math(F.linear(x, w_gate), num_experts, top_k, real)  # logits [N, L] in x's dtype


def route_from_logits_math(lg: Tensor, num_experts: int, top_k: int,
                           real: Tensor | None) -> tuple[Tensor, Tensor]:
    """`moe_route_math` after the gate GEMM, from its logits lg [N, L] (the route kernel's oracle)."""
    E = num_experts
    # Looked up at call time, not bound at import: validate/trace.py records the picks by patching it.
    rw, ids = torch.ops.qwen35.moe_router(lg[:, :E], top_k)
    rw = rw.to(lg.dtype)  # HF casts the renormalised weights to the activation dtype
    sg = torch.sigmoid(lg[:, E:E + 1]).to(rw.dtype)  # [N, 1]: the shared expert's gate
    rw = torch.cat([rw, sg], dim=1)  # [N, k+1]
    ids = torch.cat([ids, torch.full_like(ids[:, :1], E)], dim=1)
    if real is not None:  # padding rows read the experts real rows read anyway, with weight 0
        n_real = real.sum().clamp(min=1)
        tok = torch.arange(ids.shape[0], device=lg.device)
        ids = ids[torch.where(real, tok, tok % n_real)]
        rw = torch.where(real[:, None], rw, torch.zeros_like(rw))
    return rw, ids


@torch.library.custom_op(f"{LIB}::moe_route", mutates_args=())
def moe_route(x: Tensor, w_gate: Tensor, num_experts: int, top_k: int,
              real: Tensor | None) -> tuple[Tensor, Tensor]:
    return moe_route_math(x, w_gate, num_experts, top_k, real)


@moe_route.register_fake
def _(x, w_gate, num_experts, top_k, real):
    n = x.shape[0]
    return x.new_empty(n, top_k + 1), x.new_empty(n, top_k + 1, dtype=torch.int64)


def _experts_loop(x: Tensor, weights: Tensor, ids: Tensor, w13: Tensor, w2: Tensor) -> Tensor:
    """Loop over the experts that received tokens (transformers' form), fp32 accumulation."""
    N, H = x.shape
    I = w2.shape[2]
    out = torch.zeros(N, H, dtype=torch.float32, device=x.device)
    flat_ids = ids.reshape(-1)
    for e in torch.unique(flat_ids).tolist():
        tok, slot = torch.nonzero(ids == e, as_tuple=True)
        xe = x[tok].float()
        gu = xe @ w13[e].float().T  # [n, 2I]
        h = F.silu(gu[:, :I]) * gu[:, I:]
        y = h @ w2[e].float().T  # [n, H]
        out.index_add_(0, tok, y * weights[tok, slot].float()[:, None])
    return out.to(x.dtype)


@torch.library.custom_op(f"{LIB}::moe_experts", mutates_args=())
def moe_experts(x: Tensor, weights: Tensor, ids: Tensor, w_gate_up: Tensor, w_down: Tensor) -> Tensor:
    return _experts_loop(x, weights, ids, w_gate_up, w_down)


@moe_experts.register_fake
def _(x, weights, ids, w_gate_up, w_down):
    return torch.empty_like(x)


@torch.library.custom_op(f"{LIB}::moe_experts_fp8", mutates_args=())
def moe_experts_fp8(x: Tensor, weights: Tensor, ids: Tensor, w_gate_up: Tensor, w_gate_up_scale: Tensor,
                    w_down: Tensor, w_down_scale: Tensor) -> Tensor:
    # Reference: dequantise only the experts that are used, compute in fp32.
    E = w_gate_up.shape[0]
    used = torch.unique(ids.reshape(-1))
    w13 = torch.zeros(E, *w_gate_up.shape[1:], dtype=torch.float32, device=x.device)
    w2 = torch.zeros(E, *w_down.shape[1:], dtype=torch.float32, device=x.device)
    w13[used] = dequantize_fp8_block(w_gate_up[used], w_gate_up_scale[used])
    w2[used] = dequantize_fp8_block(w_down[used], w_down_scale[used])
    return _experts_loop(x, weights, ids, w13, w2)


@moe_experts_fp8.register_fake
def _(x, weights, ids, w_gate_up, w_gate_up_scale, w_down, w_down_scale):
    return torch.empty_like(x)


@torch.library.custom_op(f"{LIB}::fp8_linear", mutates_args=())
def fp8_linear(x: Tensor, w: Tensor, w_scale: Tensor) -> Tensor:
    wd = dequantize_fp8_block(w, w_scale, torch.float32)
    return (x.float() @ wd.T).to(x.dtype)


@fp8_linear.register_fake
def _(x, w, w_scale):
    return x.new_empty(*x.shape[:-1], w.shape[0])


# -- decode attention ---------------------------------------------------------------------------------
def decode_attention_math(q: Tensor, k_cache: Tensor, v_cache: Tensor, start: Tensor, lengths: Tensor,
                          scale: float) -> Tensor:
    """The body of `qwen35::decode_attention` in standard torch ops, fp32 (also what backends decompose the
    op into): the kernels' oracle run in fp32."""
    from ..kernels.attention.reference import naive_decode_attention

    return naive_decode_attention(q, k_cache, v_cache, start, lengths, scale, torch.float32).to(q.dtype)


@torch.library.custom_op(f"{LIB}::decode_attention", mutates_args=())
def decode_attention(q: Tensor, k_cache: Tensor, v_cache: Tensor, start: Tensor, lengths: Tensor,
                     scale: float) -> Tensor:
    return decode_attention_math(q, k_cache, v_cache, start, lengths, scale)


@decode_attention.register_fake
def _(q, k_cache, v_cache, start, lengths, scale):
    return torch.empty_like(q, memory_format=torch.contiguous_format)


# Ops that are plain torch math, by name: where no kernel replaces one (the cpu target, --kernels reference,
# ONNX, TensorRT) the graph inlines this body again (graph/inline_ops.py), so Inductor / the exporter see
# the same standard ops as before the op existed (moe_route's body keeps its `moe_router` node, which those
# backends map as before).
INLINE_OPS = {"gated_rms_norm": gated_rms_norm_math, "moe_route": moe_route_math}


REFERENCE_OPS = {
    "causal_conv1d": torch.ops.qwen35.causal_conv1d.default,
    "gated_delta_rule": torch.ops.qwen35.gated_delta_rule.default,
    "moe_router": torch.ops.qwen35.moe_router.default,
    "moe_experts": torch.ops.qwen35.moe_experts.default,
    "moe_experts_fp8": torch.ops.qwen35.moe_experts_fp8.default,
    "fp8_linear": torch.ops.qwen35.fp8_linear.default,
    "decode_attention": torch.ops.qwen35.decode_attention.default,
}
