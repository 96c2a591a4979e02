"""Low-rank deep polynomial attention: our reading of the thesis's "Low-rank Deep Polynomial
Network" as a token mixer, linear in L.

The thesis is not public, so this is *our reading*, grounded in two published pieces:

* Π-nets (Chrysos, Moschoglou, Bouritsas, Panagakis, Deng, Zafeiriou 2020, "Π-nets: Deep
  Polynomial Neural Networks", arXiv:2003.03828), the CCP model: a degree-N polynomial
  of z with a coupled CP (low-rank) decomposition,
      x_1 = U_1ᵀ z,   x_n = (U_nᵀ z) ∘ x_{n−1} + x_{n−1}   (n = 2..N),
  i.e. coordinate ρ of x_N is (U_1ᵀz)_ρ · Π_{n≥2} (1 + (U_nᵀz)_ρ): r rank-one polynomials.
* PoM (Picard 2024/2026, "PoM: A Linear-Time Replacement for Attention with the Polynomial
  Mixer", arXiv:2604.06129; code github.com/davidpicard/pom, pom/pom.py): tokens are turned
  into polynomial features and *averaged* into one state (the mean over visible tokens,
  prefix means when causal), which every query then reads. In PoM the query only gates the
  state's channels (σ(W_s x_i) ∘ mean_j h(x_j)), so all queries mix the tokens with the same
  weights; here the read is itself a low-rank polynomial of the query, so the weights on
  the tokens depend on the query's content (retrieval by content).

Per head, with ρ(x) = x / √(mean(x²) + ε) (RMS, no parameters) and separate CCP factors for
queries (A_n) and keys (B_n), U ∈ R^{D×r}:

    φ_Q(q) = ρ(CCP_A(ρ(q))),   φ_K(k) = ρ(CCP_B(ρ(k)))                    (r each, ‖φ‖ = √r)
    κ(q_i, k_j) = 1 + φ_Q(q_i)·φ_K(k_j) / r  ∈ [0, 2]                    (Cauchy–Schwarz)
    out_i = (1 / |A(i)|) Σ_{j∈A(i)} κ(q_i, k_j) v_j
          = mean_{A(i)} v  +  φ_Q(q_i)ᵀ [ (1/|A(i)|) Σ_{j∈A(i)} φ_K(k_j) v_jᵀ ] / r

A(i): the non-padded keys (causal: j ≤ i + Lk − Lq). κ is a polynomial of degree N in q and
N in k of CP rank r (the low-rank higher-order interactions); the constant 1 keeps PoM's
mean of the values. A query with no visible key returns 0. ``normalize=False`` drops every
ρ: κ − 1 is then exactly a degree-N polynomial in q (and in k).

Cost: the features O(L·N·D·r), the mixing O(L·r·D) non-causal; causal in chunks of
``causal_chunk_size`` C (exact dense C × C inside a chunk, prefix states Σ φ_K vᵀ across
chunks): O(L·(C + r)·D) time, O(L·C + (L/C)·r·D) memory. ``degree`` and ``rank`` trade
expressiveness for speed. ``polynomial_attention_reference`` is the plain (Lq, Lk) formula
the tests compare against in float64.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from harness.core import Attention, AttentionContext, allowed_mask, register_mechanism

RMS_EPS = 1e-6


@dataclass
class PolynomialConfig:
    degree: int = 3  # N: κ(q, k) − 1 is a degree-N polynomial in q and in k
    rank: int = 64  # r: CP rank of the interaction (width of the factors U_n: D × r)
    normalize: bool = True  # RMS-normalise inputs and features: κ ∈ [0, 2], bounded for any N
    causal_chunk_size: int = 128  # causal: keys per exact dense block between prefix states


# ----------------------------------------------------------------------------- math


def rms_normalize(x: Tensor) -> Tensor:
    """x / √(mean(x²) + ε) over the last dim (no parameters)."""
    return x * torch.rsqrt(x.square().mean(-1, keepdim=True) + RMS_EPS)


def ccp_features(x: Tensor, factors: Tensor, *, normalize: bool) -> Tensor:
    """The CCP polynomial of each token: x (B, H, L, D), factors (H, N, D, r) -> (B, H, L, r)."""
    if normalize:
        x = rms_normalize(x)
    proj = torch.einsum("bhld,hndr->nbhlr", x, factors)  # (N, B, H, L, r): U_nᵀ x for every degree
    y = proj[0]  # x_1
    for n in range(1, proj.shape[0]):  # a handful of degrees, not positions
        y = proj[n] * y + y  # x_n = (U_nᵀ x) ∘ x_{n−1} + x_{n−1}
    return rms_normalize(y) if normalize else y


def _augment(features: Tensor) -> Tensor:
    """[1, φ/√r]: (B, H, L, r) -> (B, H, L, r + 1), so that κ = ψ_Q·ψ_K."""
    return torch.cat([torch.ones_like(features[..., :1]), features / math.sqrt(features.shape[-1])], -1)


def mean_kernel_mixing(psi_q: Tensor, psi_k: Tensor, v: Tensor, keep: Tensor) -> Tensor:
    """Non-causal: out_i = Σ_j (ψ_Q,i·ψ_K,j) v_j / #valid keys. psi_q (B, H, Lq, F),
    psi_k (B, H, Lk, F) and v (B, H, Lk, D) zero at padded keys, keep (B, 1, Lk, 1) 1 at valid keys
    -> (B, H, Lq, D)."""
    state = torch.einsum("bhjf,bhjd->bhfd", psi_k, v)  # (B, H, F, D)
    count = keep.sum(-2, keepdim=True)  # (B, 1, 1, 1)
    return (psi_q @ state) / count.clamp_min(1.0)


def causal_mean_kernel_mixing(psi_q: Tensor, psi_k: Tensor, v: Tensor, keep: Tensor, *, chunk: int) -> Tensor:
    """Causal, square (L = Lq = Lk): out_i = Σ_{j ≤ i} (ψ_Q,i·ψ_K,j) v_j / #valid keys ≤ i, same
    shapes as ``mean_kernel_mixing``. Exact dense C × C inside a chunk, exclusive prefix sums
    of the chunk states Σ ψ_K vᵀ across chunks: a past output never reads a future key."""
    b, h, length, f = psi_q.shape
    d = v.shape[-1]
    c = max(1, min(chunk, length))
    n = math.ceil(length / c)
    pad = n * c - length
    qc = F.pad(psi_q, (0, 0, 0, pad)).view(b, h, n, c, f)
    kc = F.pad(psi_k, (0, 0, 0, pad)).view(b, h, n, c, f)
    vc = F.pad(v, (0, 0, 0, pad)).view(b, h, n, c, d)
    count = F.pad(keep, (0, 0, 0, pad)).view(b, 1, n * c).cumsum(-1).view(b, 1, n, c, 1)  # valid keys ≤ i

    chunk_state = torch.einsum("bhncf,bhncd->bhnfd", kc, vc)  # (B, H, N, F, D)
    before = torch.cat([torch.zeros_like(chunk_state[:, :, :1]), chunk_state[:, :, :-1]], 2).cumsum(2)
    tril = torch.ones(c, c, dtype=torch.bool, device=psi_q.device).tril()
    scores = (qc @ kc.transpose(-1, -2)).masked_fill(~tril, 0.0)  # (B, H, N, C, C)
    out = (qc @ before + scores @ vc) / count.clamp_min(1.0)  # (B, H, N, C, D)
    return out.reshape(b, h, n * c, d)[:, :, :length]


def polynomial_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    query_factors: Tensor,
    key_factors: Tensor,
    *,
    key_padding_mask: Tensor | None = None,
    causal: bool = False,
    normalize: bool = True,
    chunk: int = 128,
) -> Tensor:
    """q: (B, H, Lq, D), k/v: (B, H, Lk, D), factors (H, N, D, r) -> (B, H, Lq, D)."""
    b, _, lq, _ = q.shape
    lk = k.shape[-2]
    psi_q = _augment(ccp_features(q, query_factors, normalize=normalize))  # (B, H, Lq, r + 1)
    psi_k = _augment(ccp_features(k, key_factors, normalize=normalize))  # (B, H, Lk, r + 1)
    keep = torch.ones(b, 1, lk, 1, dtype=v.dtype, device=v.device)
    if key_padding_mask is not None:  # padded keys: zero feature rows and values (masked_fill: even inf goes)
        padded = key_padding_mask.bool()[:, None, :, None]
        psi_k, v = psi_k.masked_fill(padded, 0.0), v.masked_fill(padded, 0.0)
        keep = (~padded).to(v.dtype)
    if not causal:
        return mean_kernel_mixing(psi_q, psi_k, v, keep)
    size = max(lq, lk)  # bottom-right alignment: left-pad the shorter side (padded keys: keep = 0)
    out = causal_mean_kernel_mixing(
        F.pad(psi_q, (0, 0, size - lq, 0)),
        F.pad(psi_k, (0, 0, size - lk, 0)),
        F.pad(v, (0, 0, size - lk, 0)),
        F.pad(keep, (0, 0, size - lk, 0)),
        chunk=chunk,
    )
    return out[:, :, size - lq :]


def polynomial_attention_reference(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    query_factors: Tensor,
    key_factors: Tensor,
    *,
    key_padding_mask: Tensor | None = None,
    causal: bool = False,
    normalize: bool = True,
) -> Tensor:
    """The plain formula with an explicit (Lq, Lk) weight matrix w_ij = κ(q_i, k_j) / |A(i)|."""
    phi_q = ccp_features(q, query_factors, normalize=normalize)
    phi_k = ccp_features(k, key_factors, normalize=normalize)
    kappa = 1 + phi_q @ phi_k.transpose(-1, -2) / phi_q.shape[-1]  # (B, H, Lq, Lk)
    allowed = allowed_mask(q.shape[-2], k.shape[-2], key_padding_mask=key_padding_mask, causal=causal, device=q.device)
    if allowed is None:
        allowed = torch.ones(1, 1, q.shape[-2], k.shape[-2], dtype=torch.bool, device=q.device)
    weights = torch.where(allowed, kappa, torch.zeros(())) / allowed.sum(-1, keepdim=True).clamp_min(1)
    return weights @ v


# ----------------------------------------------------------------------------- module


@register_mechanism("polynomial", PolynomialConfig, causal=True, cross=True, key_padding=True, family="mixer")
class PolynomialAttention(Attention):
    """Low-rank deep polynomial attention (our reading; Π-net CCP kernel, PoM mean state), linear in L."""

    def __init__(self, cfg: PolynomialConfig, *, heads: int, dim_head: int, max_len: int):
        super().__init__(cfg, heads=heads, dim_head=dim_head, max_len=max_len)
        if cfg.degree < 1 or cfg.rank < 1 or cfg.causal_chunk_size < 1:
            raise ValueError(
                f"polynomial needs degree >= 1, rank >= 1 and causal_chunk_size >= 1; got degree={cfg.degree}, "
                f"rank={cfg.rank}, causal_chunk_size={cfg.causal_chunk_size}"
            )
        shape = (heads, cfg.degree, dim_head, cfg.rank)
        self.query_factors = nn.Parameter(torch.randn(shape) / math.sqrt(dim_head))
        self.key_factors = nn.Parameter(torch.randn(shape) / math.sqrt(dim_head))

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
        out_dtype = torch.get_autocast_dtype(q.device.type) if torch.is_autocast_enabled(q.device.type) else q.dtype
        dtype = torch.promote_types(q.dtype, torch.float32)  # products of N factors in >= fp32
        with torch.autocast(device_type=q.device.type, enabled=False):
            out = polynomial_attention(
                q.to(dtype),
                k.to(dtype),
                v.to(dtype),
                self.query_factors.to(dtype),
                self.key_factors.to(dtype),
                key_padding_mask=key_padding_mask,
                causal=causal,
                normalize=self.cfg.normalize,
                chunk=self.cfg.causal_chunk_size,
            )
        return out.to(out_dtype)
