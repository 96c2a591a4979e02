"""BigBird block-sparse attention, ITC form (Zaheer, Guruganesh, Dubey, Ainslie, Alberti,
Ontanon, Pham, Ravula, Wang, Yang, Ahmed 2020, "Big Bird: Transformers for Longer Sequences",
arXiv:2007.14062, §2 and App. D).

The sequence is cut into blocks of b tokens; with block index β(i) = ⌊i/b⌋, N blocks, the
global blocks 𝒢 = the first and last ``global_blocks`` blocks (internal transformer
construction, ITC), a window of ``window_blocks`` = 2s+1 blocks and r random blocks R_h(β)
per query block and head (drawn once per layer, from the layer's seed):

    P_h(i) = all j                                          if β(i) ∈ 𝒢
           = {j : |β(j) − β(i)| ≤ s  or  β(j) ∈ 𝒢  or  β(j) ∈ R_h(β(i))}   otherwise
    out_i  = Σ_{j ∈ P_h(i)} softmax_j(q_i·k_j / √d) v_j       (+ j ≤ i when causal)

Random blocks are drawn, per head, among the blocks outside the window and the global
blocks (the rule of the authors' ``bigbird_block_rand_mask`` in google-research/bigbird,
``bigbird/core/attention.py``, and of Hugging Face's ``_bigbird_block_rand_mask``); with
``causal=True`` only among earlier blocks, so none is wasted on masked keys. Computed per
query block: its 2g + 2s + 1 + r key blocks are gathered and attended with one softmax; the
rows of global blocks are a dense softmax over all keys. Cost O(L·b·(2g + 2s + 1 + r)·d)
time and O(L·b·(2g + 2s + 1 + r)) memory, plus O(g·b·L) for the global rows; no (L, L) tensor
once each block gathers fewer than half the keys (2·S < L, S = (2g + 2s + 1 + r)·b: L > 1024
at the defaults). Below that the shared engine takes the dense form of the same pattern,
which does build (L, L) masks and scores (``mechanisms/_blocks.py``).

Layers: the authors seed each layer's pattern with its index (``seed=layer_idx`` in
google-research/bigbird ``bigbird/core/encoder.py``). Here ``seed = -1`` (default) makes each
instance draw its own pattern seed from torch's RNG when it is built, so the layers of a
model differ and a run is reproducible from its seed; an explicit ``seed ≥ 0`` is shared by
every instance built with it (all layers alike, the previous behaviour).

Padding: with a key-padding mask each example's pattern is the one it has alone, from its
own real length ℓ: its block count ⌈ℓ/b⌉, its last g blocks global (dense rows over its real
keys), its random blocks among its own real blocks, with priorities from one draw of size
⌈max_len/b⌉² whose top-left corner every length uses. So an example's outputs on its real
tokens do not depend on how much padding its batch has (tested in float64 to 1e-10 in
``tests/mechanisms/test_padding_invariance.py``).

Deviations from the authors' code: (1) the pattern is a fixed function of (layer seed,
length, heads) per example: the authors' TensorFlow code draws it with NumPy when the layer
is built for one padded length (padding then changes which blocks are global and random),
Hugging Face's port draws it anew in every training forward pass; a fixed draw makes runs
reproducible and the test against the dense oracle exact.
(2) Any length works (the last block may be partial); the authors fall back to full
attention below (2g + 2s + 1 + r)·b tokens, here short sequences simply have fewer
candidate random blocks. (3) The authors' kernel gathers the window as three shifted copies
of the blocked keys with the first/last blocks special-cased; here one gather per query
block (same pattern, no wrap-around). (4) Self-attention only (no ``cross``).

Protocol settings under ``scale=lra`` (``PROTOCOLS`` below), the defaults here: ``protocol=lra``
blocks of 64 and 3 random blocks (google-research/long-range-arena
``lra_benchmarks/models/bigbird/bigbird.py`` ``_DEFAULT_BLOCK_SIZE = 64``,
``bigbird_attention.py`` ``num_rand_blocks=3``; ``image/configs/{cifar10,pathfinder32}/bigbird_base.py``
set ``config.model.block_size = 64`` again), each layer its own pattern (its
``connectivity_seed = hash(path)``); ``protocol=pytorch`` the same (pkuzengqi/Skyformer
``src/config.py`` ``"bigbird": {"num_random_blocks": 3, "block_size": 64}``). The LRA image and
Pathfinder configs also change the model per mechanism (CIFAR-10: 1 layer of width 128,
``num_head = 4``, a key the model does not read): not followed, see docs/protocols.md.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from harness.core import Attention, AttentionContext, register_mechanism
from mechanisms._blocks import (
    block_range,
    dedup_keep_first,
    dense_rows,
    gathered_block_attention,
    masked_softmax,
    replace_rows,
)


@dataclass
class BigBirdConfig:
    block_size: int = 64  # b: tokens per block (the authors' default 64)
    window_blocks: int = 3  # 2s+1 neighbouring blocks each block sees (odd; the authors' 3)
    global_blocks: int = 1  # g: the first g and last g blocks are global (ITC; the authors' 2 blocks in all)
    random_blocks: int = 3  # r: random key blocks per query block and head (the authors' 3)
    seed: int = -1  # pattern seed; -1 = each instance (layer) draws its own from torch's RNG when built


def global_block_mask(n: int, g: int, device=None) -> Tensor:
    """(N,) bool: True at the first g and last g blocks."""
    ids = torch.arange(n, device=device)
    return (ids < g) | (ids >= n - g)


def random_blocks(
    n: int,
    heads: int,
    cfg: BigBirdConfig,
    *,
    causal: bool,
    device=None,
    seed: int | None = None,
    draw_blocks: int = 0,
    real_blocks: Tensor | None = None,
) -> Tensor:
    """(H, N, r) random key-block ids per query block and head, -1 where no candidate is left;
    (B, H, N, r) with real_blocks (B,): each example's own candidates among its real blocks.
    Candidates: blocks outside the window and not global (and earlier when causal).

    The priorities are one (H, W, W) draw from ``seed`` (default cfg.seed), W = max(draw_blocks,
    N), of which the top-left N × N is used: with a fixed draw_blocks (from max_len) an
    example's random blocks depend on its own block count only, not on the padded length."""
    r = min(cfg.random_blocks, n)
    width = max(draw_blocks, n)
    gen = torch.Generator().manual_seed(cfg.seed if seed is None else seed)
    draw = torch.rand(heads, width, width, generator=gen)[:, :n, :n].to(device)  # a random priority per block pair
    qb = torch.arange(n, device=device)[:, None]
    kb = torch.arange(n, device=device)[None, :]
    cand = (kb - qb).abs() > cfg.window_blocks // 2  # (N, N)
    if causal:
        cand = cand & (kb < qb)
    if real_blocks is None:
        cand = cand & ~global_block_mask(n, cfg.global_blocks, device)[None, :]
    else:
        ids = torch.arange(n, device=device)
        nb = real_blocks[:, None]  # (B, 1)
        keep = (ids >= cfg.global_blocks) & (ids < nb - cfg.global_blocks)  # (B, N): real, not global
        cand = (cand & keep[:, None, :])[:, None]  # (B, 1, N, N)
    top = draw.masked_fill(~cand, -1.0).topk(r, dim=-1)  # the r highest-priority candidates
    return top.indices.masked_fill(top.values < 0, -1)


def global_blocks_of(n: int, g: int, real_blocks: Tensor | None, device=None) -> Tensor:
    """The global block ids: (≤2g,) for a shared pattern, (B, 2g) per example (-1 = none;
    an id listed twice when an example has fewer than 2g blocks, deduplicated later)."""
    if real_blocks is None:
        return torch.arange(n, device=device)[global_block_mask(n, g, device)]
    first = torch.arange(g, device=device).expand(real_blocks.shape[0], g)
    last = real_blocks[:, None] - g + torch.arange(g, device=device)
    ids = torch.cat([first, last], dim=1)  # (B, 2g)
    return ids.masked_fill((ids < 0) | (ids >= real_blocks[:, None]), -1)


def bigbird_pattern(
    length: int,
    heads: int,
    cfg: BigBirdConfig,
    *,
    causal: bool,
    device=None,
    seed: int | None = None,
    draw_blocks: int = 0,
    real_lengths: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """key_index (H, N, S) of every query block (global, window, random key blocks, deduplicated)
    and the (H, N, r) random block table it was built from; with real_lengths (B,) one pattern
    per example, built from its own block count: (B, H, N, S) and (B, H, N, r)."""
    b, n = cfg.block_size, -(-length // cfg.block_size)
    s = cfg.window_blocks // 2
    real_blocks = None if real_lengths is None else (-(-real_lengths // b)).clamp_min(1)
    glob = global_blocks_of(n, cfg.global_blocks, real_blocks, device)  # (≤2g,) or (B, 2g)
    window = torch.arange(n, device=device)[:, None] + torch.arange(-s, 1 if causal else s + 1, device=device)
    window = window.masked_fill((window < 0) | (window >= n), -1)  # (N, 2s+1)
    rand = random_blocks(
        n, heads, cfg, causal=causal, device=device, seed=seed, draw_blocks=draw_blocks, real_blocks=real_blocks
    )  # ([B,] H, N, r)
    lead = rand.shape[:-2]  # (H,) or (B, H)
    glob = glob.expand(*lead, n, -1) if real_blocks is None else glob[:, None, None, :].expand(*lead, n, -1)
    blocks = torch.cat([glob, window.expand(*lead, n, -1), rand], dim=-1)  # ([B,] H, N, M)
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


def global_rows_per_example(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    out: Tensor,
    real_lengths: Tensor,
    cfg: BigBirdConfig,
    *,
    key_padding_mask: Tensor,
    causal: bool,
) -> Tensor:
    """out with the rows of each example's global blocks (its first g and last g blocks, from its
    own length) replaced by full softmax attention over its keys: O(B·2g·b·L)."""
    bsz, h, length, d = q.shape
    blk, g = cfg.block_size, cfg.global_blocks
    real_blocks = (-(-real_lengths // blk)).clamp_min(1)  # (B,)
    offsets = torch.arange(g * blk, device=q.device)
    first = offsets.expand(bsz, -1)  # (B, g·b)
    last_start = (real_blocks - g).clamp_min(g) * blk  # a last block that is also a first one is not repeated
    last = last_start[:, None] + offsets
    last = last.masked_fill(last >= real_blocks[:, None] * blk, length)
    rows = torch.cat([first, last], dim=1).clamp_max(length)  # (B, G); `length` = no row (dump)
    safe = rows.clamp_max(length - 1)
    qs = q.gather(2, safe[:, None, :, None].expand(bsz, h, -1, d))  # (B, H, G, D)
    mask = ~key_padding_mask.bool()[:, None, None, :]  # (B, 1, 1, L)
    if causal:
        mask = mask & (torch.arange(length, device=q.device) <= safe[:, :, None])[:, None]
    scores = torch.einsum("bhgd,bhjd->bhgj", qs, k) * d**-0.5
    rows_out = torch.einsum("bhgj,bhjd->bhgd", masked_softmax(scores, mask).to(v.dtype), v)
    padded = torch.cat([out, out.new_zeros(bsz, h, 1, d)], dim=2)  # a dump row at `length`
    padded = padded.scatter(2, rows[:, None, :, None].expand(bsz, h, -1, d), rows_out.to(out.dtype))
    return padded[:, :, :length]


def bigbird_attention(
    q, k, v, cfg: BigBirdConfig, *, key_padding_mask=None, causal=False, seed: int | None = None, draw_blocks: int = 0
) -> Tensor:
    """q, k, v: (B, H, L, D) -> (B, H, L, D): block-sparse softmax attention. With a key-padding
    mask each example's pattern comes from its own real length (as if it were alone)."""
    length = q.shape[-2]
    real_lengths = None if key_padding_mask is None else (~key_padding_mask.bool()).sum(-1)
    key_index, _ = bigbird_pattern(
        length,
        q.shape[1],
        cfg,
        causal=causal,
        device=q.device,
        seed=seed,
        draw_blocks=draw_blocks,
        real_lengths=real_lengths,
    )
    out = gathered_block_attention(
        q, k, v, key_index, None, block=cfg.block_size, key_padding_mask=key_padding_mask, causal=causal
    )
    if real_lengths is not None:
        return global_rows_per_example(
            q, k, v, out, real_lengths, cfg, key_padding_mask=key_padding_mask, causal=causal
        )
    n = key_index.shape[1]
    rows = torch.arange(length, device=q.device)
    rows = rows[global_block_mask(n, cfg.global_blocks, q.device)[rows // cfg.block_size]]  # tokens of global blocks
    if rows.numel():
        out = replace_rows(out, rows, dense_rows(q, k, v, rows, key_padding_mask=key_padding_mask, causal=causal))
    return out


# The authors' settings per scale=lra protocol (sources: the module docstring).
PROTOCOLS = {
    "lra": {"*": {"block_size": 64, "random_blocks": 3, "window_blocks": 3, "global_blocks": 1}},  # bigbird.py
    "pytorch": {"*": {"block_size": 64, "random_blocks": 3, "window_blocks": 3, "global_blocks": 1}},  # config.py
}


@register_mechanism("bigbird", BigBirdConfig, causal=True, key_padding=True, family="sparse", protocols=PROTOCOLS)
class BigBirdAttention(Attention):
    """BigBird (Zaheer et al. 2020), ITC: window + global + random blocks, O(L·b·(w + g + r))."""

    def __init__(self, cfg: BigBirdConfig, *, heads: int, dim_head: int, max_len: int):
        super().__init__(cfg, heads=heads, dim_head=dim_head, max_len=max_len)
        if cfg.block_size < 1 or cfg.window_blocks < 1 or cfg.window_blocks % 2 == 0:
            raise ValueError(f"bigbird needs block_size >= 1 and an odd window_blocks >= 1; got {cfg}")
        if cfg.global_blocks < 0 or cfg.random_blocks < 0 or cfg.seed < -1:
            raise ValueError(f"bigbird needs global_blocks >= 0, random_blocks >= 0 and seed >= -1; got {cfg}")
        # Each layer its own random pattern (the authors seed each layer with its index): an explicit
        # seed is shared by every instance built with it; -1 draws one from torch's RNG, so a run's
        # layers differ and the run stays reproducible from its seed.
        self.pattern_seed = cfg.seed if cfg.seed >= 0 else int(torch.randint(0, 2**31 - 1, ()))
        self.draw_blocks = -(-max_len // cfg.block_size)  # random-block priorities drawn for max_len's blocks

    def pattern(self, length: int, *, causal: bool = False, real_lengths: Tensor | None = None):
        """This instance's (key_index, random block table) at this length (see ``bigbird_pattern``)."""
        return bigbird_pattern(
            length,
            self.heads,
            self.cfg,
            causal=causal,
            seed=self.pattern_seed,
            draw_blocks=self.draw_blocks,
            real_lengths=real_lengths,
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
        return bigbird_attention(
            q,
            k,
            v,
            self.cfg,
            key_padding_mask=key_padding_mask,
            causal=causal,
            seed=self.pattern_seed,
            draw_blocks=self.draw_blocks,
        )
