"""Rectified Linear Attention, ReLA (Zhang, Titov & Sennrich 2021, "Sparse Attention with
Linear Units", EMNLP 2021, arXiv:2104.07012).

The softmax is replaced by a ReLU and the weights are not normalised (eq. 5–6, ReLA-g):

    W = ReLU(Q Kᵀ / √d)                      (B, H, Lq, Lk), exact zeros = sparsity
    O = RMSNorm(W V) ⊙ σ(G)                  RMSNorm(x) = g ⊙ x / √(mean(x²) + ε)

with g a learned gain per (head, head dim). The paper gates with σ(W_g x) where x is the
layer's query input; a mechanism only sees q, so here the gate is a learned per-head
linear map of q: G[b,h,i] = q[b,h,i] · W_g[h] + b_g[h] (W_g: (H, D, D), b_g: (H, D)).
``output_gate=False`` keeps the RMSNorm with its gain and drops the gate.

Masked pairs (padded keys, future keys) get weight exactly 0, so they have no influence;
a query with no positive score (or no allowed key) outputs 0 — ReLA heads can "switch
off". Exact (no approximation); O(Lq·Lk·d) time and O(Lq·Lk) memory, like softmax.
``metrics()['sparsity']`` is the share of exactly-zero weights among allowed pairs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from harness.attention import Attention, AttentionContext, allowed_mask
from harness.registry import register_mechanism


@dataclass
class ReLAConfig:
    norm_eps: float = 1e-6  # ε of the output RMSNorm
    output_gate: bool = True  # multiply the normalised output by σ(q W_g + b_g) (ReLA-g)


def relu_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    key_padding_mask: Tensor | None = None,
    causal: bool = False,
) -> tuple[Tensor, Tensor, Tensor | None]:
    """q: (B, H, Lq, D), k/v: (B, H, Lk, D) -> (W V: (B, H, Lq, D), W: (B, H, Lq, Lk),
    allowed: bool broadcastable to W, or None when nothing is masked)."""
    scores = q @ k.transpose(-1, -2) * (q.shape[-1] ** -0.5)  # (B, H, Lq, Lk)
    weights = F.relu(scores)
    allowed = allowed_mask(q.shape[-2], k.shape[-2], key_padding_mask=key_padding_mask, causal=causal, device=q.device)
    if allowed is not None:
        weights = weights.masked_fill(~allowed, 0.0)
    return weights @ v, weights, allowed


@torch.no_grad()
def zero_share(weights: Tensor, allowed: Tensor | None) -> Tensor:
    """Share of exactly-zero entries of weights (..., R, C) among allowed ones (a 0-dim
    tensor, so no device sync here); weights are already 0 where not allowed."""
    total = weights.numel()
    n_allowed = total if allowed is None else allowed.expand(weights.shape).sum()
    n_zero_allowed = (weights == 0).sum() - (total - n_allowed)
    return n_zero_allowed / torch.as_tensor(n_allowed, device=weights.device).clamp_min(1)


def gated_rms_norm(
    x: Tensor, q: Tensor, gain: Tensor, gate_weight: Tensor | None, gate_bias: Tensor | None, eps: float
) -> Tensor:
    """x, q: (B, H, L, D); gain, gate_bias: (H, D); gate_weight: (H, D, D) -> (B, H, L, D).

    g ⊙ x / √(mean_D(x²) + ε) ⊙ σ(q W_g + b_g), the norm in at least float32."""
    dtype = x.dtype
    x = x.to(torch.promote_types(dtype, torch.float32))
    out = x * torch.rsqrt(x.square().mean(-1, keepdim=True) + eps) * gain[:, None, :]
    if gate_weight is not None:
        gate = torch.einsum("bhld,hde->bhle", q, gate_weight.to(q.dtype)) + gate_bias[:, None, :].to(q.dtype)
        out = out * torch.sigmoid(gate.to(out.dtype))
    return out.to(dtype)


@register_mechanism("rela", ReLAConfig, causal=True, cross=True, key_padding=True)
class ReLAAttention(Attention):
    """Rectified Linear Attention (Zhang et al. 2021): ReLU weights, gated RMSNorm output."""

    def __init__(self, cfg: ReLAConfig, *, heads: int, dim_head: int, max_len: int):
        super().__init__(cfg, heads=heads, dim_head=dim_head, max_len=max_len)
        self.norm_gain = nn.Parameter(torch.ones(heads, dim_head))
        self.gate_weight: nn.Parameter | None = None
        self.gate_bias: nn.Parameter | None = None
        if cfg.output_gate:
            self.gate_weight = nn.Parameter(torch.randn(heads, dim_head, dim_head) * dim_head**-0.5)
            self.gate_bias = nn.Parameter(torch.zeros(heads, dim_head))
        self._sparsity: Tensor | None = None

    def normalise(self, out: Tensor, q: Tensor) -> Tensor:
        """The gated RMSNorm applied to the mixed values out (B, H, Lq, D)."""
        return gated_rms_norm(out, q, self.norm_gain, self.gate_weight, self.gate_bias, self.cfg.norm_eps)

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
        out, weights, allowed = relu_attention(q, k, v, key_padding_mask=key_padding_mask, causal=causal)
        self._sparsity = zero_share(weights, allowed)
        return self.normalise(out, q)

    def metrics(self) -> dict[str, float]:
        return {} if self._sparsity is None else {"sparsity": float(self._sparsity)}
