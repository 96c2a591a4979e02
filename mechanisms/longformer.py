"""Longformer attention: a sliding window plus global tokens (Beltagy, Peters, Cohan 2020,
"Longformer: The Long-Document Transformer", arXiv:2004.05150), block-computed.

With a two-sided window w (w/2 keys on each side) and the global positions G (the first
``global_tokens`` tokens, e.g. [CLS]):

    P(i) = {j : |i − j| ≤ w/2} ∪ G                     for i ∉ G  (local + attend to globals)
    P(i) = all j                                        for i ∈ G  (globals attend everywhere)
    out_i = Σ_{j ∈ P(i)} softmax_j(q_i·k_j / √d) v_j    (+ j ≤ i when causal)

The band is computed like the authors' ``sliding_chunks`` form (allenai/longformer,
``longformer/sliding_chunks.py``): queries in blocks of w/2, each gathering the keys of its
own and the two neighbouring blocks (plus the global keys), with the exact band as a mask;
global query rows are a dense (G, L) softmax written over the block output. Cost
O(L·(1.5·w + G)·d + G·L·d) time, O(L·(1.5·w + G)) memory, no (L, L) tensor.

Deviations from the authors' model: (1) the paper gives global attention its own
projections Q_g, K_g, V_g; the backbone owns the projections here, so global rows use the
same q, k, v as the local ones. (2) No dilation (the paper dilates windows in some heads of
its char-LM). (3) Self-attention only (no ``cross``).

Protocol settings under ``scale=lra`` (``PROTOCOLS`` below): ``protocol=lra`` runs LRA's
``LongformerEncoder`` defaults (google-research/long-range-arena
``lra_benchmarks/models/longformer/longformer.py``: ``sliding_window_size=512``,
``global_mask=None``, which no config changes; the encoder's CLS token is not made global):
window 512, no global tokens. LRA's ``_build_sliding_window_mask`` gives 256 keys on the left
counting the token itself and 256 on the right (ours: 256 on each side plus the token).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from harness.core import Attention, AttentionContext, register_mechanism
from mechanisms._blocks import block_range, dedup_keep_first, dense_rows, gathered_block_attention, replace_rows


@dataclass
class LongformerConfig:
    window: int = 128  # two-sided window w (even): each token sees w/2 keys on each side — the accuracy/speed knob
    global_tokens: int = 1  # the first tokens are global (attend everywhere, attended by all); 0 = window only


def longformer_pattern(length: int, cfg: LongformerConfig, *, causal: bool, device=None) -> tuple[Tensor, Tensor]:
    """key_index (1, N, G + 3·w/2) and allowed (1, N, w/2, S) for query blocks of w/2."""
    half = cfg.window // 2
    n = -(-length // half)
    g = min(cfg.global_tokens, length)
    blocks = torch.arange(n, device=device)[:, None] + torch.arange(-1, 1 if causal else 2, device=device)  # (N, M)
    blocks = blocks.masked_fill((blocks < 0) | (blocks >= n), -1)
    window = block_range(blocks, half, length)  # (N, M·w/2)
    globals_ = torch.arange(g, device=device).expand(n, g)  # (N, G)
    key_index = dedup_keep_first(torch.cat([globals_, window], dim=1))[None]  # (1, N, S), globals first
    i = torch.arange(n * half, device=device).view(1, n, half, 1)
    j = key_index[:, :, None, :]
    is_global = torch.zeros_like(key_index, dtype=torch.bool)
    is_global[..., :g] = True
    allowed = ((j - i).abs() <= half) | is_global[:, :, None, :]  # (1, N, w/2, S)
    return key_index, allowed


def longformer_pattern_reference(length: int, cfg: LongformerConfig) -> Tensor:
    """The plain (L, L) bool pattern of the formula above (for tests)."""
    i = torch.arange(length)[:, None]
    j = torch.arange(length)[None, :]
    g = cfg.global_tokens
    return ((i - j).abs() <= cfg.window // 2) | (i < g) | (j < g)


def longformer_attention(q, k, v, cfg: LongformerConfig, *, key_padding_mask=None, causal=False) -> Tensor:
    """q, k, v: (B, H, L, D) -> (B, H, L, D): banded softmax attention plus global tokens."""
    length = q.shape[-2]
    key_index, allowed = longformer_pattern(length, cfg, causal=causal, device=q.device)
    out = gathered_block_attention(
        q, k, v, key_index, allowed, block=cfg.window // 2, key_padding_mask=key_padding_mask, causal=causal
    )
    g = min(cfg.global_tokens, length)
    if g > 0:
        rows = torch.arange(g, device=q.device)
        out = replace_rows(out, rows, dense_rows(q, k, v, rows, key_padding_mask=key_padding_mask, causal=causal))
    return out


# The authors' settings per scale=lra protocol (sources: the module docstring).
PROTOCOLS = {"lra": {"*": {"window": 512, "global_tokens": 0}}}  # longformer.py sliding_window_size=512, no globals


@register_mechanism("longformer", LongformerConfig, causal=True, key_padding=True, family="sparse", protocols=PROTOCOLS)
class LongformerAttention(Attention):
    """Longformer (Beltagy et al. 2020): sliding window + global tokens, O(L·(w + G))."""

    def __init__(self, cfg: LongformerConfig, *, heads: int, dim_head: int, max_len: int):
        super().__init__(cfg, heads=heads, dim_head=dim_head, max_len=max_len)
        if cfg.window < 2 or cfg.window % 2 or cfg.global_tokens < 0:
            raise ValueError(f"longformer needs an even window >= 2 and global_tokens >= 0; got {cfg}")

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
        return longformer_attention(q, k, v, self.cfg, key_padding_mask=key_padding_mask, causal=causal)
