"""Softmax attention (Vaswani et al. 2017, "Attention Is All You Need", arXiv:1706.03762).

    Attention(Q, K, V) = softmax(Q Kᵀ / √d + M) V

with M = -inf where a key is padded or (causal) lies in the future. O(L²·d) time and
O(L²) memory (less when SDPA picks a fused kernel). This is the baseline every other
mechanism is compared with.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.nn.functional as F
from torch import Tensor

from harness.core import Attention, AttentionContext, allowed_mask, register_mechanism


@dataclass
class SoftmaxConfig:
    dropout: float = 0.0  # attention-weight dropout, training only


def softmax_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    key_padding_mask: Tensor | None = None,
    causal: bool = False,
    dropout: float = 0.0,
) -> Tensor:
    """q: (B, H, Lq, D), k/v: (B, H, Lk, D) -> (B, H, Lq, D); masked-out rows give 0.

    The mask is built here (bottom-right causal ∧ key padding) because SDPA's own
    ``is_causal`` is top-left aligned for Lq != Lk and cannot be combined with a mask."""
    lq, lk = q.shape[-2], k.shape[-2]
    if causal and lq == lk and key_padding_mask is None:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=dropout)
    mask = allowed_mask(lq, lk, key_padding_mask=key_padding_mask, causal=causal, device=q.device)
    if mask is None:
        return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout)
    # A row with no allowed key would be softmax over all -inf = NaN: let it see every
    # key (finite), then zero it.
    empty = ~mask.any(-1, keepdim=True)  # (B|1, 1, Lq, 1)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask | empty, dropout_p=dropout)
    return out.masked_fill(empty, 0.0)


@register_mechanism("softmax", SoftmaxConfig, causal=True, cross=True, key_padding=True, family="full")
class SoftmaxAttention(Attention):
    """Softmax attention (Vaswani et al. 2017) through scaled_dot_product_attention."""

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
        dropout = self.cfg.dropout if self.training else 0.0
        return softmax_attention(q, k, v, key_padding_mask=key_padding_mask, causal=causal, dropout=dropout)
