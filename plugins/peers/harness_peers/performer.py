"""performer-pytorch's FAVOR+ (lucidrains, https://github.com/lucidrains/performer-pytorch,
after Choromanski et al. 2021, arXiv:2009.14794) wrapped to the mechanism contract: the
peer of our ``performer``.

What runs (and is timed): ``performer_pytorch.FastAttention.forward(q, k, v)`` on our
(B, H, L, D) tensors, unchanged — its ``softmax_kernel`` (or ``generalized_kernel`` with
ReLU for ``kernel="relu"``) feature maps, then ``linear_attention``. Its projection is drawn
once at construction (block-orthogonal rows, chi norms: the library's ``ortho_scaling=0``);
no redraws, as in a timed benchmark of ours.

Capabilities, honestly:

* ``causal``: no. The library's causal path (``causal_linear_attention_noncuda`` on CPU)
  stabilises the key features with a max over *all* keys, future ones included; with its
  additive 1e-4 the stabiliser does not cancel, so a large future key changes past outputs
  (the harness's causality check fails with differences of order 1).
* ``cross`` (Lq != Lk): yes.
* ``key_padding``: no. FastAttention takes no mask, and the library's own SelfAttention only
  zeroes padded *values*, so padded keys still enter the normaliser.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from torch import Tensor, nn

from harness.core import Attention, AttentionContext, register_mechanism

KERNELS = ("softmax", "relu")


@dataclass
class PerformerPeerConfig:
    num_features: int = 256  # nb_features of FastAttention (same name and default as our performer)
    kernel: str = "softmax"  # "softmax" (FAVOR+) or "relu" (generalized_attention with ReLU)


def fast_attention(dim_head: int, cfg: PerformerPeerConfig) -> nn.Module:
    """The library's FastAttention (non-causal), with our config's settings."""
    from performer_pytorch import FastAttention

    return FastAttention(
        dim_heads=dim_head,
        nb_features=cfg.num_features,
        ortho_scaling=0,
        causal=False,
        generalized_attention=cfg.kernel == "relu",
        kernel_fn=nn.ReLU(),
    )


@register_mechanism("performer_pytorch", PerformerPeerConfig, cross=True)
class PerformerPeer(Attention):
    """performer-pytorch's FastAttention (FAVOR+), as published, on the mechanism contract."""

    peer_of: ClassVar[str] = "performer"

    def __init__(self, cfg: PerformerPeerConfig, *, heads: int, dim_head: int, max_len: int):
        super().__init__(cfg, heads=heads, dim_head=dim_head, max_len=max_len)
        if cfg.kernel not in KERNELS:
            raise ValueError(f"performer_pytorch.kernel='{cfg.kernel}'; valid: {', '.join(KERNELS)}")
        if cfg.num_features < 1:
            raise ValueError(f"performer_pytorch.num_features must be >= 1, got {cfg.num_features}")
        self.fast = fast_attention(dim_head, cfg)

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
        return self.fast(q, k, v)  # (B, H, Lq, D)
