"""sinkhorn-transformer's Sinkhorn attention (lucidrains, https://github.com/lucidrains/sinkhorn-transformer,
after Tay et al. 2020, arXiv:2002.11296) wrapped to the mechanism contract: the peer of our
``sinkhorn``.

What runs (and is timed): ``sinkhorn_transformer.SinkhornAttention.forward(q, k, v)``
unchanged on our (B, H, L, D) tensors — the library's core attention, without the
projections of its ``SinkhornSelfAttention``. Configured as the Sinkhorn method of the paper
(``non_permutative=False``; the library's default is a differentiable top-k instead) with
its default sort net (``AttentionSortNet``: block-mean queries · block-mean keys / √d, ReLU,
log, Gumbel noise at every call — also in eval — then ``sinkhorn_iter`` normalisations).
The library needs L divisible by the block size: other lengths are zero-padded by the
wrapper and the padding is passed as the library's q/kv masks.

Equal settings: ``block_size`` (the library's bucket_size), ``sinkhorn_iters``,
``temperature`` (same names as ours). Where the two differ, exactly:

* the sort scores: ours are *learned* (a linear map of key-block sums, as the authors'
  code); the library's default sort net is parameter-free (block-mean q·k); the library
  adds Gumbel noise in eval too, ours only while training;
* the combination: the library takes one softmax over [sorted block; own block], our
  ``combine="joint"``; our default ``combine="sum"`` is the authors' LRA form (two softmaxes
  added), so speed comparisons should set ``combine=joint`` for equal work;
* the library's sorted **values are its sorted keys** (``b_v_r = b_k_r.reshape(...)`` in
  ``SinkhornAttention.forward``, version 0.11.4): every query attends over [sorted keys;
  own keys] with values [sorted *keys*; own values]. Given the same sort matrix, the library
  and ours agree exactly when v = k (tests/test_peers_roster2.py) and differ otherwise.

Capabilities, honestly: ``key_padding`` no (padded keys and values are not zeroed before
they are mixed into sorted blocks, and the sorted-slot mask takes the argmax block only, so
padded values reach real outputs); no ``causal`` (the library has a separate causal class
with another sort net), no ``cross``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor

from harness.core import Attention, AttentionContext, register_mechanism


@dataclass
class SinkhornPeerConfig:
    block_size: int = 64  # the library's bucket_size (same name and default as ours)
    sinkhorn_iters: int = 7  # the library's sinkhorn_iter
    temperature: float = 0.75  # Gumbel-Sinkhorn temperature


@register_mechanism("sinkhorn_peer", SinkhornPeerConfig)
class SinkhornPeer(Attention):
    """sinkhorn-transformer's SinkhornAttention (Sinkhorn sorting, default sort net) as published."""

    peer_of: ClassVar[str] = "sinkhorn"

    def __init__(self, cfg: SinkhornPeerConfig, *, heads: int, dim_head: int, max_len: int):
        super().__init__(cfg, heads=heads, dim_head=dim_head, max_len=max_len)
        from sinkhorn_transformer.sinkhorn_transformer import SinkhornAttention

        if cfg.block_size < 1 or cfg.sinkhorn_iters < 0 or cfg.temperature <= 0:
            raise ValueError(f"sinkhorn_peer needs block_size >= 1, sinkhorn_iters >= 0, temperature > 0, got {cfg}")
        self.peer = SinkhornAttention(
            cfg.block_size,
            heads * dim_head,
            dim_head,
            heads,
            max_len,
            temperature=cfg.temperature,
            non_permutative=False,
            sinkhorn_iter=cfg.sinkhorn_iters,
        )

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
        padded = -(-n // self.cfg.block_size) * self.cfg.block_size
        mask = None
        if padded > n:  # the library's length rule; the padding is masked
            q, k, v = (F.pad(x, (0, 0, 0, padded - n)) for x in (q, k, v))
            mask = torch.arange(padded, device=q.device).expand(b, padded) < n  # True = keep
        out = self.peer(q, k, v, q_mask=mask, kv_mask=mask)
        return out[:, :, :n]
