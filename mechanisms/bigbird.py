"""BigBird block-sparse attention, ITC form (Zaheer, Guruganesh, Dubey, Ainslie, Alberti,
Ontanon, Pham, Ravula, Wang, Yang, Ahmed 2020, "Big Bird: Transformers for Longer Sequences",
arXiv:2007.14062, §2 and App. D).

The sequence is cut into blocks of b tokens; with block index β(i) = ⌊i/b⌋, N blocks, the
global blocks 𝒢 = the first and last ``global_blocks`` blocks (internal transformer
construction, ITC), a window of ``window_blocks`` = 2s+1 blocks and r random blocks R_h(β)
per query block and head (drawn once from ``seed``):

    P_h(i) = all j                                          if β(i) ∈ 𝒢
           = {j : |β(j) − β(i)| ≤ s  or  β(j) ∈ 𝒢  or  β(j) ∈ R_h(β(i))}   otherwise
    out_i  = Σ_{j ∈ P_h(i)} softmax_j(q_i·k_j / √d) v_j       (+ j ≤ i when causal)

Random blocks are drawn, per head, among the blocks outside the window and the global
blocks (the rule of the authors' ``bigbird_block_rand_mask`` in google-research/bigbird,
``bigbird/core/attention.py``, and of Hugging Face's ``_bigbird_block_rand_mask``); with
``causal=True`` only among earlier blocks, so none is wasted on masked keys. Computed per
query block: its 2g + 2s + 1 + r key blocks are gathered and attended with one softmax; the
rows of global blocks are a dense softmax over all keys. Cost O(L·b·(2g + 2s + 1 + r)·d)
time and O(L·b·(2g + 2s + 1 + r)) memory, plus O(g·b·L) for the global rows; no (L, L) tensor.

Deviations from the authors' code: (1) the pattern is the same for every batch element and
a fixed function of (seed, length, heads): the authors' TensorFlow code draws it with NumPy
when the layer is built, Hugging Face's port draws it anew in every training forward pass;
a fixed seed makes runs reproducible and the test against the dense oracle exact.
(2) Any length works (the last block may be partial); the authors fall back to full
attention below (2g + 2s + 1 + r)·b tokens, here short sequences simply have fewer
candidate random blocks. (3) The authors' kernel gathers the window as three shifted copies
of the blocked keys with the first/last blocks special-cased; here one gather per query
block (same pattern, no wrap-around). (4) Self-attention only (no ``cross``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from harness.attention import Attention, AttentionContext
from harness.registry import register_mechanism
from mechanisms._blocks import block_range, dedup_keep_first, dense_rows, gathered_block_attention, replace_rows


@dataclass
class BigBirdConfig:
    block_size: int = 64  # b: tokens per block (the authors' default 64)
    window_blocks: int = 3  # 2s+1 neighbouring blocks each block sees (odd; the authors' 3)
    global_blocks: int = 1  # g: the first g and last g blocks are global (ITC; the authors' 2 blocks in all)
    random_blocks: int = 3  # r: random key blocks per query block and head (the authors' 3)
    seed: int = 0  # the random pattern is a deterministic function of (seed, length, heads)


def global_block_mask(n: int, g: int, device=None) -> Tensor:
    """(N,) bool: True at the first g and last g blocks."""
    ids = torch.arange(n, device=device)
    return (ids < g) | (ids >= n - g)


def random_blocks(n: int, heads: int, cfg: BigBirdConfig, *, causal: bool, device=None) -> Tensor:
    """(H, N, r) random key-block ids per query block and head, -1 where no candidate is left.
    Candidates: blocks outside the window and not global (and earlier when causal)."""
    r = min(cfg.random_blocks, n)
    gen = torch.Generator().manual_seed(cfg.seed)
    draw = torch.rand(heads, n, n, generator=gen).to(device)  # (H, N, N): a random priority per block pair
    qb = torch.arange(n, device=device)[:, None]
    kb = torch.arange(n, device=device)[None, :]
    cand = ((kb - qb).abs() > cfg.window_blocks // 2) & ~global_block_mask(n, cfg.global_blocks, device)[None, :]
    if causal:
        cand = cand & (kb < qb)
    top = draw.masked_fill(~cand, -1.0).topk(r, dim=-1)  # the r highest-priority candidates
    return top.indices.masked_fill(top.values < 0, -1)


def bigbird_pattern(length: int, heads: int, cfg: BigBirdConfig, *, causal: bool, device=None) -> tuple[Tensor, Tensor]:
    """key_index (H, N, S) of every query block (global, window, random key blocks, deduplicated)
    and the (H, N, r) random block table it was built from."""
    b, n = cfg.block_size, -(-length // cfg.block_size)
    s = cfg.window_blocks // 2
    glob = torch.arange(n, device=device)[global_block_mask(n, cfg.global_blocks, device)]  # (≤2g,)
    window = torch.arange(n, device=device)[:, None] + torch.arange(-s, 1 if causal else s + 1, device=device)
    window = window.masked_fill((window < 0) | (window >= n), -1)  # (N, 2s+1)
    rand = random_blocks(n, heads, cfg, causal=causal, device=device)  # (H, N, r)
    blocks = torch.cat([glob.expand(heads, n, -1), window.expand(heads, n, -1), rand], dim=-1)  # (H, N, M)
    return dedup_keep_first(block_range(blocks, b, length)), rand


def bigbird_pattern_reference(length: int, cfg: BigBirdConfig, rand: Tensor) -> Tensor:
    """The plain (H, L, L) bool pattern of the formula above, given the random block table."""
    pos = torch.arange(length)
    bi, bj = (pos // cfg.block_size)[:, None], (pos // cfg.block_size)[None, :]
    n = -(-length // cfg.block_size)
    glob = global_block_mask(n, cfg.global_blocks)
    base = glob[bi] | glob[bj] | ((bj - bi).abs() <= cfg.window_blocks // 2)  # (L, L)
    in_rand = (rand[:, bi.squeeze(1), :, None] == bj.squeeze(0)[None, None, None, :]).any(-2)  # (H, L, L)
    return base[None] | in_rand


def bigbird_attention(q, k, v, cfg: BigBirdConfig, *, key_padding_mask=None, causal=False) -> Tensor:
    """q, k, v: (B, H, L, D) -> (B, H, L, D): block-sparse softmax attention."""
    length = q.shape[-2]
    key_index, _ = bigbird_pattern(length, q.shape[1], cfg, causal=causal, device=q.device)
    out = gathered_block_attention(
        q, k, v, key_index, None, block=cfg.block_size, key_padding_mask=key_padding_mask, causal=causal
    )
    n = key_index.shape[1]
    rows = torch.arange(length, device=q.device)
    rows = rows[global_block_mask(n, cfg.global_blocks, q.device)[rows // cfg.block_size]]  # tokens of global blocks
    if rows.numel():
        out = replace_rows(out, rows, dense_rows(q, k, v, rows, key_padding_mask=key_padding_mask, causal=causal))
    return out


@register_mechanism("bigbird", BigBirdConfig, causal=True, key_padding=True)
class BigBirdAttention(Attention):
    """BigBird (Zaheer et al. 2020), ITC: window + global + random blocks, O(L·b·(w + g + r))."""

    def __init__(self, cfg: BigBirdConfig, *, heads: int, dim_head: int, max_len: int):
        super().__init__(cfg, heads=heads, dim_head=dim_head, max_len=max_len)
        if cfg.block_size < 1 or cfg.window_blocks < 1 or cfg.window_blocks % 2 == 0:
            raise ValueError(f"bigbird needs block_size >= 1 and an odd window_blocks >= 1; got {cfg}")
        if cfg.global_blocks < 0 or cfg.random_blocks < 0:
            raise ValueError(f"bigbird needs global_blocks >= 0 and random_blocks >= 0; got {cfg}")

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
        return bigbird_attention(q, k, v, self.cfg, key_padding_mask=key_padding_mask, causal=causal)
