"""reformer-pytorch's LSH attention (lucidrains, https://github.com/lucidrains/reformer-pytorch,
after Kitaev et al. 2020, arXiv:2001.04451) wrapped to the mechanism contract: the peer of our
``reformer``.

What runs (and is timed): ``reformer_pytorch.LSHAttention.forward(qk, v)`` unchanged, on our
q (shared QK: k is ignored, as in ours) and v with batch and heads merged, (B·H, L, D): its
random-rotation hashing (rotations drawn with ``torch.randn`` at every call, shared by batch
and heads), the sort by (bucket, position), chunks of ``bucket_size`` attending to themselves
and one chunk back across the rounds laid end to end, the self mask (−5·10⁴) and the
logsumexp combination of the ``n_hashes`` rounds. The library needs L divisible by
2·bucket_size: shorter or odd lengths are zero-padded by the wrapper and the padding is
passed as the library's ``input_mask`` (those positions are never real keys).

Equal settings: ``bucket_size`` and ``n_hashes`` (same names as ours); the library always
uses n_buckets = L / bucket_size (ours does too unless ``n_buckets`` is set). With L a
multiple of 2·bucket_size, no padding and the same seed, the library and ours draw the same
rotations and compute the same thing (tests/test_peers_roster2.py).

Capabilities, honestly:

* ``causal``: no. The library masks j > i inside the hash-sorted chunks, but where a chunk
  boundary falls depends on how many later tokens hashed into lower buckets, so a future
  token changes which past keys an earlier query sees (ours uses a strictly causal
  same-bucket window instead).
* ``key_padding``: no. Padded tokens are hashed and sorted like real ones, so their values
  move real tokens between chunks (ours puts them in an extra last bucket).
* ``cross``: no (shared QK).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor

from harness.core import Attention, AttentionContext, register_mechanism


@dataclass
class ReformerPeerConfig:
    bucket_size: int = 64  # the library's bucket_size (chunk length; same name and default as ours)
    n_hashes: int = 4  # hashing rounds (same name and default as ours)


@register_mechanism("reformer_peer", ReformerPeerConfig)
class ReformerPeer(Attention):
    """reformer-pytorch's LSHAttention as published, on our q (shared QK) and v."""

    peer_of: ClassVar[str] = "reformer"
    ignored_inputs: ClassVar[tuple[str, ...]] = ("k",)

    def __init__(self, cfg: ReformerPeerConfig, *, heads: int, dim_head: int, max_len: int):
        super().__init__(cfg, heads=heads, dim_head=dim_head, max_len=max_len)
        from reformer_pytorch.reformer_pytorch import LSHAttention

        if cfg.bucket_size < 1 or cfg.n_hashes < 1:
            raise ValueError(f"reformer_peer needs bucket_size >= 1 and n_hashes >= 1, got {cfg}")
        self.peer = LSHAttention(bucket_size=cfg.bucket_size, n_hashes=cfg.n_hashes, causal=False)

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
        qk, vv = q.reshape(b * h, n, d), v.reshape(b * h, n, d)
        step = 2 * self.cfg.bucket_size
        padded = -(-n // step) * step
        mask = None
        if padded > n:  # the library's length rule; the padding is masked, never a real key
            qk, vv = F.pad(qk, (0, 0, 0, padded - n)), F.pad(vv, (0, 0, 0, padded - n))
            mask = torch.arange(padded, device=q.device).expand(b * h, padded) < n  # True = keep
        out, _, _ = self.peer(qk, vv, input_mask=mask)
        return out[:, :n].reshape(b, h, n, d)
