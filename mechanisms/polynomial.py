"""Polynomial token mixer: a Π-net CCP polynomial of each token and its context summary.

Π-nets (Chrysos, Moschoglou, Bouritsas, Panagakis, Deng, Zafeiriou 2020, "Π-nets: Deep
Polynomial Neural Networks", arXiv:2003.03828), the CCP (coupled CP decomposition) model,

    x_1 = U_1ᵀ z,    x_n = (U_nᵀ z) ∘ x_{n−1} + x_{n−1}  (n = 2..N),    y = C x_N,

is a degree-N polynomial of its input z. Used here as an attention replacement with linear
cost: the polynomial runs per query token, and all token mixing goes through a normalised
(gated-mean) summary of the keys the token may see. Exactly, per head, for query i:

    g_j  = σ(k_j)                                         gate of key j, per channel (D)
    m_i  = Σ_{j∈A(i)} g_j ∘ v_j / Σ_{j∈A(i)} g_j          context summary (D), a per-channel
                                                          convex combination of values
    z_i  = [ρ(q_i) ; ρ(m_i)]                              (2D), ρ(x) = x / √(mean(x²) + ε)
    x_1  = ρ(U_1ᵀ z_i),   x_n = ρ((U_nᵀ z_i) ∘ x_{n−1} + x_{n−1}),   out_i = C x_N

with A(i) the non-padded keys (all of them; or, causal, the prefix j ≤ i + Lk − Lq, by a
cumulative sum), U_n ∈ R^{2D×r}, C ∈ R^{r×D}, one set per head. A query with no allowed
key outputs 0. The query q is the token, the keys only gate and the values are what is
mixed; the products (U_nᵀ z) ∘ x_{n−1} create the multiplicative query–context
interactions that attention gets from q·k. ρ (parameter-free RMS normalisation) is applied
to the inputs and after every degree, so ‖x_n‖ = √r for any N and activations stay
bounded however high the degree (Chrysos et al. normalise between degrees too); with
``normalize=False`` the output is exactly a degree-N polynomial of (q, m).

Not a softmax approximation. Cost O(L·N·r·D) time, O(L·r) extra memory: linear in L.
``degree`` (N) and ``rank`` (r) trade expressiveness for speed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from harness.attention import Attention, AttentionContext
from harness.registry import register_mechanism

RMS_EPS = 1e-6


@dataclass
class PolynomialConfig:
    degree: int = 3  # N: the mixer is a degree-N polynomial of (token, context summary)
    rank: int = 64  # r: width of the factors U_n (2D × r) and C (r × D)
    normalize: bool = True  # RMS-normalise inputs and every degree: bounded for any N


def rms_normalize(x: Tensor) -> Tensor:
    """x / √(mean(x²) + ε) over the last dim (no parameters)."""
    return x * torch.rsqrt(x.square().mean(-1, keepdim=True) + RMS_EPS)


def gated_context_summary(
    k: Tensor, v: Tensor, lq: int, *, key_padding_mask: Tensor | None, causal: bool
) -> tuple[Tensor, Tensor]:
    """k/v: (B, H, Lk, D) -> m (B, H, Lq, D), the gated mean of the values each query may
    see, and has_keys (B, 1, Lq, 1) bool. Padded keys are zeroed before every sum."""
    b, _, lk, _ = k.shape
    gate = torch.sigmoid(k)  # (B, H, Lk, D)
    keep = torch.ones(b, lk, dtype=k.dtype, device=k.device)
    if key_padding_mask is not None:
        keep = (~key_padding_mask.bool()).to(k.dtype)
    keep4 = keep[:, None, :, None]  # (B, 1, Lk, 1)
    num, den, count = gate * v * keep4, gate * keep4, keep4  # padded rows are exactly 0
    if causal:  # query i sees keys j <= i + (Lk - Lq): prefix sums, aligned bottom-right
        num, den, count = (torch.cumsum(x, dim=2) for x in (num, den, count))
        shift = lk - lq
        if shift >= 0:
            num, den, count = (x[:, :, shift:] for x in (num, den, count))
        else:  # the first -shift queries see no key
            pad = (0, 0, -shift, 0)
            num, den, count = (torch.nn.functional.pad(x, pad) for x in (num, den, count))
    else:
        num, den, count = (x.sum(dim=2, keepdim=True) for x in (num, den, count))
    summary = num / den.clamp_min(torch.finfo(den.dtype).tiny)
    has_keys = (count > 0.5).expand(b, 1, lq, 1)
    return summary.expand(*num.shape[:2], lq, num.shape[-1]), has_keys


def ccp_polynomial(z: Tensor, factors: Tensor, out_proj: Tensor, *, normalize: bool) -> Tensor:
    """The CCP recursion per token. z: (B, H, L, 2D), factors U: (H, N, 2D, r),
    out_proj C: (H, r, D) -> (B, H, L, D)."""
    norm = rms_normalize if normalize else (lambda x: x)
    x = norm(torch.einsum("bhlc,hcr->bhlr", z, factors[:, 0]))  # x_1 = U_1ᵀ z
    for n in range(1, factors.shape[1]):  # a handful of degrees, not positions
        x = norm(torch.einsum("bhlc,hcr->bhlr", z, factors[:, n]) * x + x)
    return torch.einsum("bhlr,hrd->bhld", x, out_proj)


def polynomial_mixer(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    factors: Tensor,
    out_proj: Tensor,
    *,
    key_padding_mask: Tensor | None = None,
    causal: bool = False,
    normalize: bool = True,
) -> Tensor:
    """q: (B, H, Lq, D), k/v: (B, H, Lk, D) -> (B, H, Lq, D)."""
    summary, has_keys = gated_context_summary(k, v, q.shape[-2], key_padding_mask=key_padding_mask, causal=causal)
    if normalize:
        q, summary = rms_normalize(q), rms_normalize(summary)
    z = torch.cat([q, summary], dim=-1)  # (B, H, Lq, 2D)
    out = ccp_polynomial(z, factors, out_proj, normalize=normalize)
    return out.masked_fill(~has_keys, 0.0)


@register_mechanism("polynomial", PolynomialConfig, causal=True, cross=True, key_padding=True)
class PolynomialMixer(Attention):
    """Π-net CCP polynomial token mixer (Chrysos et al. 2020), linear in L."""

    def __init__(self, cfg: PolynomialConfig, *, heads: int, dim_head: int, max_len: int):
        super().__init__(cfg, heads=heads, dim_head=dim_head, max_len=max_len)
        if cfg.degree < 1 or cfg.rank < 1:
            raise ValueError(f"polynomial needs degree >= 1 and rank >= 1; got degree={cfg.degree}, rank={cfg.rank}")
        fan_in = 2 * dim_head
        self.factors = nn.Parameter(torch.randn(heads, cfg.degree, fan_in, cfg.rank) / math.sqrt(fan_in))
        self.out_proj = nn.Parameter(torch.randn(heads, cfg.rank, dim_head) / math.sqrt(cfg.rank))

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
        dtype = torch.promote_types(q.dtype, torch.float32)  # sums and products in >= fp32
        with torch.autocast(device_type=q.device.type, enabled=False):
            out = polynomial_mixer(
                q.to(dtype), k.to(dtype), v.to(dtype), self.factors.to(dtype), self.out_proj.to(dtype),
                key_padding_mask=key_padding_mask, causal=causal, normalize=self.cfg.normalize,
            )
        return out.to(q.dtype)
