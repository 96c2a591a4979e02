"""local-attention's LocalAttention (lucidrains, https://github.com/lucidrains/local-attention)
wrapped to the mechanism contract: the peer of our ``local``.

What runs (and is timed): ``local_attention.LocalAttention.forward(q, k, v, mask=keep)`` on
our (B, H, L, D) tensors, unchanged. It is built with our settings: ``window_size =
window``, ``look_backward``, ``look_forward`` (0 when causal: the library refuses to look
forward causally), ``exact_windowsize = exact_window``, the default scale d^(-1/2),
``autopad=True`` (any length), no rotary embeddings (``dim`` not given), ``shared_qk=False``,
no dropout. Two library modules are held (non-causal and causal), since the library fixes
``causal`` at construction.

Equal settings, and where they differ: the window pattern (blocks of ``window``, each
sees ``look_backward`` blocks before and ``look_forward`` after; or the exact band) is the
same as ours, so outputs agree to float rounding on every valid query. A mask is always
passed (all True when there is no padding): with ``autopad`` and no mask the library lets
queries attend to its own zero padding at the end of the sequence. Masked scores get
``-finfo.max``, not -inf, so a query whose every key is padded gets a uniform average of
padded values instead of our zeros (the contract only requires finite values there).

Capabilities: ``causal`` yes, ``key_padding`` yes, ``cross`` no (one sequence's windows).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from harness.core import Attention, AttentionContext, register_mechanism


@dataclass
class LocalAttentionPeerConfig:
    window: int = 128  # window_size (same name and default as our local)
    look_backward: int = 1  # blocks before its own a block sees
    look_forward: int = 1  # blocks after its own (0 when causal)
    exact_window: bool = False  # exact_windowsize


@register_mechanism("local_attention_peer", LocalAttentionPeerConfig, causal=True, key_padding=True)
class LocalAttentionPeer(Attention):
    """lucidrains' local-attention LocalAttention, as published, on the mechanism contract."""

    peer_of: ClassVar[str] = "local"

    def __init__(self, cfg: LocalAttentionPeerConfig, *, heads: int, dim_head: int, max_len: int):
        super().__init__(cfg, heads=heads, dim_head=dim_head, max_len=max_len)
        from local_attention import LocalAttention

        if cfg.window < 1 or cfg.look_backward < 0 or cfg.look_forward < 0:
            raise ValueError(
                f"local_attention_peer needs window >= 1, look_backward >= 0, look_forward >= 0; got {cfg}"
            )
        common = dict(
            window_size=cfg.window,
            look_backward=cfg.look_backward,
            exact_windowsize=cfg.exact_window,
            autopad=True,
            use_rotary_pos_emb=False,
            shared_qk=False,
            dropout=0.0,
        )
        self.bidirectional = LocalAttention(causal=False, look_forward=cfg.look_forward, **common)
        self.causal = LocalAttention(causal=True, look_forward=0, **common)

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
        b, _, n, _ = q.shape
        keep = (
            torch.ones(b, n, dtype=torch.bool, device=q.device)
            if key_padding_mask is None
            else ~key_padding_mask.bool()
        )
        return (self.causal if causal else self.bidirectional)(q, k, v, mask=keep)  # (B, H, L, D)
