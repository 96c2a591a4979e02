"""Gated attention (GA-Net: Lanqing Xue, Xiaopeng Li & Nevin L. Zhang 2020, "Not All Attention
Is Needed: Gated Attention Network for Sequence Data", AAAI 2020, arXiv:1912.00349).

An auxiliary network scores every key, s_j = MLP_h(k_j) (one small MLP per head, reading
the key vector), and a binary gate g_j ~ Bernoulli(σ(s_j)) decides whether key j may be
attended to at all:

    α_ij = g_j exp(q_i·k_j/√d) / Σ_l g_l exp(q_i·k_l/√d)      (over allowed keys l)
    z_i  = Σ_j α_ij v_j

Training samples the gates with the Gumbel-sigmoid (binary concrete) relaxation
g = σ((s + log u − log(1 − u)) / τ), u ~ U(0, 1); with ``straight_through`` the forward
pass uses the hard gate 1[g > ½] and the backward pass the gradient of the soft one, so
closed keys have exactly no influence in training too. Evaluation thresholds
deterministically: g_j = 1[σ(s_j) > ½]. Padded / future keys are masked as in softmax.
A row whose every allowed key is closed returns zeros (no fallback).

Regulariser: ``aux_loss = sparsity_weight · mean σ(s_j)`` over non-padded keys (the
expected share of open gates). ``metrics()`` reports ``gate_density`` (share of open
gates among non-padded keys) and ``gate_probability`` (mean σ(s_j)).

Accuracy/speed: ``sparsity_weight`` (and ``gate_bias``, the initial logit) set how many
keys stay open; a density ρ cuts the useful work to O(Lq·ρLk·d). This implementation
computes dense scores, O(Lq·Lk·d) time, like softmax; with ``gate_bias`` → +∞ every gate
opens and it *is* softmax attention. The forward is softmax with the additive key bias
log g_j; the backward also needs ∂L/∂g_j at closed keys (g_j = 0), which the straight-through
estimator passes to the gate network:

    ∂L/∂g_j = Σ_i exp(s_ij − m_i)/Z_i · (dO_i·v_j − dO_i·z_i),   Z_i = Σ_l g_l exp(s_il − m_i)

(exp(s_ij − m_i) clamped at e^20 for closed keys above the open maximum m_i).

Fast path: ``blocked_gated_attention`` runs ``block_size`` queries at a time and recomputes
each block's scores in backward (a custom autograd Function, saving only the per-query shift
and denominator), so no (Lq, Lk) tensor is kept; causal blocks skip the keys they cannot see.
``gated_attention`` is the plain formula the tests compare it against in float64.

Deviations from the paper: GA-Net's auxiliary network reads the backbone's hidden states; a
mechanism sees only q, k, v, so each head's gate reads its key vector through a small per-head
MLP. The sparsity regulariser is our reading: the mean open-gate probability.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from harness.core import Attention, AttentionContext, allowed_mask, register_mechanism


@dataclass
class GatedConfig:
    gate_hidden: int = 16  # hidden width of each head's gate MLP (key -> logit)
    gate_bias: float = 2.0  # initial gate logit: σ(2) ≈ 0.88, so most gates start open
    temperature: float = 0.5  # Gumbel-sigmoid temperature τ in training
    straight_through: bool = True  # hard 0/1 gates forward, soft gradient backward (training)
    sparsity_weight: float = 0.01  # aux_loss = sparsity_weight · mean open-gate probability
    block_size: int = 256  # queries per block of the fused path (memory O(block·Lk)); 0 = plain formula


def gate_logits(k: Tensor, w1: Tensor, b1: Tensor, w2: Tensor, b2: Tensor) -> Tensor:
    """Per-head MLP scorer in float32. k: (B, H, L, D), w1: (H, D, F), b1: (H, F),
    w2: (H, F), b2: (H,) -> logits s: (B, H, L)."""
    with torch.autocast(device_type=k.device.type, enabled=False):
        hidden = F.gelu(torch.einsum("bhld,hdf->bhlf", k.float(), w1.float()) + b1.float()[:, None, :])  # (B, H, L, F)
        return torch.einsum("bhlf,hf->bhl", hidden, w2.float()) + b2.float()[:, None]  # (B, H, L)


def sample_gates(logits: Tensor, *, training: bool, temperature: float, straight_through: bool) -> Tensor:
    """logits: (B, H, L) float32 -> gates (B, H, L) in [0, 1].

    Training: Gumbel-sigmoid relaxation (hard forward / soft backward if straight_through).
    Evaluation: deterministic threshold σ(s) > ½, i.e. s > 0."""
    if not training:
        return (logits > 0).to(logits.dtype)
    u = torch.rand_like(logits).clamp(1e-6, 1 - 1e-6)
    soft = torch.sigmoid((logits + torch.log(u) - torch.log1p(-u)) / temperature)
    if not straight_through:
        return soft
    hard = (soft > 0.5).to(soft.dtype)
    return hard + soft - soft.detach()


def gated_attention(q: Tensor, k: Tensor, v: Tensor, gates: Tensor, *, allowed: Tensor | None = None) -> Tensor:
    """q: (B, H, Lq, D), k/v: (B, H, Lk, D), gates: (B, H, Lk) in [0, 1], allowed: bool
    broadcastable to (B, H, Lq, Lk) or None -> (B, H, Lq, D).

    α_ij ∝ g_j exp(e_ij) over allowed keys; a row with no open allowed key gives 0."""
    b, h, lq, _ = q.shape
    lk = k.shape[-2]
    compute = torch.promote_types(q.dtype, torch.float32)
    scores = torch.matmul(q, k.transpose(-1, -2)).to(compute) / math.sqrt(q.shape[-1])  # (B, H, Lq, Lk)
    g = gates.to(compute)[:, :, None, :]  # (B, H, 1, Lk)
    allowed = torch.ones(1, 1, 1, 1, dtype=torch.bool, device=q.device) if allowed is None else allowed
    allowed = allowed.expand(b, h, lq, lk)
    open_keys = allowed & (g.detach() > 0)  # (B, H, Lq, Lk)
    # Stabiliser (cancels in the ratio): max over open keys, else over allowed keys, else 0.
    neg = torch.finfo(compute).min
    shift = scores.detach().masked_fill(~open_keys, neg).amax(-1, keepdim=True)  # (B, H, Lq, 1)
    shift_allowed = scores.detach().masked_fill(~allowed, neg).amax(-1, keepdim=True)
    shift = torch.where(
        open_keys.any(-1, keepdim=True), shift, torch.where(allowed.any(-1, keepdim=True), shift_allowed, 0)
    )
    # Open keys have scores - shift <= 0; closed ones may lie above and are clamped so that
    # g = 0 times exp never overflows (their straight-through gradient stays finite).
    expo = torch.exp((scores - shift).clamp_max(20.0)).masked_fill(~allowed, 0.0)  # (B, H, Lq, Lk)
    weights = g * expo
    denom = weights.sum(-1, keepdim=True)  # (B, H, Lq, 1)
    weights = weights / torch.where(denom > 0, denom, torch.ones_like(denom))
    return torch.matmul(weights.to(v.dtype), v)


GATE_CLAMP = 20.0  # closed keys' exp(s - shift) is clamped at e^20 for their gate gradient


class _BlockedGatedAttention(torch.autograd.Function):
    """``gated_attention`` over query blocks, recomputing each block in backward: nothing
    (Lq, Lk) is kept. Inputs: q pre-scaled by 1/√d; ``pad`` (B, 1, 1, Lk) additive 0/−inf at
    padded keys; ``gates`` (B, H, Lk). Saved per query: the shift m and the denominator."""

    @staticmethod
    def forward(ctx, q, k, v, gates, pad, causal, block):  # noqa: D102
        b, h, lq, _ = q.shape
        lk = k.shape[-2]
        offset = lk - lq if causal else None
        log_gates = torch.log(gates)[:, :, None, :] + pad  # (B, H, 1, Lk): −inf at closed / padded keys
        out = q.new_zeros(b, h, lq, v.shape[-1])
        shift = q.new_zeros(b, h, lq, 1)
        denom = q.new_ones(b, h, lq, 1)
        for s in range(0, lq, block):
            e = min(s + block, lq)
            kend = lk if offset is None else max(0, min(lk, e + offset))
            if kend == 0:
                continue
            scores = q[:, :, s:e] @ k[:, :, :kend].transpose(-1, -2)  # (B, H, c, Lk')
            _mask_future(scores, s, offset)
            biased = scores + log_gates[..., :kend]
            m = biased.amax(-1, keepdim=True)  # (B, H, c, 1): max over open keys
            none_open = torch.isinf(m)
            if bool(none_open.any()):  # rows with no open key: shift by the max over allowed keys (or 0)
                m_allowed = (scores + pad[..., :kend]).amax(-1, keepdim=True)
                m = torch.where(none_open, torch.nan_to_num(m_allowed, neginf=0.0), m)
            weights = torch.exp_(biased.sub_(m))  # g·exp(s − m), 0 at closed / masked keys
            total = weights.sum(-1, keepdim=True)
            total = torch.where(total > 0, total, torch.ones_like(total))
            out[:, :, s:e] = (weights @ v[:, :, :kend]) / total
            shift[:, :, s:e], denom[:, :, s:e] = m, total
        ctx.save_for_backward(q, k, v, gates, pad, out, shift, denom)
        ctx.causal, ctx.block = causal, block
        return out

    @staticmethod
    def backward(ctx, grad_out):  # noqa: D102
        q, k, v, gates, pad, out, shift, denom = ctx.saved_tensors
        lq, lk = q.shape[-2], k.shape[-2]
        offset = lk - lq if ctx.causal else None
        dq = torch.zeros_like(q)
        dk, dv, dg = torch.zeros_like(k), torch.zeros_like(v), torch.zeros_like(gates)
        delta = (grad_out * out).sum(-1, keepdim=True)  # (B, H, Lq, 1): δ_i = dO_i·o_i
        g = gates[:, :, None, :]
        log_denom = torch.log(denom)
        for s in range(0, lq, ctx.block):
            e = min(s + ctx.block, lq)
            kend = lk if offset is None else max(0, min(lk, e + offset))
            if kend == 0:
                continue
            qb, kb, vb, gb = q[:, :, s:e], k[:, :, :kend], v[:, :, :kend], grad_out[:, :, s:e]
            scores = qb @ kb.transpose(-1, -2)  # (B, H, c, Lk')
            _mask_future(scores, s, offset)
            # r = exp(min(s − m, 20)) / denom at every allowed key, open or closed
            ld = log_denom[:, :, s:e]
            r = torch.exp_(torch.minimum(scores.add_(pad[..., :kend]).sub_(shift[:, :, s:e] + ld), GATE_CLAMP - ld))
            alpha = r * g[..., :kend]  # the attention weights
            dv[:, :, :kend] += alpha.transpose(-1, -2) @ gb
            t = (gb @ vb.transpose(-1, -2)).sub_(delta[:, :, s:e])  # dO_i·v_j − δ_i
            dg[..., :kend] += (r * t).sum(-2)  # ∂L/∂g_j = Σ_i exp(s_ij − m_i)/denom_i (dO_i·v_j − δ_i)
            ds = alpha.mul_(t)  # softmax gradient of the gated weights
            dq[:, :, s:e] = ds @ kb
            dk[:, :, :kend] += ds.transpose(-1, -2) @ qb
        return dq, dk, dv, dg, None, None, None


def _mask_future(scores: Tensor, start: int, offset: int | None) -> None:
    """In place: −inf where key j > i + offset, only in the keys that cut the block."""
    if offset is None:
        return
    c, lk = scores.shape[-2], scores.shape[-1]
    first = max(0, start + offset + 1)
    if first < lk:
        i = torch.arange(start, start + c, device=scores.device)[:, None]
        j = torch.arange(first, lk, device=scores.device)[None, :]
        scores[..., first:].masked_fill_(j > i + offset, float("-inf"))


def blocked_gated_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    gates: Tensor,
    *,
    key_padding_mask: Tensor | None = None,
    causal: bool = False,
    block_size: int = 256,
) -> Tensor:
    """Fast form of ``gated_attention`` (same shapes), in at least float32, blocked over queries."""
    compute = torch.promote_types(q.dtype, torch.float32)
    q = q.to(compute) * q.shape[-1] ** -0.5
    pad = torch.zeros(q.shape[0], 1, 1, k.shape[-2], dtype=compute, device=q.device)
    if key_padding_mask is not None:
        pad = pad.masked_fill(key_padding_mask.bool()[:, None, None, :], float("-inf"))
    return _BlockedGatedAttention.apply(q, k.to(compute), v.to(compute), gates.to(compute), pad, causal, block_size)


@register_mechanism("gated", GatedConfig, causal=True, cross=True, key_padding=True, family="full")
class GatedAttention(Attention):
    """GA-Net gated attention (Xue et al. 2020): learned Bernoulli gates choose the keys to attend."""

    def __init__(self, cfg: GatedConfig, *, heads: int, dim_head: int, max_len: int):
        super().__init__(cfg, heads=heads, dim_head=dim_head, max_len=max_len)
        if cfg.gate_hidden < 1 or cfg.temperature <= 0 or cfg.block_size < 0:
            raise ValueError(
                f"gated needs gate_hidden >= 1, temperature > 0 and block_size >= 0 (0 = plain formula), got {cfg}"
            )
        f = cfg.gate_hidden
        self.gate_w1 = nn.Parameter(torch.randn(heads, dim_head, f) * dim_head**-0.5)
        self.gate_b1 = nn.Parameter(torch.zeros(heads, f))
        self.gate_w2 = nn.Parameter(torch.randn(heads, f) * f**-0.5)
        self.gate_b2 = nn.Parameter(torch.full((heads,), float(cfg.gate_bias)))
        self._density: Tensor | None = None
        self._probability: Tensor | None = None

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
        lq, lk = q.shape[-2], k.shape[-2]
        logits = gate_logits(k, self.gate_w1, self.gate_b1, self.gate_w2, self.gate_b2)  # (B, H, Lk)
        gates = sample_gates(
            logits, training=self.training, temperature=self.cfg.temperature, straight_through=self.cfg.straight_through
        )
        if self.cfg.block_size == 0:
            allowed = allowed_mask(lq, lk, key_padding_mask=key_padding_mask, causal=causal, device=q.device)
            out = gated_attention(q, k, v, gates, allowed=allowed)
        else:
            out_dtype = torch.get_autocast_dtype(q.device.type) if torch.is_autocast_enabled(q.device.type) else q.dtype
            with torch.autocast(q.device.type, enabled=False):
                out = blocked_gated_attention(
                    q, k, v, gates, key_padding_mask=key_padding_mask, causal=causal, block_size=self.cfg.block_size
                ).to(out_dtype)

        real = (
            torch.ones_like(logits)
            if key_padding_mask is None
            else (~key_padding_mask.bool())[:, None, :].expand_as(logits).float()
        )
        count = real.sum().clamp_min(1.0)
        probability = (torch.sigmoid(logits) * real).sum() / count
        self.aux_loss = self.cfg.sparsity_weight * probability
        self._probability = probability.detach()
        self._density = ((gates.detach() > 0.5).float() * real).sum() / count
        return out

    def metrics(self) -> dict[str, float]:
        if self._density is None:
            return {}
        return {"gate_density": float(self._density), "gate_probability": float(self._probability)}
