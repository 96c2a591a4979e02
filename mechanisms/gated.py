"""Gated attention (GA-Net: Xue, Li, Yang, Li & Zhang 2020, "Not All Attention Is Needed:
Gated Attention Network for Sequence Data", AAAI 2020, arXiv:1912.00349).

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
keys stay open; a density ρ cuts the useful work to O(Lq·ρLk·d). This reference
implementation computes dense scores, O(Lq·Lk·d) time and memory, like softmax; with
``gate_bias`` → +∞ every gate opens and it *is* softmax attention.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from harness.attention import Attention, AttentionContext, allowed_mask
from harness.registry import register_mechanism


@dataclass
class GatedConfig:
    gate_hidden: int = 16  # hidden width of each head's gate MLP (key -> logit)
    gate_bias: float = 2.0  # initial gate logit: σ(2) ≈ 0.88, so most gates start open
    temperature: float = 0.5  # Gumbel-sigmoid temperature τ in training
    straight_through: bool = True  # hard 0/1 gates forward, soft gradient backward (training)
    sparsity_weight: float = 0.01  # aux_loss = sparsity_weight · mean open-gate probability


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


@register_mechanism("gated", GatedConfig, causal=True, cross=True, key_padding=True)
class GatedAttention(Attention):
    """GA-Net gated attention (Xue et al. 2020): learned Bernoulli gates choose the keys to attend."""

    def __init__(self, cfg: GatedConfig, *, heads: int, dim_head: int, max_len: int):
        super().__init__(cfg, heads=heads, dim_head=dim_head, max_len=max_len)
        if cfg.gate_hidden < 1 or cfg.temperature <= 0:
            raise ValueError(
                f"gated needs gate_hidden >= 1 and temperature > 0, got {cfg.gate_hidden}, {cfg.temperature}"
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
        allowed = allowed_mask(lq, lk, key_padding_mask=key_padding_mask, causal=causal, device=q.device)
        out = gated_attention(q, k, v, gates, allowed=allowed)

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
