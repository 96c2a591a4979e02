"""Linear attention (Katharopoulos, Vyas, Pappas, Fleuret 2020, "Transformers are RNNs: Fast
Autoregressive Transformers with Linear Attention", arXiv:2006.16236), eq. 6 and 9:

    φ(x) = elu(x) + 1
    out_i = φ(q_i)ᵀ Σ_j φ(k_j) v_jᵀ  /  (φ(q_i)ᵀ Σ_j φ(k_j) + ε)          (non-causal)
    out_i = φ(q_i)ᵀ S_i / (φ(q_i)ᵀ z_i + ε),  S_i = Σ_{j≤i} φ(k_j) v_jᵀ, z_i = Σ_{j≤i} φ(k_j)   (causal)

as in the authors' code (idiap/fast-transformers, ``fast_transformers/attention/
linear_attention.py`` and ``causal_linear_attention.py``: ``elu_feature_map``, eps = 1e-6
added to the denominator, padded keys' features zeroed by the length mask). Cost
O(L·d²) time and O(L·d + d²) memory non-causal. Causal: chunked prefix sums — inside a chunk
of C queries the C × C masked products, across chunks the exclusive running sums of
Σ φ(k) vᵀ (in float32 at least): O(L·C·d + L·d²) time, O(L·C + (L/C)·d²) memory, never a
(B, H, L, d, d) tensor. With Lq ≠ Lk the causal rule is bottom-right aligned (query i sees
key j ≤ i + Lk − Lq).

Deviations: the authors' causal kernel is a custom CUDA/C++ ``causal_dot_product`` (a
sequential scan); here the same sums are formed chunkwise in plain torch. No 1/√d scaling
(none in the paper or the code: φ makes any scale a different kernel).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from harness.core import Attention, AttentionContext, causal_mask, register_mechanism, zero_padded


@dataclass
class LinearConfig:
    eps: float = 1e-6  # added to the denominator (the authors' default)
    causal_chunk_size: int = 64  # queries per block of the chunked causal prefix sum: time vs memory


def elu_feature_map(x: Tensor) -> Tensor:
    """φ(x) = elu(x) + 1 > 0, elementwise."""
    return F.elu(x) + 1.0


def linear_attention(qf: Tensor, kf: Tensor, v: Tensor, *, eps: float) -> Tensor:
    """Non-causal: features (B, H, Lq, D), (B, H, Lk, D), values (B, H, Lk, E) -> (B, H, Lq, E)."""
    kv = torch.einsum("bhjd,bhje->bhde", kf, v)  # (B, H, D, E)
    z = kf.sum(-2)  # (B, H, D)
    den = torch.einsum("bhid,bhd->bhi", qf, z) + eps  # (B, H, Lq)
    return (qf @ kv) / den[..., None]


def causal_linear_attention(qf: Tensor, kf: Tensor, v: Tensor, *, eps: float, chunk_size: int) -> Tensor:
    """Causal (query i sees key j ≤ i + Lk − Lq) by chunked prefix sums.

    (B, H, Lq, D), (B, H, Lk, D), (B, H, Lk, E) -> (B, H, Lq, E)."""
    b, h, lq, d = qf.shape
    e = v.shape[-1]
    offset = kf.shape[-2] - lq
    if offset < 0:  # the first −offset queries see no key: prepend zero keys (they add nothing)
        kf, v = F.pad(kf, (0, 0, -offset, 0)), F.pad(v, (0, 0, -offset, 0))
        offset = 0
    acc = torch.promote_types(qf.dtype, torch.float32)
    kv0 = torch.einsum("bhjd,bhje->bhde", kf[:, :, :offset], v[:, :, :offset]).to(acc)  # keys every query sees
    z0 = kf[:, :, :offset].sum(-2).to(acc)  # (B, H, D)
    kf, v = kf[:, :, offset:], v[:, :, offset:]

    c = max(1, min(chunk_size, lq))
    n = math.ceil(lq / c)
    pad = n * c - lq
    qc = F.pad(qf, (0, 0, 0, pad)).reshape(b, h, n, c, d)
    kc = F.pad(kf, (0, 0, 0, pad)).reshape(b, h, n, c, d)
    vc = F.pad(v, (0, 0, 0, pad)).reshape(b, h, n, c, e)

    chunk_kv = torch.einsum("bhncd,bhnce->bhnde", kc, vc).to(acc)  # (B, H, N, D, E): one state per chunk
    chunk_z = kc.sum(-2).to(acc)  # (B, H, N, D)
    # exclusive prefix: the state before chunk n = kv0 + Σ_{n' < n} chunk_kv[n']
    kv_before = torch.cat([kv0[:, :, None], chunk_kv[:, :, :-1]], 2).cumsum(2).to(qf.dtype)
    z_before = torch.cat([z0[:, :, None], chunk_z[:, :, :-1]], 2).cumsum(2).to(qf.dtype)

    inner = torch.einsum("bhncd,bhnkd->bhnck", qc, kc)  # (B, H, N, C, C)
    inner = inner.masked_fill(~torch.ones(c, c, dtype=torch.bool, device=qf.device).tril(), 0.0)
    num = qc @ kv_before + inner @ vc  # (B, H, N, C, E)
    den = (qc @ z_before.unsqueeze(-1)).squeeze(-1) + inner.sum(-1) + eps  # (B, H, N, C)
    return (num / den[..., None]).reshape(b, h, n * c, e)[:, :, :lq]


def linear_attention_reference(q, k, v, *, eps: float, key_padding_mask=None, causal=False) -> Tensor:
    """The plain formula in float64 with the (Lq, Lk) matrix of φ(q_i)·φ(k_j) (for tests)."""
    qf, kf = elu_feature_map(q.double()), elu_feature_map(k.double())
    a = torch.einsum("bhid,bhjd->bhij", qf, kf)
    if causal:
        a = a * causal_mask(q.shape[-2], k.shape[-2])
    if key_padding_mask is not None:
        a = a * ~key_padding_mask.bool()[:, None, None, :]
    return (a @ v.double()) / (a.sum(-1, keepdim=True) + eps)


@register_mechanism("linear", LinearConfig, causal=True, cross=True, key_padding=True, family="kernel")
class LinearAttention(Attention):
    """Linear attention (Katharopoulos et al. 2020), φ = elu + 1, O(L·d²)."""

    def __init__(self, cfg: LinearConfig, *, heads: int, dim_head: int, max_len: int):
        super().__init__(cfg, heads=heads, dim_head=dim_head, max_len=max_len)
        if cfg.eps < 0 or cfg.causal_chunk_size < 1:
            raise ValueError(f"linear needs eps >= 0 and causal_chunk_size >= 1; got {cfg}")

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
        work = torch.promote_types(q.dtype, torch.float32)  # sums of positive features: float32 at least
        with torch.autocast(q.device.type, enabled=False):
            qf = elu_feature_map(q.to(work))
            kf = zero_padded(elu_feature_map(k.to(work)), key_padding_mask)  # padded keys add exactly nothing
            v = v.to(work)
            if causal:
                out = causal_linear_attention(qf, kf, v, eps=self.cfg.eps, chunk_size=self.cfg.causal_chunk_size)
            else:
                out = linear_attention(qf, kf, v, eps=self.cfg.eps)
        return out.to(out_dtype)
