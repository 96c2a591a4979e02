"""Synthesizer: attention weights synthesized without token–token dot products (Tay, Bahri,
Metzler, Juan, Zhao, Zheng 2021, "Synthesizer: Rethinking Self-Attention in Transformer
Models", arXiv:2005.00743), the dense and the random variant (``mode``):

    dense:   B_i = W₂ ReLU(W₁ x_i + b₁) + b₂ ∈ R^{max_len}     (one row of logits per token)
    random:  B   = R ∈ R^{max_len × max_len}                    (learned, or fixed: ``trainable_random=False``)
    out      = softmax(B[:Lq, :Lk] (+ q·kᵀ/√d if ``add_dot_product``)) V

per head, causal and padding masks applied to the logits (a fully masked row gives zeros).
**Quadratic**: O(L²) time and memory like softmax attention (the paper's point is
expressiveness, not cost), plus O(L·max_len) for the dense logits; it needs Lq, Lk ≤ max_len.

Checked against the authors' LRA code (google-research/long-range-arena,
``lra_benchmarks/models/synthesizer/synthesizer_attention.py``): the dense branch maps the
input per head to ``head_dim`` hidden units, ReLU, then one (hidden → max_len) layer shared
by the heads, sliced to the length; the random branch is a (heads, max_len, max_len)
parameter sliced to (Lq, Lk); ``ignore_dot_product=False`` adds the dot-product logits (our
``add_dot_product``, the paper's "+V" mixtures). Deviations: (1) the backbone owns the
projections, so the dense MLP reads the head's query q_i (the LRA code reads the block
input x_i); (2) the LRA code skips the key padding mask when it ignores the dot product,
ours always applies it (padded keys have no influence); (3) R is initialised N(0, 1/max_len)
(Flax's lecun-normal in the LRA code); (4) keys (and, in random mode, queries) take no part
in the weights by design: they enter the graph with weight exactly zero so that their
gradient is an explicit zero rather than None; (5) self-attention only (no ``cross``);
(6) the default here is ``dense`` without dot product; the LRA model's default
(``lra_benchmarks/models/synthesizer/synthesizer.py``, ``SynthesizerBlock.apply``:
``synthesizer_mode='random'``, ``ignore_dot_product=False``) is random + dot product, which
``scale=lra`` (``protocol=lra``, ``PROTOCOLS`` below) uses for every task and
``+preset=lra_synthesizer`` (``harness/conf/preset/lra_synthesizer.yaml``) at any scale. The image
configs set ``config.model.synthesizer_mode = "random"`` (``image/configs/*/synthesizer_base.py``);
the text config's ``synthesizer_mode = "factorized_random"``, ``ignore_dot_product = True`` and
``k = 32`` (``text_classification/configs/synthesizer_base.py``) are top-level keys that
``text_classification/train.py`` never passes to the model (only named fields and
``config.model``), so LRA's text runs are random + dot product too.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from harness.core import Attention, AttentionContext, allowed_mask, register_mechanism
from mechanisms._blocks import masked_softmax

MODES = ("dense", "random")


@dataclass
class SynthesizerConfig:
    mode: str = "dense"  # "dense" (logits from each token's query by an MLP) or "random" (a learned L × L matrix)
    hidden: int = 0  # dense: hidden width of the MLP; 0 = dim_head (as the LRA code)
    trainable_random: bool = True  # random: learn R (False: the paper's "fixed random" synthesizer)
    add_dot_product: bool = False  # also add q·kᵀ/√d to the logits (the paper's "+V" mixtures)


def dense_synthesizer_logits(q: Tensor, w1: Tensor, b1: Tensor, w2: Tensor, b2: Tensor) -> Tensor:
    """q: (B, H, Lq, D), w1: (H, D, h), b1: (H, h), w2: (h, M), b2: (M,) -> (B, H, Lq, M)."""
    hidden = torch.relu(torch.einsum("bhid,hde->bhie", q, w1) + b1[:, None, :])  # (B, H, Lq, h)
    return hidden @ w2 + b2


def synthesizer_attention(
    logits: Tensor, v: Tensor, *, key_padding_mask: Tensor | None = None, causal: bool = False
) -> Tensor:
    """logits: (B|1, H, Lq, Lk), v: (B, H, Lk, D) -> (B, H, Lq, D): masked softmax, then mix v."""
    lq, lk = logits.shape[-2:]
    allowed = allowed_mask(lq, lk, key_padding_mask=key_padding_mask, causal=causal, device=v.device)
    if allowed is None:
        allowed = torch.ones(1, 1, lq, lk, dtype=torch.bool, device=v.device)
    weights = masked_softmax(logits, allowed).to(v.dtype)
    return weights @ v


# The authors' settings per scale=lra protocol (sources: the module docstring, deviation 6).
PROTOCOLS = {"lra": {"*": {"mode": "random", "add_dot_product": True}}}  # synthesizer.py SynthesizerBlock defaults


@register_mechanism("synthesizer", SynthesizerConfig, causal=True, key_padding=True, family="full", protocols=PROTOCOLS)
class Synthesizer(Attention):
    """Synthesizer (Tay et al. 2021), dense or random synthesized weights; quadratic O(L²)."""

    def __init__(self, cfg: SynthesizerConfig, *, heads: int, dim_head: int, max_len: int):
        super().__init__(cfg, heads=heads, dim_head=dim_head, max_len=max_len)
        if cfg.mode not in MODES:
            raise ValueError(f"synthesizer.mode='{cfg.mode}'; valid: {', '.join(MODES)}")
        if cfg.hidden < 0:
            raise ValueError(f"synthesizer.hidden must be >= 0 (0 = dim_head), got {cfg.hidden}")
        if cfg.mode == "dense":
            hidden = cfg.hidden or dim_head
            self.w1 = nn.Parameter(torch.randn(heads, dim_head, hidden) / math.sqrt(dim_head))
            self.b1 = nn.Parameter(torch.zeros(heads, hidden))
            self.w2 = nn.Parameter(torch.randn(hidden, max_len) / math.sqrt(hidden))
            self.b2 = nn.Parameter(torch.zeros(max_len))
        else:
            self.random = nn.Parameter(
                torch.randn(heads, max_len, max_len) / math.sqrt(max_len), requires_grad=cfg.trainable_random
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
        lq, lk = q.shape[-2], k.shape[-2]
        if max(lq, lk) > self.max_len:
            raise ValueError(
                f"synthesizer was built for at most max_len={self.max_len} positions, got Lq={lq}, Lk={lk}; "
                f"build it with max_len >= {max(lq, lk)}"
            )
        if self.cfg.mode == "dense":
            logits = dense_synthesizer_logits(q, self.w1, self.b1, self.w2, self.b2)[..., :lk]  # (B, H, Lq, Lk)
        else:
            logits = self.random[None, :, :lq, :lk]  # (1, H, Lq, Lk)
        if self.cfg.add_dot_product:
            logits = logits + torch.einsum("bhid,bhjd->bhij", q, k) / math.sqrt(q.shape[-1])
        out = synthesizer_attention(logits, v, key_padding_mask=key_padding_mask, causal=causal)
        if not self.cfg.add_dot_product:  # inputs the weights ignore get an explicit zero gradient, not None
            ignored = k.sum() if self.cfg.mode == "dense" else k.sum() + q.sum()
            out = out + (0.0 * ignored).to(out.dtype)
        return out
