"""Relation-aware self-attention (Shaw, Uszkoreit & Vaswani 2018, "Self-Attention with
Relative Position Representations", arXiv:1803.02155; as used by RAT-SQL, Wang et al.
2020, arXiv:1911.04942, for text-to-SQL on Spider).

Every (query i, key j) pair has a relation id r_ij with learned embeddings a^K_r, a^V_r
of size d (shared across heads, as in Shaw et al.):

    e_ij = q_i · (k_j + a^K_{r_ij}) / √d
    α_ij = softmax_j(e_ij + M_ij)
    z_i  = Σ_j α_ij (v_j + a^V_{r_ij})

M = -inf where a key is padded or (causal) in the future; a query with no allowed key
returns 0. The relation ids come from one of two places:

* ``context.relations`` (B, Lq, Lk) long in [0, num_relations): schema-linking relations
  (RAT-SQL); any id outside that range is an error.
* otherwise relative positions r_ij = clip(j - i', -max_distance, max_distance) + max_distance
  with i' = i + (Lk - Lq) (bottom-right aligned like causal masking, so Lq != Lk works).

The two modes use separate rows of one embedding table (num_relations rows for relations,
then 2·max_distance + 1 rows for distances), so every parameter always gets a gradient.

Exact (no approximation). Two forms of the same formula:

* ``relation_aware_attention``, the plain form: O(Lq·Lk·d) like softmax plus O(Lq·R·d) for
  q·a^K over the R distinct embeddings, gathered per pair, and a scatter of α into R
  buckets for the value side. Used for ``context.relations`` (arbitrary ids), with dropout,
  and as the reference the tests compare the fast form against in float64.
* ``relative_position_attention``, the relative-position mode blocked over ``query_block``
  queries with recomputation in backward (flash-attention style: only the output and each
  row's log-sum-exp are kept, a custom autograd Function recomputes one block of scores at
  a time). The relative structure replaces gather/scatter: a^K_{+M} and a^V_{+M} are folded
  into shifted keys/values, the −M bucket is one constant per row left of the band, the
  2M − 1 band entries go through a strided diagonal view, and the bucket sums are slice
  sums plus the band's diagonals. Causal blocks skip the keys after their last query.
  Memory O(B·H·block·Lk); the same seven L²·d matmuls as flash attention's forward+backward.

Deviations from Shaw et al.: none in the math (tables shared across heads, as in the
paper); additions: a relation-id mode for RAT-SQL, bottom-right alignment for Lq ≠ Lk, a
row with no visible key returns 0. Reference code consulted: the paper's equations (3)–(4)
and tensor2tensor's ``common_attention.dot_product_attention_relative`` /
``_generate_relative_positions_matrix`` (read in a verbatim copy, OpenSUM/ChNewsLongSum
utils/common_attention.py): clipped distances j − i into a (2M + 1, d) table, one term per
side, queries aligned to the last Lq keys when Lq ≠ Lk (our bottom-right alignment).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from harness.core import Attention, AttentionContext, allowed_mask, register_mechanism


@dataclass
class RelationAwareConfig:
    num_relations: int = 32  # distinct ids accepted in context.relations
    max_distance: int = 16  # relative positions are clipped to [-max_distance, max_distance]
    dropout: float = 0.0  # attention-weight dropout, training only (it takes the plain path)
    query_block: int = 128  # relative-position mode: queries per block of the fast path; memory O(B·H·block·Lk)


def relative_position_ids(lq: int, lk: int, max_distance: int, device: torch.device | None = None) -> Tensor:
    """(1, Lq, Lk) long: clip(j - (i + Lk - Lq), -max_distance, max_distance) + max_distance."""
    i = torch.arange(lq, device=device)[:, None] + (lk - lq)
    j = torch.arange(lk, device=device)[None, :]
    return ((j - i).clamp(-max_distance, max_distance) + max_distance)[None]


def check_relation_ids(relations: Tensor, batch: int, lq: int, lk: int, num_relations: int) -> Tensor:
    """Validate context.relations; returns it as (B|1, Lq, Lk) long."""
    if relations.dtype.is_floating_point or relations.dtype == torch.bool:
        raise TypeError(f"context.relations must be an integer tensor of ids, got dtype {relations.dtype}")
    if relations.dim() == 2:
        relations = relations[None]
    if relations.dim() != 3 or relations.shape[0] not in (1, batch) or tuple(relations.shape[1:]) != (lq, lk):
        raise ValueError(
            f"context.relations must have shape (B={batch}, Lq={lq}, Lk={lk}), got {tuple(relations.shape)}"
        )
    if bool(((relations < 0) | (relations >= num_relations)).any()):
        lo, hi = int(relations.min()), int(relations.max())
        raise ValueError(
            f"context.relations ids must lie in [0, num_relations={num_relations}), got ids in [{lo}, {hi}]; "
            f"raise mechanism.num_relations"
        )
    return relations.long()


def relation_aware_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    relation_ids: Tensor,
    relation_keys: Tensor,
    relation_values: Tensor,
    *,
    allowed: Tensor | None = None,
    dropout: float = 0.0,
) -> Tensor:
    """Shaw et al. attention.

    q: (B, H, Lq, D), k/v: (B, H, Lk, D), relation_ids: (B|1, Lq, Lk) long in [0, R),
    relation_keys/values: (R, D), allowed: bool broadcastable to (B, H, Lq, Lk) or None
    -> (B, H, Lq, D). Scores and softmax run in (at least) float32."""
    b, h, lq, _ = q.shape
    lk, r = k.shape[-2], relation_keys.shape[0]
    compute = torch.promote_types(q.dtype, torch.float32)
    ids = relation_ids.expand(b, lq, lk)[:, None].expand(b, h, lq, lk)  # (B, H, Lq, Lk)

    content = torch.matmul(q, k.transpose(-1, -2)).to(compute)  # (B, H, Lq, Lk)
    q_rel = torch.matmul(q, relation_keys.to(q.dtype).transpose(0, 1)).to(compute)  # (B, H, Lq, R)
    scores = (content + q_rel.gather(-1, ids)) / math.sqrt(q.shape[-1])  # (B, H, Lq, Lk)

    if allowed is not None:
        allowed = allowed.expand(b, h, lq, lk)
        scores = scores.masked_fill(~allowed, torch.finfo(compute).min)
    weights = torch.softmax(scores, dim=-1)  # (B, H, Lq, Lk)
    if allowed is not None:
        weights = weights * allowed  # an empty row (uniform over min) becomes all zeros
    if dropout > 0:
        weights = F.dropout(weights, p=dropout)

    out = torch.matmul(weights.to(v.dtype), v)  # (B, H, Lq, D)
    buckets = weights.new_zeros(b, h, lq, r).scatter_add(-1, ids, weights)  # (B, H, Lq, R): Σ_{j: r_ij = r} α_ij
    out_rel = torch.matmul(buckets.to(v.dtype), relation_values.to(v.dtype))  # (B, H, Lq, D)
    return out + out_rel.to(out.dtype)


# ----------------------------------------------------------------------------- fast path
#
# Relative-position mode, blocked over queries with recomputation (flash-attention style):
# the forward keeps only the output and each row's log-sum-exp, the backward recomputes one
# block of scores at a time. The relative structure replaces the gather / scatter of the
# plain path: the key-side bias of a row is q_i·a^K_{−M} left of the band, q_i·a^K_{+M} right
# of it and the 2M − 1 band values in between (written through a strided view), and the
# value-side bucket sums Σ_{j: r_ij = r} α_ij are the band's diagonals plus two tails read
# from one cumulative sum. Memory O(B·H·block·Lk) instead of several (B, H, Lq, Lk) tensors.


def _band_view(buf: Tensor, first: int, rows: int, width: int) -> Tensor:
    """(..., rows, W) buffer -> (..., rows, width) view of buf[..., t, first + t + c]."""
    *lead, _, w = buf.shape
    strides = buf.stride()
    return buf.as_strided(
        (*lead, rows, width), (*strides[:-2], strides[-2] + strides[-1], strides[-1]), buf.storage_offset() + first
    )


def _window(i_first: int, rows: int, lk: int, m: int) -> tuple[int, int]:
    """Columns [lo, hi) of a buffer holding keys 0..Lk−1 and every band position i' ± M."""
    return min(0, i_first - m), max(lk, i_first + rows + m)


def expand_relative(rel: Tensor, i_first: int, lk: int, m: int) -> Tensor:
    """Per-row bucket values rel (..., rows, 2M + 1) -> (..., rows, Lk) with entry
    j = rel[t, clip(j − i'_t, −M, M) + M],
    i'_t = i_first + t (the aligned query positions)."""
    rows = rel.shape[-2]
    lo, hi = _window(i_first, rows, lk, m)
    j = torch.arange(lo, hi, device=rel.device)
    i = torch.arange(rows, device=rel.device)[:, None] + i_first
    buf = torch.where(j <= i - m, rel[..., :1], rel[..., -1:])  # (..., rows, W): the two clipped tails
    if m > 0:
        _band_view(buf, i_first - m + 1 - lo, rows, 2 * m - 1).copy_(rel[..., 1:-1])  # |j − i'| < M
    return buf[..., -lo : lk - lo]


def bucket_sums(x: Tensor, i_first: int, m: int) -> Tensor:
    """(..., rows, Lk) -> (..., rows, 2M + 1): Σ_{j: clip(j − i'_t) = r − M} x[t, j]
    (the adjoint of expand_relative)."""
    rows, lk = x.shape[-2], x.shape[-1]
    lo, hi = _window(i_first, rows, lk, m)
    i = torch.arange(rows, device=x.device) + i_first
    csum = F.pad(x.cumsum(-1), (1, 0))  # (..., rows, Lk + 1): csum[c] = Σ_{j < c} x_j
    left = csum.gather(-1, (i - m + 1).clamp(0, lk).expand(*x.shape[:-1])[..., None])  # Σ_{j ≤ i' − M}
    right = csum[..., -1:] - csum.gather(-1, (i + m).clamp(0, lk).expand(*x.shape[:-1])[..., None])  # Σ_{j ≥ i' + M}
    if m == 0:  # one bucket: every key
        return csum[..., -1:]
    buf = F.pad(x, (-lo, hi - lk))  # zeros outside the keys
    band = _band_view(buf, i_first - m + 1 - lo, rows, 2 * m - 1)
    return torch.cat([left, band, right], -1)


def _regions(i_first: int, rows: int, cols: int, m: int) -> tuple[int, int]:
    """Columns of a query block: [0, w0) lie left of every row's band (bucket −M), [w1, cols)
    right of every band (bucket +M), [w0, w1) is the window around the diagonal."""
    w0 = min(max(i_first - m + 1, 0), cols)
    w1 = min(max(i_first + rows - 1 + m, w0), cols)
    return w0, w1


def _add_relative(s: Tensor, rel: Tensor, i_first: int, m: int, w0: int, w1: int) -> None:
    """In place: s[t, j] += rel[t, clip(j − i'_t) + M] where rel's +M entry is 0 (the +M value is
    already inside s through the shifted keys/values), so only [0, w1) is touched."""
    if w0 > 0:
        s[..., :w0].add_(rel[..., :1])
    if w1 > w0:
        s[..., w0:w1].add_(expand_relative(rel, i_first - w0, w1 - w0, m))


def _buckets(x: Tensor, i_first: int, m: int, w0: int, w1: int) -> Tensor:
    """Full bucket sums (…, rows, cols) -> (…, rows, 2M + 1): slice sums outside the window."""
    if w1 > w0:
        out = bucket_sums(x[..., w0:w1], i_first - w0, m)
    else:
        out = x.new_zeros(*x.shape[:-1], 2 * m + 1)
    out[..., 0] += x[..., :w0].sum(-1)
    out[..., -1] += x[..., w1:].sum(-1)
    return out


class _Geometry:
    """What a query block needs: its rows, aligned first position, visible columns and regions."""

    def __init__(self, start: int, stop: int, offset: int, lk: int, m: int, causal: bool):
        self.start, self.stop, self.i_first = start, stop, start + offset
        rows = stop - start
        self.cols = min(max(self.i_first + rows, 0), lk) if causal else lk  # causal: later keys are never seen
        self.w0, self.w1 = _regions(self.i_first, rows, self.cols, m)
        self.causal = causal


def _block_scores(q_b: Tensor, k_shift: Tensor, dq_rel: Tensor, g: _Geometry, m: int, kpm: Tensor | None) -> Tensor:
    """Scaled scores of one block, (B, H, Bq, cols), −inf where not allowed. q_b is pre-scaled by
    1/√d, k_shift = k + a^K_{+M}, dq_rel = q_b·(a^K_r − a^K_{+M}) (B, H, Bq, R)."""
    s = torch.matmul(q_b, k_shift[:, :, : g.cols].transpose(-1, -2))
    _add_relative(s, dq_rel, g.i_first, m, g.w0, g.w1)
    if kpm is not None:
        s.masked_fill_(kpm[:, None, None, : g.cols], -math.inf)
    if g.causal:  # only the diagonal block of columns can lie in some row's future
        d0 = max(g.i_first + 1, 0)
        if d0 < g.cols:
            j = torch.arange(d0, g.cols, device=s.device)
            i = torch.arange(g.start, g.stop, device=s.device)[:, None] + (g.i_first - g.start)
            s[..., d0:].masked_fill_(j > i, -math.inf)
    return s


class _RelativeAttention(torch.autograd.Function):
    """Shaw et al. with clipped relative positions, blocked over queries, recomputing in backward."""

    @staticmethod
    def forward(ctx, q, k, v, rel_keys, rel_values, kpm, causal, m, block):
        b, h, lq, d = q.shape
        lk, scale = k.shape[-2], 1.0 / math.sqrt(d)
        q_s = q * scale
        k_shift = k + rel_keys[-1]  # (B, H, Lk, D): the +M bucket folded into the keys
        rel_k_diff = rel_keys - rel_keys[-1]  # (R, D), last row 0
        out = q.new_zeros(q.shape)
        lse = q.new_full((b, h, lq), math.inf)  # rows with no visible key keep +inf (α = 0)
        for start in range(0, lq, block):  # query blocks, not positions
            g = _Geometry(start, min(start + block, lq), lk - lq, lk, m, causal)
            if g.cols == 0:
                continue
            q_b = q_s[:, :, g.start : g.stop]
            s = _block_scores(q_b, k_shift, torch.matmul(q_b, rel_k_diff.t()), g, m, kpm)
            row_max = s.amax(-1, keepdim=True)
            row_max = torch.where(torch.isfinite(row_max), row_max, torch.zeros_like(row_max))
            p = s.sub_(row_max).exp_()  # (B, H, Bq, cols), unnormalised
            total = p.sum(-1, keepdim=True)
            mixed = torch.matmul(p, v[:, :, : g.cols]) + torch.matmul(_buckets(p, g.i_first, m, g.w0, g.w1), rel_values)
            out[:, :, g.start : g.stop] = mixed / total.clamp_min(torch.finfo(p.dtype).tiny)
            lse[:, :, g.start : g.stop] = torch.where(
                total[..., 0] > 0, row_max[..., 0] + total[..., 0].log(), math.inf
            )
        ctx.save_for_backward(q, k, v, rel_keys, rel_values, out, lse)
        ctx.kpm, ctx.causal, ctx.m, ctx.block = kpm, causal, m, block
        return out

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, rel_keys, rel_values, out, lse = ctx.saved_tensors
        kpm, causal, m, block = ctx.kpm, ctx.causal, ctx.m, ctx.block
        lq, lk, d = q.shape[-2], k.shape[-2], q.shape[-1]
        scale = 1.0 / math.sqrt(d)
        q_s, k_shift, v_shift = q * scale, k + rel_keys[-1], v + rel_values[-1]
        rel_k_diff, rel_v_diff = rel_keys - rel_keys[-1], rel_values - rel_values[-1]
        grad_out = grad_out.contiguous()
        dq, dk, dv = torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
        d_rel_k, d_rel_v = torch.zeros_like(rel_keys), torch.zeros_like(rel_values)
        delta = (grad_out * out).sum(-1, keepdim=True)  # (B, H, Lq, 1): Σ_j α_ij dα_ij
        for start in range(0, lq, block):
            g = _Geometry(start, min(start + block, lq), lk - lq, lk, m, causal)
            if g.cols == 0:
                continue
            q_b, g_b = q_s[:, :, g.start : g.stop], grad_out[:, :, g.start : g.stop]
            s = _block_scores(q_b, k_shift, torch.matmul(q_b, rel_k_diff.t()), g, m, kpm)
            alpha = s.sub_(lse[:, :, g.start : g.stop, None]).exp_()  # (B, H, Bq, cols)
            d_alpha = torch.matmul(g_b, v_shift[:, :, : g.cols].transpose(-1, -2))  # g·(v_j + a^V_{+M})
            _add_relative(d_alpha, torch.matmul(g_b, rel_v_diff.t()), g.i_first, m, g.w0, g.w1)
            ds = d_alpha.sub_(delta[:, :, g.start : g.stop]).mul_(alpha)  # dL/d(scaled score)
            ds_buckets = _buckets(ds, g.i_first, m, g.w0, g.w1)  # (B, H, Bq, R)
            dq[:, :, g.start : g.stop] = (
                torch.matmul(ds, k[:, :, : g.cols]) + torch.matmul(ds_buckets, rel_keys)
            ) * scale
            dk[:, :, : g.cols] += torch.matmul(ds.transpose(-1, -2), q_b)
            dv[:, :, : g.cols] += torch.matmul(alpha.transpose(-1, -2), g_b)
            d_rel_k += torch.einsum("bhtr,bhtd->rd", ds_buckets, q_b)
            d_rel_v += torch.einsum("bhtr,bhtd->rd", _buckets(alpha, g.i_first, m, g.w0, g.w1), g_b)
        return dq, dk, dv, d_rel_k, d_rel_v, None, None, None, None


def relative_position_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    relation_keys: Tensor,
    relation_values: Tensor,
    *,
    max_distance: int,
    key_padding_mask: Tensor | None = None,
    causal: bool = False,
    block: int = 128,
) -> Tensor:
    """The relative-position mode of ``relation_aware_attention`` (ids clip(j − i', −M, M) + M),
    blocked: q (B, H, Lq, D), k/v (B, H, Lk, D), tables (2M + 1, D) -> (B, H, Lq, D) in
    q's dtype promoted to at least float32."""
    dtype = torch.promote_types(q.dtype, torch.float32)
    kpm = None if key_padding_mask is None else key_padding_mask.bool()
    args = (x.to(dtype).contiguous() for x in (q, k, v, relation_keys, relation_values))
    return _RelativeAttention.apply(*args, kpm, causal, max_distance, block)


@register_mechanism(
    "relation_aware", RelationAwareConfig, causal=True, cross=True, key_padding=True, relations=True, family="full"
)
class RelationAwareAttention(Attention):
    """Relation-aware self-attention (Shaw et al. 2018; RAT-SQL): relation embeddings on keys and values."""

    def __init__(self, cfg: RelationAwareConfig, *, heads: int, dim_head: int, max_len: int):
        super().__init__(cfg, heads=heads, dim_head=dim_head, max_len=max_len)
        if cfg.query_block < 1:
            raise ValueError(f"relation_aware query_block must be >= 1, got {cfg.query_block}")
        if cfg.num_relations < 1 or cfg.max_distance < 0:
            raise ValueError(
                "relation_aware needs num_relations >= 1 and max_distance >= 0, "
                f"got {cfg.num_relations}, {cfg.max_distance}"
            )
        rows = cfg.num_relations + 2 * cfg.max_distance + 1  # relation ids first, then distances
        self.relation_keys = nn.Parameter(torch.randn(rows, dim_head) * dim_head**-0.5)
        self.relation_values = nn.Parameter(torch.randn(rows, dim_head) * dim_head**-0.5)

    def embeddings(self, use_relations: bool) -> tuple[Tensor, Tensor]:
        """The (R, D) key and value tables of one mode."""
        n = self.cfg.num_relations
        part = slice(0, n) if use_relations else slice(n, None)
        return self.relation_keys[part], self.relation_values[part]

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
        b, lq, lk = q.shape[0], q.shape[-2], k.shape[-2]
        relations = context.relations if context is not None else None
        rel_k, rel_v = self.embeddings(use_relations=relations is not None)
        dropout = self.cfg.dropout if self.training else 0.0
        if relations is None and dropout == 0.0:  # relative positions: the blocked fast path
            out_dtype = torch.get_autocast_dtype(q.device.type) if torch.is_autocast_enabled(q.device.type) else q.dtype
            with torch.autocast(q.device.type, enabled=False):
                out = relative_position_attention(
                    q,
                    k,
                    v,
                    rel_k,
                    rel_v,
                    max_distance=self.cfg.max_distance,
                    key_padding_mask=key_padding_mask,
                    causal=causal,
                    block=self.cfg.query_block,
                )
            return out.to(out_dtype)
        if relations is not None:
            ids = check_relation_ids(relations.to(q.device), b, lq, lk, self.cfg.num_relations)
        else:
            ids = relative_position_ids(lq, lk, self.cfg.max_distance, q.device)
        allowed = allowed_mask(lq, lk, key_padding_mask=key_padding_mask, causal=causal, device=q.device)
        return relation_aware_attention(q, k, v, ids, rel_k, rel_v, allowed=allowed, dropout=dropout)
