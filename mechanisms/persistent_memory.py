"""All-attention with persistent memory (Sukhbaatar, Grave, Lample, Jégou & Joulin 2019,
"Augmenting Self-attention with Persistent Memory", arXiv:1907.01470).

Every head owns N learned key/value slots (M_k, M_v), shape (H, N, D), that are
concatenated to the keys and values of every sequence:

    K' = [M_k ; K],  V' = [M_v ; V]
    Attention(Q, K', V') = softmax(Q K'ᵀ / √d + M') V'

M' = -inf where a *sequence* key is padded or (causal) lies in the future; the memory
slots are never masked — they play the role of the feed-forward layer in the paper, so
they are visible to every query, and a query whose every sequence key is padded still
attends to the memory (finite output, not zeros).

Slot parametrisation, as the authors' reference code (facebookresearch/adaptive-span,
``persistent_memory.py``: ``self.key = randn(H, D, N) / sqrt(D)`` used as ``key * sqrt(D)``,
``self.val = randn(H, N, D) / sqrt(N)`` used as ``val * sqrt(N)``): the stored parameters are
small and rescaled at use, so the effective slots start at unit scale,

    M_k = √d · P_k,  P_k ~ N(0, 1/d)        M_v = √N · P_v,  P_v ~ N(0, 1/N)

(unit-variance keys and values, like the projected sequence keys/values they are
concatenated with, §3 of the paper), and a gradient step on P moves M by √d (√N) times
more: the reference's per-slot learning-rate scaling.

The paper's point is the *all-attention* layer: the persistent vectors replace the
feed-forward sublayer. ``+preset=all_attention`` (harness/conf/preset/all_attention.yaml) builds
that network: ``model.feedforward=none`` and this mechanism with the paper's N = 1024 slots
(its small 18-layer, d = 512 model; 2048 for the large one; enwik8_pers*.sh in the reference).

This is exact softmax attention over Lk + N keys (no approximation): O(Lq·(Lk+N)·d) time
and O(Lq·(Lk+N)) memory (less when SDPA picks a fused kernel). ``num_slots`` trades
capacity of the memory for (small) extra cost. Deviation from the reference: no adaptive
span on the sequence part (that is the separate ``adaptive`` mechanism) and memory slots
are also used with cross attention / key padding (the reference has neither).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from harness.core import Attention, AttentionContext, allowed_mask, register_mechanism


@dataclass
class PersistentMemoryConfig:
    num_slots: int = 16  # learned key/value slots per head, visible to every query (paper: 1024 / 2048)
    dropout: float = 0.0  # attention-weight dropout, training only


def extend_with_memory(k: Tensor, v: Tensor, memory_keys: Tensor, memory_values: Tensor) -> tuple[Tensor, Tensor]:
    """k/v: (B, H, Lk, D), memory_*: (H, N, D) -> k'/v': (B, H, N + Lk, D), memory first."""
    b = k.shape[0]
    mk = memory_keys.to(k.dtype)[None].expand(b, -1, -1, -1)  # (B, H, N, D)
    mv = memory_values.to(v.dtype)[None].expand(b, -1, -1, -1)  # (B, H, N, D)
    return torch.cat([mk, k], dim=2), torch.cat([mv, v], dim=2)


def memory_allowed_mask(
    lq: int,
    lk: int,
    num_slots: int,
    *,
    key_padding_mask: Tensor | None,
    causal: bool,
    device: torch.device,
) -> Tensor | None:
    """(B|1, 1, Lq, N + Lk) bool, True = may attend; the N memory columns are always True.

    Returns None when nothing is masked."""
    seq = allowed_mask(lq, lk, key_padding_mask=key_padding_mask, causal=causal, device=device)
    if seq is None:
        return None
    seq = seq.expand(seq.shape[0], 1, lq, lk)  # (B|1, 1, Lq, Lk)
    mem = torch.ones(seq.shape[0], 1, lq, num_slots, dtype=torch.bool, device=device)  # (B|1, 1, Lq, N)
    return torch.cat([mem, seq], dim=-1)


def persistent_memory_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    memory_keys: Tensor,
    memory_values: Tensor,
    *,
    key_padding_mask: Tensor | None = None,
    causal: bool = False,
    dropout: float = 0.0,
) -> Tensor:
    """q: (B, H, Lq, D), k/v: (B, H, Lk, D), memory_*: (H, N, D) -> (B, H, Lq, D).

    Softmax over the memory slots and the allowed sequence keys; never an empty row."""
    lq, lk, n = q.shape[-2], k.shape[-2], memory_keys.shape[-2]
    k_ext, v_ext = extend_with_memory(k, v, memory_keys, memory_values)  # (B, H, N + Lk, D)
    mask = memory_allowed_mask(lq, lk, n, key_padding_mask=key_padding_mask, causal=causal, device=q.device)
    return F.scaled_dot_product_attention(q, k_ext.to(q.dtype), v_ext.to(q.dtype), attn_mask=mask, dropout_p=dropout)


@register_mechanism(
    "persistent_memory", PersistentMemoryConfig, causal=True, cross=True, key_padding=True, family="full"
)
class PersistentMemoryAttention(Attention):
    """All-attention with persistent memory slots (Sukhbaatar et al. 2019)."""

    def __init__(self, cfg: PersistentMemoryConfig, *, heads: int, dim_head: int, max_len: int):
        super().__init__(cfg, heads=heads, dim_head=dim_head, max_len=max_len)
        if cfg.num_slots < 1:
            raise ValueError(f"persistent_memory needs num_slots >= 1, got {cfg.num_slots}")
        # The reference's parametrisation: stored P_k ~ N(0, 1/D), P_v ~ N(0, 1/N), used as
        # √D·P_k and √N·P_v (unit-scale slots; see the module docstring).
        self.memory_keys = nn.Parameter(torch.randn(heads, cfg.num_slots, dim_head) / math.sqrt(dim_head))
        self.memory_values = nn.Parameter(torch.randn(heads, cfg.num_slots, dim_head) / math.sqrt(cfg.num_slots))

    def memory(self) -> tuple[Tensor, Tensor]:
        """The effective slots (M_k, M_v), each (H, N, D): √D·P_k and √N·P_v."""
        return self.memory_keys * math.sqrt(self.dim_head), self.memory_values * math.sqrt(self.cfg.num_slots)

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
        memory_keys, memory_values = self.memory()
        return persistent_memory_attention(
            q,
            k,
            v,
            memory_keys,
            memory_values,
            key_padding_mask=key_padding_mask,
            causal=causal,
            dropout=dropout,
        )
