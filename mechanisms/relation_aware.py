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

Exact (no approximation). Cost: O(Lq·Lk·d) like softmax plus O(Lq·R·d) for q·a^K over the
R distinct embeddings, gathered per pair, and a scatter of α into R buckets for the value
side — no (B, H, Lq, Lk, D) tensor is ever built.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from harness.attention import Attention, AttentionContext, allowed_mask
from harness.registry import register_mechanism


@dataclass
class RelationAwareConfig:
    num_relations: int = 32  # distinct ids accepted in context.relations
    max_distance: int = 16  # relative positions are clipped to [-max_distance, max_distance]
    dropout: float = 0.0  # attention-weight dropout, training only


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


@register_mechanism("relation_aware", RelationAwareConfig, causal=True, cross=True, key_padding=True, relations=True)
class RelationAwareAttention(Attention):
    """Relation-aware self-attention (Shaw et al. 2018; RAT-SQL): relation embeddings on keys and values."""

    def __init__(self, cfg: RelationAwareConfig, *, heads: int, dim_head: int, max_len: int):
        super().__init__(cfg, heads=heads, dim_head=dim_head, max_len=max_len)
        if cfg.num_relations < 1 or cfg.max_distance < 0:
            raise ValueError(
                f"relation_aware needs num_relations >= 1 and max_distance >= 0, got {cfg.num_relations}, {cfg.max_distance}"
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
        if relations is not None:
            ids = check_relation_ids(relations.to(q.device), b, lq, lk, self.cfg.num_relations)
        else:
            ids = relative_position_ids(lq, lk, self.cfg.max_distance, q.device)
        rel_k, rel_v = self.embeddings(use_relations=relations is not None)
        allowed = allowed_mask(lq, lk, key_padding_mask=key_padding_mask, causal=causal, device=q.device)
        dropout = self.cfg.dropout if self.training else 0.0
        return relation_aware_attention(q, k, v, ids, rel_k, rel_v, allowed=allowed, dropout=dropout)
