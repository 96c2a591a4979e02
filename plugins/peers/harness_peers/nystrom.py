"""nystrom-attention's Nyström attention (lucidrains, https://github.com/lucidrains/nystrom-attention,
after Xiong et al. 2021, arXiv:2102.03902) wrapped to the mechanism contract: the peer of
our ``nystrom``.

The library's ``NystromAttention`` owns its Q/K/V and output projections; in the harness
the backbone owns them. For an equal comparison the wrapper sets the library module's
``to_qkv`` and ``to_out`` to identities and feeds it our q, k, v concatenated in the
layout its ``to_qkv`` would have produced, (B, L, 3·H·D). What runs (and is timed): one
copy of q, k, v into that layout, then the library's forward unchanged — front padding to a
multiple of ``num_landmarks``, masked segment-sum landmarks, the three softmaxes, its
iterative pseudo-inverse (scaled by maxima pooled over the whole batch, as published), the
products ``(attn1 @ attn2_inv) @ (attn3 @ v)`` and the depthwise conv residual of v.

Capabilities, honestly: ``key_padding`` yes (the library multiplies q, k, v by the mask,
leaves masked tokens out of the landmark means and masks the scores; tested for padding
invariance); no ``causal``, no ``cross``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor, nn

from harness.core import Attention, AttentionContext, register_mechanism


@dataclass
class NystromPeerConfig:
    num_landmarks: int = 64  # landmarks m (same name and default as our nystrom)
    pinv_iterations: int = 6  # iterations of the Moore–Penrose method
    conv_kernel_size: int = 33  # depthwise conv residual on v; 0 disables it (residual=False)


@register_mechanism("nystrom_attention", NystromPeerConfig, key_padding=True)
class NystromAttentionPeer(Attention):
    """nystrom-attention's NystromAttention, as published, with identity projections."""

    peer_of: ClassVar[str] = "nystrom"

    def __init__(self, cfg: NystromPeerConfig, *, heads: int, dim_head: int, max_len: int):
        super().__init__(cfg, heads=heads, dim_head=dim_head, max_len=max_len)
        from nystrom_attention import NystromAttention

        if cfg.num_landmarks < 1 or cfg.pinv_iterations < 0 or cfg.conv_kernel_size < 0:
            raise ValueError(
                f"nystrom_attention needs num_landmarks >= 1, pinv_iterations >= 0, conv_kernel_size >= 0, got {cfg}"
            )
        self.peer = NystromAttention(
            dim=heads * dim_head,
            dim_head=dim_head,
            heads=heads,
            num_landmarks=cfg.num_landmarks,
            pinv_iterations=cfg.pinv_iterations,
            residual=cfg.conv_kernel_size > 0,
            residual_conv_kernel=cfg.conv_kernel_size or 33,
        )
        self.peer.to_qkv = nn.Identity()  # the backbone already projected q, k, v
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
        packed = _pack(q, k, v)  # (B, L, 3·H·D): the layout the library's to_qkv produces
        keep = None if key_padding_mask is None else ~key_padding_mask.bool()  # the library's mask: True = keep
        out = self.peer(packed, mask=keep)  # (B, L, H·D)
        return out.view(b, n, h, d).transpose(1, 2)  # (B, H, L, D)


def _pack(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """(B, H, L, D) × 3 -> (B, L, 3·H·D), chunks [q | k | v], each 'b n (h d)'."""
    b, h, n, d = q.shape
    return torch.cat([t.transpose(1, 2).reshape(b, n, h * d) for t in (q, k, v)], dim=-1)
