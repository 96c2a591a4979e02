"""linformer's LinformerSelfAttention (lucidrains, https://github.com/lucidrains/linformer,
after Wang et al. 2020, arXiv:2006.04768) wrapped to the mechanism contract: the peer of
our ``linformer``.

The library's module owns its projections (``to_q``, ``to_k``, ``to_v``, ``to_out``) and
its sequence projections ``proj_k``, ``proj_v`` of shape (seq_len, k). In the harness the
backbone owns the Q/K/V/output projections, so the wrapper replaces ``to_q`` and ``to_out``
with identities and ``to_k``/``to_v`` with slices of the context it is given, and calls the
library's forward unchanged with ``x = q`` and ``context = [k | v]`` in its (B, L, H·D)
layout. What runs (and is timed): two layout copies, then the library's forward — its
``proj_k[:kv_len]`` slicing, the sequence projections, its head reshapes, softmax attention
scaled by d^(-1/2). ``seq_len = max_len`` and ``k`` are our config's; ``share_kv=True`` is
refused, because the library's ``share_kv`` also uses the keys as the values.

Capabilities, honestly: ``cross`` yes (keys from ``context``, any Lk ≤ max_len); no
``causal``; no ``key_padding`` (the library takes no mask: padded keys enter Eᵀ K).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor, nn

from harness.core import Attention, AttentionContext, register_mechanism


@dataclass
class LinformerPeerConfig:
    k: int = 256  # projected length (same name and default as our linformer)
    share_kv: bool = False  # must stay False: the library's share_kv also makes values = keys


class _Half(nn.Module):
    """Selects the first or second half of the last axis (the k or v part of the context)."""

    def __init__(self, index: int):
        super().__init__()
        self.index = index

    def forward(self, x: Tensor) -> Tensor:
        return x.chunk(2, dim=-1)[self.index]


@register_mechanism("linformer_peer", LinformerPeerConfig, cross=True)
class LinformerPeer(Attention):
    """lucidrains' linformer LinformerSelfAttention, as published, with pass-through projections."""

    peer_of: ClassVar[str] = "linformer"

    def __init__(self, cfg: LinformerPeerConfig, *, heads: int, dim_head: int, max_len: int):
        super().__init__(cfg, heads=heads, dim_head=dim_head, max_len=max_len)
        from linformer import LinformerSelfAttention

        if cfg.k < 1:
            raise ValueError(f"linformer_peer.k must be >= 1, got {cfg.k}")
        if cfg.share_kv:
            raise ValueError(
                "linformer_peer cannot run share_kv=True: the library's share_kv also uses the keys as the values "
                "(it skips to_v), which differs from our linformer's E = F with separate values; use share_kv=False"
            )
        self.peer = LinformerSelfAttention(
            dim=heads * dim_head, seq_len=max_len, k=cfg.k, heads=heads, dim_head=dim_head, share_kv=cfg.share_kv
        )
        self.peer.to_q = nn.Identity()  # the backbone already projected q ...
        self.peer.to_k = _Half(0)  # ... and k, v (passed as the context [k | v])
        self.peer.to_v = _Half(1)
        self.peer.to_out = nn.Identity()  # ... and projects the output

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
        b, h, n, d = q.shape
        if k.shape[-2] > self.max_len:
            raise ValueError(f"linformer_peer was built for at most max_len={self.max_len} keys, got {k.shape[-2]}")
        x = q.transpose(1, 2).reshape(b, n, h * d)  # (B, Lq, H·D)
        kv = torch.cat([t.transpose(1, 2).reshape(b, t.shape[-2], h * d) for t in (k, v)], dim=-1)  # (B, Lk, 2·H·D)
        out = self.peer(x, context=kv)  # (B, Lq, H·D)
        return out.view(b, n, h, d).transpose(1, 2)  # (B, H, Lq, D)
