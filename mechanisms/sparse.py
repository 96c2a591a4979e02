"""Sparse Transformer, fixed pattern (Child, Gray, Radford, Sutskever 2019, "Generating Long
Sequences with Sparse Transformers", arXiv:1904.10509, §4.2 "fixed" attention), block-computed.

With stride l and c summary positions per block, query i attends to the merged pattern

    A(1)_i = {j : ⌊j/l⌋ = ⌊i/l⌋}                (its own block)
    A(2)_i = {j : j mod l ∈ {l − c, …, l − 1}}  (the "summary" columns: last c of every block)
    out_i  = Σ_{j ∈ A(1)_i ∪ A(2)_i} softmax_j(q_i·k_j / √d) v_j       (+ j ≤ i when causal)

Computed per query block: the block's own l keys plus the ⌈L/l⌉·c summary keys are gathered
(duplicates removed) and attended with one softmax. Cost O(L·(l + c·L/l)·d) time and
O(L·(l + c·L/l)) memory: sub-quadratic by the factor (l/L + c/l); with l ≈ √L it is the
paper's O(L·√L). No (L, L) tensor is built.

Checked against the authors' description and the reference patterns of
openai/sparse_attention (``attention.py``, masks by mode) and of the Long Range Arena
(``lra_benchmarks/models/sparse_transformer/sparse_attention.py``: ``Fixed1Pattern`` ∪
``Fixed2Pattern``, merged by logical or). Deviations: (1) LRA's ``Fixed2Pattern`` also keeps
the first column of every block (``remainder == 0``); the paper's A(2) does not, and neither
do we. (2) LRA's patterns are always causal, even for classification; ours are
bidirectional unless ``causal=True`` (the "bidirectional" fixed layout of DeepSpeed's
``FixedSparsityConfig``). (3) One pattern for all heads (the paper's "merged" head
integration), not different summary offsets per head. (4) Self-attention only (no ``cross``).

Protocol settings under ``scale=lra`` (``PROTOCOLS`` below): ``protocol=lra`` runs the patterns
LRA's model factory builds (``lra_benchmarks/utils/train_utils.py`` ``get_model``:
``Fixed1Pattern(block_size=50)``, ``Fixed2Pattern(block_size=50, c=10)``; the encoder's own
default of 128 and 32 is replaced there): stride 50, 10 summary positions.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from harness.core import Attention, AttentionContext, register_mechanism
from mechanisms._blocks import dedup_keep_first, gathered_block_attention


@dataclass
class SparseConfig:
    stride: int = 128  # block length l (the paper's EnWik8 model: 128; LRA's runs: 50)
    summary: int = 8  # c: last positions of each block every query also sees (LRA: 32 of 128)


def sparse_pattern(length: int, cfg: SparseConfig, *, device=None) -> Tensor:
    """key_index (1, N, l + N·c): own block, then every block's summary columns; -1 = none."""
    l, c = cfg.stride, cfg.summary  # noqa: E741 (the paper's l)
    n = -(-length // l)
    own = torch.arange(n, device=device)[:, None] * l + torch.arange(l, device=device)  # (N, l)
    summary = (torch.arange(n, device=device)[:, None] * l + torch.arange(l - c, l, device=device)).flatten()  # (N·c,)
    key_index = torch.cat([own, summary.expand(n, -1)], dim=1)  # (N, S)
    key_index = key_index.masked_fill(key_index >= length, -1)
    return dedup_keep_first(key_index)[None]


def sparse_pattern_reference(length: int, cfg: SparseConfig) -> Tensor:
    """The plain (L, L) bool pattern A(1) ∪ A(2) (for tests)."""
    i = torch.arange(length)[:, None]
    j = torch.arange(length)[None, :]
    return (i // cfg.stride == j // cfg.stride) | (j % cfg.stride >= cfg.stride - cfg.summary)


def sparse_attention(q, k, v, cfg: SparseConfig, *, key_padding_mask=None, causal=False) -> Tensor:
    """q, k, v: (B, H, L, D) -> (B, H, L, D), fixed-pattern sparse softmax attention."""
    key_index = sparse_pattern(q.shape[-2], cfg, device=q.device)
    return gathered_block_attention(
        q, k, v, key_index, None, block=cfg.stride, key_padding_mask=key_padding_mask, causal=causal
    )


# The authors' settings per scale=lra protocol (sources: the module docstring).
PROTOCOLS = {"lra": {"*": {"stride": 50, "summary": 10}}}  # train_utils.py get_model: Fixed{1,2}Pattern(50, c=10)


@register_mechanism("sparse", SparseConfig, causal=True, key_padding=True, family="sparse", protocols=PROTOCOLS)
class SparseAttention(Attention):
    """Sparse Transformer fixed pattern (Child et al. 2019): own block + summary columns, O(L·(l + c·L/l))."""

    def __init__(self, cfg: SparseConfig, *, heads: int, dim_head: int, max_len: int):
        super().__init__(cfg, heads=heads, dim_head=dim_head, max_len=max_len)
        if cfg.stride < 1 or not 0 <= cfg.summary <= cfg.stride:
            raise ValueError(f"sparse needs stride >= 1 and 0 <= summary <= stride; got {cfg}")

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
        return sparse_attention(q, k, v, self.cfg, key_padding_mask=key_padding_mask, causal=causal)
