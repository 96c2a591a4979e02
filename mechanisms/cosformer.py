"""cosFormer (Qin, Sun, Deng, Li, Wei, Lv, Yan, Kong & Zhong 2022, "cosFormer: Rethinking
Softmax in Attention", arXiv:2202.08791; reference code OpenNLPLab/cosFormer ``cosformer.py``).

Softmax is replaced by a ReLU feature map and a cos re-weighting that favours nearby tokens,
eq. (9)–(11) of the paper:

    out_i = Σ_j relu(q_i)·relu(k_j) cos(π/2 · (i − j)/M) v_j  /  Σ_j relu(q_i)·relu(k_j) cos(π/2 · (i − j)/M)

with positions i, j = 1 … L and M = max(Lq, Lk), as in the reference code. Ptolemy's identity
cos(a − b) = cos a cos b + sin a sin b splits the weight, so with a_i = π i / (2M)

    q'_i = [relu(q_i) sin a_i, relu(q_i) cos a_i],   k'_j = [relu(k_j) sin a_j, relu(k_j) cos a_j]
    out_i = q'_i · (Σ_j k'_j v_jᵀ) / max(q'_i · Σ_j k'_j, ε)                     (ε = 1e-6)

a linear attention over 2d features: O(L·d²) time, O(d²) state, no (L, L) tensor. Causal
attention (query i sees key j ≤ i + Lk − Lq) uses prefix sums in chunks of
``causal_chunk_size`` C: inside a chunk the C × C masked block of q'·k' is formed, across
chunks the states Σ k' vᵀ are summed exclusively, so memory is O((L/C)·d² + L·C) — the
reference code instead materialises a cumulative (L, 2d, d) tensor.

Padding: the feature rows k'_j of padded keys (and their values) are zeroed before any sum,
so a padded key contributes exactly nothing; a query whose every key is padded (or whose
relu features vanish) gets denominator 0 → clamped to ε → output 0, never NaN. M counts
real tokens only (the valid keys, and in self-attention the queries too, per example;
right padding assumed), so the outputs of real tokens do not depend on how much padding a
batch carries (tested); the reference uses the tensor length.

Deviations from the reference code: (1) causal mode chunked (same numbers, bounded memory);
(2) in causal mode with Lq < Lk the query positions are bottom-right aligned (query i is
token i + Lk − Lq, a decoder step with a key cache) where the reference numbers both from 1;
(3) key padding is honoured (the reference takes no padding mask); (4) features and sums in
at least float32 under autocast; (5) M from the real length (above). The reference applies no 1/√d scale; neither do we.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from harness.core import Attention, AttentionContext, register_mechanism, zero_padded


@dataclass
class CosformerConfig:
    eps: float = 1e-6  # clamp of the denominator (the reference's eps)
    causal_chunk_size: int = 64  # keys per block of the chunked causal prefix sum (memory O(L·C + (L/C)·d²))


def cos_features(x: Tensor, positions: Tensor, big_m: Tensor | int) -> Tensor:
    """x: (B, H, L, d), positions: (L,) 1-based, M an int or per example (B,) -> (B, H, L, 2d)
    [relu(x) sin a, relu(x) cos a], a = π/2 · position / M."""
    big_m = torch.as_tensor(big_m, dtype=x.dtype, device=x.device).reshape(-1, 1, 1, 1)
    angle = (math.pi / 2) * positions.to(x.dtype)[:, None] / big_m  # (B or 1, 1, L, 1)
    x = F.relu(x)
    return torch.cat([x * torch.sin(angle), x * torch.cos(angle)], dim=-1)


def real_length_m(lq: int, lk: int, key_padding_mask: Tensor | None, device) -> Tensor:
    """M = max(Lq, Lk) over the real tokens, per example (B,): the valid keys are counted (and,
    in self-attention Lq = Lk, the queries too), so the padding amount does not move M."""
    if key_padding_mask is None:
        return torch.tensor([max(lq, lk)], device=device)
    valid = (~key_padding_mask).sum(-1).clamp_min(1)  # (B,)
    return valid if lq == lk else valid.clamp_min(lq)


def cosformer_reference(q: Tensor, k: Tensor, v: Tensor, *, key_padding_mask=None, causal=False, eps=1e-6) -> Tensor:
    """The quadratic form written out (float64): Σ_j relu(q_i)·relu(k_j) cos(π/2·(i−j)/M) v_j / Σ_j (…)."""
    q, k, v = q.double(), k.double(), v.double()
    lq, lk = q.shape[-2], k.shape[-2]
    big_m = real_length_m(lq, lk, key_padding_mask, q.device).double().reshape(-1, 1, 1, 1)
    offset = lk - lq if causal else 0
    i = torch.arange(1, lq + 1, dtype=torch.float64)[:, None] + offset
    j = torch.arange(1, lk + 1, dtype=torch.float64)[None, :]
    weights = torch.einsum("bhid,bhjd->bhij", F.relu(q), F.relu(k)) * torch.cos(math.pi / 2 * (i - j) / big_m)
    if causal:
        weights = weights * (j <= i)
    if key_padding_mask is not None:
        weights = weights.masked_fill(key_padding_mask[:, None, None, :], 0.0)
    denom = weights.sum(-1, keepdim=True).clamp_min(eps)
    return weights @ v / denom


def cosformer_attention(
    q: Tensor, k: Tensor, v: Tensor, *, key_padding_mask: Tensor | None, causal: bool, eps: float, chunk: int
) -> Tensor:
    """q: (B, H, Lq, d), k, v: (B, H, Lk, d) -> (B, H, Lq, d) in at least float32."""
    dtype = torch.promote_types(q.dtype, torch.float32)
    q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
    lq, lk = q.shape[-2], k.shape[-2]
    big_m = real_length_m(lq, lk, key_padding_mask, q.device)  # (B,) or (1,)
    offset = lk - lq if causal else 0
    q_pos = torch.arange(1, lq + 1, device=q.device) + offset
    k_pos = torch.arange(1, lk + 1, device=q.device)
    qf = cos_features(q, q_pos, big_m)  # (B, H, Lq, 2d)
    kf = zero_padded(cos_features(k, k_pos, big_m), key_padding_mask)  # (B, H, Lk, 2d), padded rows 0
    v = zero_padded(v, key_padding_mask)
    if not causal:
        kv = torch.einsum("bhjf,bhje->bhfe", kf, v)  # (B, H, 2d, d)
        num = qf @ kv  # (B, H, Lq, d)
        den = qf @ kf.sum(-2).unsqueeze(-1)  # (B, H, Lq, 1)
    else:
        num, den = _causal_chunked(qf, kf, v, offset, chunk)
    return num / den.clamp_min(eps)


def _causal_chunked(qf: Tensor, kf: Tensor, v: Tensor, offset: int, chunk: int) -> tuple[Tensor, Tensor]:
    """Causal prefix sums in key chunks of size C. Queries are placed on the key axis (query i
    is key position i + offset); queries with i + offset < 0 see nothing."""
    b, h, lq, f = qf.shape
    lk, d = v.shape[-2], v.shape[-1]
    # Put the queries on the key grid: slot t holds the query at key position t (or zeros).
    qk = qf.new_zeros(b, h, lk, f)
    start = max(offset, 0)
    qk[:, :, start:] = qf[:, :, start - offset :]
    n = -(-lk // chunk)
    pad = n * chunk - lk
    qc = F.pad(qk, (0, 0, 0, pad)).view(b, h, n, chunk, f)
    kc = F.pad(kf, (0, 0, 0, pad)).view(b, h, n, chunk, f)
    vc = F.pad(v, (0, 0, 0, pad)).view(b, h, n, chunk, d)
    kv = torch.einsum("bhncf,bhnce->bhnfe", kc, vc)  # (B, H, n, 2d, d) per-chunk states
    kv_before = kv.cumsum(2) - kv  # exclusive prefix over chunks
    z_before = kc.sum(3).cumsum(2) - kc.sum(3)  # (B, H, n, 2d)
    local = torch.einsum("bhncf,bhnsf->bhncs", qc, kc)  # (B, H, n, C, C)
    tri = torch.ones(chunk, chunk, dtype=torch.bool, device=qf.device).tril()
    local = local * tri
    num = torch.einsum("bhncf,bhnfe->bhnce", qc, kv_before) + local @ vc  # (B, H, n, C, d)
    den = torch.einsum("bhncf,bhnf->bhnc", qc, z_before) + local.sum(-1)  # (B, H, n, C)
    num = num.reshape(b, h, n * chunk, d)[:, :, start : start + lq - (start - offset)]
    den = den.reshape(b, h, n * chunk, 1)[:, :, start : start + lq - (start - offset)]
    if start - offset > 0:  # queries before the first key (Lq > Lk): nothing visible
        num = torch.cat([num.new_zeros(b, h, start - offset, d), num], dim=2)
        den = torch.cat([den.new_zeros(b, h, start - offset, 1), den], dim=2)
    return num, den


@register_mechanism("cosformer", CosformerConfig, causal=True, cross=True, key_padding=True, family="kernel")
class Cosformer(Attention):
    """cosFormer (Qin et al. 2022): ReLU features with cos re-weighting, linear cost."""

    def __init__(self, cfg: CosformerConfig, *, heads: int, dim_head: int, max_len: int):
        super().__init__(cfg, heads=heads, dim_head=dim_head, max_len=max_len)
        if cfg.eps <= 0 or cfg.causal_chunk_size < 1:
            raise ValueError(f"cosformer needs eps > 0 and causal_chunk_size >= 1, got {cfg}")

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
        with torch.autocast(q.device.type, enabled=False):
            out = cosformer_attention(
                q,
                k,
                v,
                key_padding_mask=key_padding_mask,
                causal=causal,
                eps=self.cfg.eps,
                chunk=self.cfg.causal_chunk_size,
            )
        return out.to(q.dtype)
