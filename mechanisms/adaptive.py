"""Adaptive attention: a low-rank content term plus a learned soft-span positional pattern.

After the EPFL–UPC master thesis "Understanding and improving self-attention mechanisms"
(2022), which proposes attention "based on low-rank projections and automatic attention
pattern learning". Its full text is not public: this file is OUR READING of that
description, not a reproduction. The pattern term follows adaptive span (Sukhbaatar,
Grave, Bojanowski, Joulin 2019, arXiv:1905.07799); the low-rank content term pools the
keys into r landmark slots with learned landmark queries (in the spirit of Linformer,
Wang et al. 2020, arXiv:2006.04768, with a length-agnostic, maskable projection).

Per head h, with D the head size, the output mixes two normalised attention branches,

    content (global, rank r):  P_mj(i) ∝ exp(c·tanh(λ_m·k_j / (c√D))) over the keys i sees,
                               k̃_m(i) = Σ_j P_mj(i) k_j,   ṽ_m(i) = Σ_j P_mj(i) v_j,
                               C_i = Σ_m softmax_m(q_i·k̃_m(i)/√D) ṽ_m(i)
    pattern (local, |i−j| < W): P_i = Σ_j s_h(|i−j|) e^{ℓ_ij} v_j / Σ_j s_h(|i−j|) e^{ℓ_ij},
                               ℓ_ij = q_i·k_j/√D + b_h(i − j)
    out_i = g_h C_i + (1 − g_h) P_i

This is the mixture formulation, our reading of "content and pattern logits mixed by a learned
per-head gate": one attention distribution over the r slots and the local keys, slot m with
weight g_h·softmax_m(q_i·k̃_m(i)/√D) and local key j with weight (1 − g_h)·(normalised local
weight), i.e. a convex mixture of two separately normalised branches in which the content
term (q·k̃ or q·k) and the pattern term (b_h(i − j) + log s_h, local keys only) add in the
logits and log g_h, log(1 − g_h) act as each branch's log-prior. b_h is a learned
relative-position logit, s_h(x) = clamp((R + z_h − x)/R, 0, 1) the soft span mask of
adaptive span (span z_h = (W − R)·σ(ζ_h) learned, ramp R; it multiplies the weights so z_h
gets gradients; keys at |i − j| ≥ R + z_h get weight 0), and g_h = σ(γ_h) the learned gate:
exactly the share of head h's output that comes from the global low-rank content branch.
``span_penalty`` > 0 adds adaptive span's L1 penalty, span_penalty · mean_h z_h / W, as
``aux_loss``. The landmark pooling logits are soft-capped at c = 20 so that (causal)
prefix sums of exp(· − c) never underflow in float32. Causal: the slots pool only keys
j ≤ i (prefix sums) and the window keeps j ≤ i. Padded keys get zero weight in the pooling
and the window. A branch in which a query sees no key contributes 0 (so a query that sees
no key outputs 0). Self-attention only (Lq = Lk): no cross capability.

metrics() reports each head's gate and span, so one can read which pattern a head chose
(g → 1: a global low-rank content head; g → 0: a local head with a learned positional
profile b_h over a learned span z_h).

Not a softmax approximation with a limit, but its knobs are the usual ones: ``num_landmarks``
(r, the rank of the global content term) and ``max_span`` (W, the window of exact local
attention) trade capacity (accuracy) for speed.
Cost O(L·(r + 3W)·D) time and O(L·(r + 3W)) memory per head (causal: O(L·r·D) for the
per-query slots): linear in L.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from harness.core import Attention, AttentionContext, register_mechanism

POOL_LOGIT_CAP = 20.0


@dataclass
class AdaptiveConfig:
    num_landmarks: int = 16  # r: rank of the global content term (more = closer to full attention)
    max_span: int = 32  # W: local window of the pattern term; cost O(L·3W·D)
    span_ramp: int = 8  # R: width of the soft span mask's ramp; learned span z ∈ (0, W − R)
    span_init: float = 0.5  # initial z / (W − R)
    gate_init: float = 0.5  # initial gate g (share of the output from the global content branch)
    span_penalty: float = 0.0  # aux_loss = span_penalty · mean_h z_h / W (adaptive span's L1); 0: none


def landmark_slots(k: Tensor, v: Tensor, landmarks: Tensor, keep: Tensor, *, causal: bool):
    """k/v: (B, H, L, D), landmarks: (H, r, D), keep: (B, L) bool -> k̃, ṽ (B, H, L|1, r, D)
    and slot_ok (B, 1, L|1, 1) (the query sees at least one key)."""
    scale = math.sqrt(k.shape[-1])
    logits = torch.einsum("bhjd,hmd->bhmj", k, landmarks) / scale  # (B, H, r, L)
    logits = POOL_LOGIT_CAP * torch.tanh(logits / POOL_LOGIT_CAP)
    weight = torch.exp(logits - POOL_LOGIT_CAP) * keep[:, None, None, :].to(k.dtype)  # in [e^-40, 1] or 0
    kv = torch.cat([k, v], dim=-1)  # (B, H, L, 2D)
    count = keep.to(k.dtype)[:, None, :, None]  # (B, 1, L, 1)
    if causal:  # prefix sums: slot m of query i pools keys j <= i
        num = torch.cumsum(weight[..., None] * kv[:, :, None], dim=3).transpose(2, 3)  # (B, H, L, r, 2D)
        den = torch.cumsum(weight, dim=3).transpose(2, 3)[..., None]  # (B, H, L, r, 1)
        count = torch.cumsum(count, dim=2)
    else:
        num = torch.einsum("bhmj,bhjc->bhmc", weight, kv)[:, :, None]  # (B, H, 1, r, 2D)
        den = weight.sum(-1)[:, :, None, :, None]
        count = count.sum(2, keepdim=True)
    pooled = num / den.clamp_min(torch.finfo(den.dtype).tiny)
    return *pooled.split(k.shape[-1], dim=-1), count > 0.5


def local_windows(x: Tensor, window: int) -> Tensor:
    """x: (B, H, L, D) -> (B, H, nb, 3W, D): for block b (queries bW..bW+W-1) the keys
    (b-1)W..(b+2)W-1, zero beyond the sequence."""
    b, h, length, d = x.shape
    nb = -(-length // window)
    x = F.pad(x, (0, 0, window, (nb + 1) * window - length)).view(b, h, nb + 2, window, d)
    return torch.cat([x[:, :, :-2], x[:, :, 1:-1], x[:, :, 2:]], dim=3)


def soft_span_mask(distance: Tensor, span: Tensor, ramp: int) -> Tensor:
    """s(x) = clamp((R + z - |x|)/R, 0, 1). distance: (...), span: (H,) -> (H, ...)."""
    z = span.reshape(-1, *([1] * distance.dim()))
    return ((ramp + z - distance.abs()) / ramp).clamp(0.0, 1.0)


def adaptive_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    landmarks: Tensor,
    rel_bias: Tensor,
    gate_logit: Tensor,
    span: Tensor,
    window: int,
    ramp: int,
    key_padding_mask: Tensor | None = None,
    causal: bool = False,
) -> Tensor:
    """q/k/v: (B, H, L, D); landmarks (H, r, D); rel_bias (H, 2W-1) for i-j in (-W, W);
    gate_logit, span: (H,) -> (B, H, L, D)."""
    bsz, heads, length, dim = q.shape
    nb, scale = -(-length // window), math.sqrt(dim)
    keep = torch.ones(bsz, length, dtype=torch.bool, device=q.device)
    if key_padding_mask is not None:
        keep = ~key_padding_mask.bool()
    v = v * keep[:, None, :, None]  # padded values exactly 0 (their weights are 0 too)

    # global content term: softmax over r landmark slots, (B, H, L, r)
    k_slot, v_slot, slot_ok = landmark_slots(k, v, landmarks, keep, causal=causal)
    if causal:
        slot_logit = torch.einsum("bhid,bhimd->bhim", q, k_slot) / scale
    else:
        slot_logit = torch.einsum("bhid,bhmd->bhim", q, k_slot[:, :, 0]) / scale
    w_slot = torch.softmax(slot_logit, dim=-1) * slot_ok  # a query that sees no key: 0
    if causal:
        slot_out = torch.einsum("bhim,bhimd->bhid", w_slot, v_slot)
    else:
        slot_out = torch.einsum("bhim,bhmd->bhid", w_slot, v_slot[:, :, 0])

    # local content + pattern term on blocks of W queries: (B, H, nb, W, 3W)
    q_blocks = F.pad(q, (0, 0, 0, nb * window - length)).view(bsz, heads, nb, window, dim)
    k_win, v_win = local_windows(k, window), local_windows(v, window)
    keep_win = local_windows(keep[:, None, :, None].to(q.dtype), window)[..., 0]  # (B, 1, nb, 3W)
    p, t = torch.arange(window, device=q.device), torch.arange(3 * window, device=q.device)
    distance = window + p[:, None] - t[None, :]  # (W, 3W): i - j
    in_window = (distance.abs() < window) & ((distance >= 0) if causal else True)
    bias = rel_bias[:, (distance + window - 1).clamp(0, 2 * window - 2)]  # (H, W, 3W)
    logits = torch.einsum("bhnpd,bhntd->bhnpt", q_blocks, k_win) / scale + bias[:, None]
    mult = (soft_span_mask(distance.to(q.dtype), span, ramp) * in_window)[:, None] * keep_win[:, :, :, None, :]
    visible = mult > 0  # soft span mask multiplies the weights (finite gradient for z)
    row_max = logits.masked_fill(~visible, float("-inf")).amax(-1, keepdim=True).detach()
    row_max = torch.where(torch.isfinite(row_max), row_max, torch.zeros_like(row_max))
    expo = torch.exp((logits - row_max).masked_fill(~visible, float("-inf"))) * mult
    w_local = expo / expo.sum(-1, keepdim=True).clamp_min(torch.finfo(expo.dtype).tiny)
    local_out = torch.einsum("bhnpt,bhntd->bhnpd", w_local, v_win).reshape(bsz, heads, nb * window, dim)

    # the per-head gate mixes the two normalised branches
    gate = torch.sigmoid(gate_logit)[:, None, None]  # (H, 1, 1)
    return gate * slot_out + (1 - gate) * local_out[:, :, :length]


@register_mechanism("adaptive", AdaptiveConfig, causal=True, key_padding=True, family="full")
class AdaptiveAttention(Attention):
    """Adaptive attention (our reading of an EPFL–UPC 2022 thesis): low-rank content + learned soft-span
    pattern, gated."""

    def __init__(self, cfg: AdaptiveConfig, *, heads: int, dim_head: int, max_len: int):
        super().__init__(cfg, heads=heads, dim_head=dim_head, max_len=max_len)
        if cfg.num_landmarks < 1 or not 1 <= cfg.span_ramp < cfg.max_span:
            raise ValueError(f"adaptive needs num_landmarks >= 1 and 1 <= span_ramp < max_span; got {cfg}")
        if not (0 < cfg.gate_init < 1 and 0 < cfg.span_init < 1):
            raise ValueError(f"adaptive needs gate_init and span_init in (0, 1); got {cfg}")
        self.landmarks = nn.Parameter(torch.randn(heads, cfg.num_landmarks, dim_head))
        self.rel_bias = nn.Parameter(torch.zeros(heads, 2 * cfg.max_span - 1))
        self.gate_logit = nn.Parameter(torch.full((heads,), math.log(cfg.gate_init / (1 - cfg.gate_init))))
        self.span_logit = nn.Parameter(torch.full((heads,), math.log(cfg.span_init / (1 - cfg.span_init))))

    def spans(self) -> Tensor:
        """(H,) learned spans z_h in tokens, in (0, max_span - span_ramp)."""
        return (self.cfg.max_span - self.cfg.span_ramp) * torch.sigmoid(self.span_logit)

    def forward(
        self,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        *,
        key_padding_mask: Tensor | None = None,
        causal: bool = False,
        context: AttentionContext | None = None,
    ) -> Tensor:
        dtype = torch.promote_types(q.dtype, torch.float32)  # softmax, pooling and exp in >= fp32
        with torch.autocast(device_type=q.device.type, enabled=False):
            span = self.spans().to(dtype)
            out = adaptive_attention(
                q.to(dtype),
                k.to(dtype),
                v.to(dtype),
                landmarks=self.landmarks.to(dtype),
                rel_bias=self.rel_bias.to(dtype),
                gate_logit=self.gate_logit.to(dtype),
                span=span,
                window=self.cfg.max_span,
                ramp=self.cfg.span_ramp,
                key_padding_mask=key_padding_mask,
                causal=causal,
            )
        self.aux_loss = self.cfg.span_penalty * span.mean() / self.cfg.max_span if self.cfg.span_penalty > 0 else None
        return out.to(q.dtype)

    def metrics(self) -> dict[str, float]:
        gates = torch.sigmoid(self.gate_logit.detach()).tolist()
        spans = self.spans().detach().tolist()
        out = {f"gate_head{h}": g for h, g in enumerate(gates)}
        out.update({f"span_head{h}": s for h, s in enumerate(spans)})
        out.update(gate_mean=sum(gates) / len(gates), span_mean=sum(spans) / len(spans))
        return out
