"""Block-sparse attention over gathered key positions: the shared engine of ``local``,
``sparse``, ``longformer`` and ``bigbird`` (a private helper, not a mechanism).

A pattern is given per *query block* of ``block`` consecutive queries: ``key_index``
(P, N, S) lists the S key positions block n gathers (-1 = no key; P = 1 for a pattern
shared by the heads, P = H for one per head), and ``allowed`` (P, N, block, S) says which
of those S keys each query of the block may see (e.g. an exact band inside the gathered
blocks). The attention of block n is a softmax over its S gathered keys only, so the
score tensor is (B, H, N, block, S) = (B, H, L, S): O(L·S), never (L, L).

Queries whose rows are dense (global tokens) go through :func:`dense_rows` and are written
over the block output with :func:`replace_rows`. :func:`pattern_as_dense` scatters a block
pattern into the (P, Lq, Lk) bool matrix it stands for; tests compare it with each
mechanism's plain pattern formula and the float64 oracle.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor


def dedup_keep_first(key_index: Tensor) -> Tensor:
    """(..., S) long: every repeat of a key position after its first occurrence in the
    same row becomes -1, so a key gathered twice (global and in the window) counts once."""
    ordered, order = torch.sort(key_index, dim=-1, stable=True)  # equal values keep their order
    repeat = torch.zeros_like(ordered, dtype=torch.bool)
    repeat[..., 1:] = ordered[..., 1:] == ordered[..., :-1]
    repeat = torch.zeros_like(repeat).scatter(-1, order, repeat)  # back to the original order
    return key_index.masked_fill(repeat | (key_index < 0), -1)


def block_range(blocks: Tensor, block: int, length: int) -> Tensor:
    """Positions of key blocks: (..., M) block ids -> (..., M·block), -1 outside [0, length)."""
    pos = blocks[..., None] * block + torch.arange(block, device=blocks.device)  # (..., M, block)
    pos = pos.masked_fill((blocks[..., None] < 0) | (pos >= length), -1)
    return pos.flatten(-2)


def masked_softmax(scores: Tensor, mask: Tensor) -> Tensor:
    """Softmax over the last axis among ``mask`` entries, in float32 at least; a row with
    no allowed entry gives all zeros (never NaN)."""
    dtype = torch.promote_types(scores.dtype, torch.float32)
    s = scores.to(dtype).masked_fill(~mask, -math.inf)
    row_max = s.amax(-1, keepdim=True)
    row_max = torch.where(torch.isfinite(row_max), row_max, torch.zeros_like(row_max)).detach()
    e = torch.exp(s - row_max)  # exp(-inf) = 0 at masked entries
    return e / e.sum(-1, keepdim=True).clamp_min(torch.finfo(dtype).tiny)


def gathered_block_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    key_index: Tensor,
    allowed: Tensor | None,
    *,
    block: int,
    key_padding_mask: Tensor | None = None,
    causal: bool = False,
    scale: float | None = None,
) -> Tensor:
    """softmax(q·kᵀ·scale) v restricted, per query block, to the gathered keys.

    q: (B, H, Lq, D), k/v: (B, H, Lk, D), key_index: (P, N, S) with N = ⌈Lq/block⌉, or
    (B, P, N, S) for a pattern per example; allowed: (P, N, block, S) bool or None -> (B, H,
    Lq, D). Causal: query i sees key j iff j <= i + Lk - Lq. Padded keys (key_padding_mask
    (B, Lk), True = pad) are masked out."""
    b, h, lq, d = q.shape
    lk = k.shape[-2]
    p, n, s = key_index.shape[-3:]
    per_example = key_index.dim() == 4
    scale = d**-0.5 if scale is None else scale
    if n * block < lq:
        raise ValueError(f"key_index has {n} query blocks of {block}; {lq} queries need {math.ceil(lq / block)}")
    if 2 * s >= lk:  # short sequences: each block gathers about every key, so the dense form is cheaper
        return dense_pattern_attention(
            q, k, v, key_index, allowed, block=block, key_padding_mask=key_padding_mask, causal=causal, scale=scale
        )
    qb = F.pad(q, (0, 0, 0, n * block - lq)).reshape(b, h, n, block, d)  # (B, H, N, blk, D)
    valid = key_index >= 0  # ([B,] P, N, S)
    idx = key_index.clamp_min(0)
    if per_example:
        batch = torch.arange(b, device=q.device)[:, None, None, None]  # (B, 1, 1, 1)
        heads = torch.arange(h, device=q.device)[None, :, None, None] if p > 1 else 0
        kg, vg = k[batch, heads, idx], v[batch, heads, idx]  # (B, H, N, S, D)
    elif p == 1:
        kg, vg = k[:, :, idx[0]], v[:, :, idx[0]]  # (B, H, N, S, D)
    else:
        heads = torch.arange(h, device=q.device)[:, None, None]  # (H, 1, 1)
        kg, vg = k[:, heads, idx], v[:, heads, idx]  # (B, H, N, S, D)
    scores = torch.einsum("bhnid,bhnsd->bhnis", qb, kg) * scale  # (B, H, N, blk, S)

    mask = valid[..., None, :]  # ([B,] P, N, 1, S)
    if allowed is not None:
        mask = mask & allowed
    if causal:
        qpos = torch.arange(n * block, device=q.device).view(n, block) + (lk - lq)  # (N, blk)
        mask = mask & (key_index[..., None, :] <= qpos[:, :, None])
    if not per_example:
        mask = mask[None]  # (1, P, N, blk|1, S)
    if key_padding_mask is not None:
        keep = ~key_padding_mask.bool()
        keep = keep[torch.arange(b, device=q.device)[:, None, None, None], idx] if per_example else keep[:, idx]
        mask = mask & keep[:, :, :, None, :]  # keep: (B, P, N, S)
    weights = masked_softmax(scores, mask).to(vg.dtype)
    out = torch.einsum("bhnis,bhnsd->bhnid", weights, vg)  # (B, H, N, blk, D)
    return out.reshape(b, h, n * block, d)[:, :, :lq]


def dense_pattern_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    key_index: Tensor,
    allowed: Tensor | None,
    *,
    block: int,
    key_padding_mask: Tensor | None = None,
    causal: bool = False,
    scale: float | None = None,
) -> Tensor:
    """The same attention as :func:`gathered_block_attention` through the (Lq, Lk) matrix the
    pattern stands for: O(Lq·Lk), used only when a block gathers at least half of the keys
    (short sequences, where gathering costs more than it saves). Keys gathered twice count
    once here, so callers deduplicate (``dedup_keep_first``), as they do for the gathered form."""
    lq, lk = q.shape[-2], k.shape[-2]
    if key_index.dim() == 4:  # a pattern per example: (B, P, Lq, Lk)
        bp = key_index.shape[:2]
        mask = pattern_as_dense(key_index.flatten(0, 1), allowed, block=block, query_len=lq, key_len=lk)
        mask = mask.view(*bp, lq, lk)
    else:
        mask = pattern_as_dense(key_index, allowed, block=block, query_len=lq, key_len=lk)[None]  # (1, P, Lq, Lk)
    rows = torch.arange(lq, device=q.device)
    return _dense_attention(q, k, v, mask, rows, lq, key_padding_mask=key_padding_mask, causal=causal, scale=scale)


def _dense_attention(
    qs: Tensor,
    k: Tensor,
    v: Tensor,
    mask: Tensor,
    rows: Tensor,
    lq: int,
    *,
    key_padding_mask: Tensor | None,
    causal: bool,
    scale: float | None,
) -> Tensor:
    """softmax(qs·kᵀ·scale) v over the keys ``mask`` (broadcastable to (B, H, G, Lk)) allows, the
    G query rows qs (B, H, G, D) standing at positions ``rows`` (G,) of Lq; causal and padded
    keys masked as in the gathered form."""
    lk = k.shape[-2]
    scale = qs.shape[-1] ** -0.5 if scale is None else scale
    if causal:
        mask = mask & (torch.arange(lk, device=k.device)[None, :] <= rows[:, None] + (lk - lq))
    if key_padding_mask is not None:
        mask = mask & ~key_padding_mask.bool()[:, None, None, :]
    scores = torch.einsum("bhgd,bhjd->bhgj", qs, k) * scale  # (B, H, G, Lk)
    weights = masked_softmax(scores, mask).to(v.dtype)
    return torch.einsum("bhgj,bhjd->bhgd", weights, v)


def dense_rows(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    rows: Tensor,
    *,
    key_padding_mask: Tensor | None = None,
    causal: bool = False,
    scale: float | None = None,
) -> Tensor:
    """Full softmax attention of the query rows ``rows`` (G,) to every key: (B, H, G, D).
    O(G·Lk): for a few global tokens."""
    mask = torch.ones(1, 1, rows.numel(), k.shape[-2], dtype=torch.bool, device=q.device)
    return _dense_attention(
        q[:, :, rows], k, v, mask, rows, q.shape[-2], key_padding_mask=key_padding_mask, causal=causal, scale=scale
    )


def replace_rows(out: Tensor, rows: Tensor, values: Tensor) -> Tensor:
    """out with out[:, :, rows] = values (out of place, differentiable)."""
    return out.index_copy(2, rows, values.to(out.dtype))


def pattern_as_dense(key_index: Tensor, allowed: Tensor | None, *, block: int, query_len: int, key_len: int) -> Tensor:
    """The (P, Lq, Lk) bool matrix a block pattern stands for (the dense short-sequence form, tests, plots)."""
    p, n, s = key_index.shape
    mask = (key_index >= 0)[:, :, None, :].expand(p, n, block, s)
    if allowed is not None:
        mask = mask & allowed
    dense = torch.zeros(p, n, block, key_len + 1, dtype=torch.uint8, device=key_index.device)  # last column: "no key"
    idx = key_index.masked_fill(key_index < 0, key_len)[:, :, None, :].expand(p, n, block, s)
    dense.scatter_reduce_(-1, idx, mask.to(torch.uint8), reduce="amax")
    return dense[..., :key_len].bool().reshape(p, n * block, key_len)[:, :query_len]
