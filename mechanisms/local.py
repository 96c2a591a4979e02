"""Local (sliding-window) attention, blocked: each query attends only to keys near it.

The baseline "Local Attention" of the Long Range Arena (Tay, Dehghani, Abnar, Shen, Bahri,
Pham, Rao, Yang, Ruder, Metzler 2021, "Long Range Arena", arXiv:2011.04006; the windowed
self-attention of Parmar et al. 2018, "Image Transformer", arXiv:1802.05751), in the blocked
form of lucidrains' ``local-attention`` (https://github.com/lucidrains/local-attention,
``local_attention/local_attention.py``). The sequence is cut into blocks of ``window``
positions; query i in block n = ⌊i/w⌋ attends to the keys of blocks
n − look_backward … n + look_forward:

    out_i = Σ_{j ∈ W(i)} softmax_j(q_i·k_j / √d) v_j,   W(i) = {j : −back ≤ ⌊j/w⌋ − ⌊i/w⌋ ≤ fwd}

``exact_window=True`` narrows W(i) to the exact band i − back·w ≤ j ≤ i + fwd·w (the
library's ``exact_windowsize``). ``causal=True`` drops the forward blocks and keeps j ≤ i.
Cost: O(L·w·(back + fwd + 1)·d) time, O(L·w·(back + fwd + 1)) memory, no (L, L) tensor.
With window ≥ L there is one block and this is exactly softmax attention.

Deviations: LRA's own local attention (``lra_benchmarks/models/local/local_attention.py``)
lets each block see only itself (look_backward = look_forward = 0 here); the default
look-around of one block each side follows lucidrains. No rotary embeddings (the library
adds them when given ``dim``; the harness's backbone owns positions). Self-attention only
(no ``cross``): the window is defined on one sequence's positions.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from harness.attention import Attention, AttentionContext
from harness.registry import register_mechanism
from mechanisms._blocks import block_range, gathered_block_attention


@dataclass
class LocalConfig:
    window: int = 128  # block length w: queries of a block share their keys; cost O(L·w) — the accuracy/speed knob
    look_backward: int = 1  # blocks before its own that a block sees
    look_forward: int = 1  # blocks after its own (ignored when causal)
    exact_window: bool = False  # True: only keys with i − back·w ≤ j ≤ i + fwd·w (an exact band)


def local_pattern(length: int, cfg: LocalConfig, *, causal: bool, device=None) -> tuple[Tensor, Tensor | None]:
    """Block pattern: key_index (1, N, (back+fwd+1)·w), allowed (1, N, w, S) or None."""
    w, back = cfg.window, cfg.look_backward
    fwd = 0 if causal else cfg.look_forward
    n = -(-length // w)
    blocks = torch.arange(n, device=device)[:, None] + torch.arange(-back, fwd + 1, device=device)  # (N, M)
    blocks = blocks.masked_fill((blocks < 0) | (blocks >= n), -1)
    key_index = block_range(blocks, w, length)[None]  # (1, N, S)
    allowed = None
    if cfg.exact_window:
        i = torch.arange(n * w, device=device).view(1, n, w, 1)
        j = key_index[:, :, None, :]
        allowed = (j >= i - back * w) & (j <= i + fwd * w)
    return key_index, allowed


def local_pattern_reference(length: int, cfg: LocalConfig, *, causal: bool) -> Tensor:
    """The plain (L, L) bool pattern of the formula above (for tests)."""
    i = torch.arange(length)[:, None]
    j = torch.arange(length)[None, :]
    fwd = 0 if causal else cfg.look_forward
    if cfg.exact_window:
        ok = (j >= i - cfg.look_backward * cfg.window) & (j <= i + fwd * cfg.window)
    else:
        rel = j // cfg.window - i // cfg.window
        ok = (rel >= -cfg.look_backward) & (rel <= fwd)
    return ok & (j <= i) if causal else ok


def local_attention(q, k, v, cfg: LocalConfig, *, key_padding_mask=None, causal=False) -> Tensor:
    """q, k, v: (B, H, L, D) -> (B, H, L, D), blocked sliding-window softmax attention."""
    key_index, allowed = local_pattern(q.shape[-2], cfg, causal=causal, device=q.device)
    return gathered_block_attention(
        q, k, v, key_index, allowed, block=cfg.window, key_padding_mask=key_padding_mask, causal=causal
    )


@register_mechanism("local", LocalConfig, causal=True, key_padding=True, family="sparse")
class LocalAttention(Attention):
    """Blocked sliding-window attention (LRA's local attention; lucidrains' local-attention form), O(L·w)."""

    def __init__(self, cfg: LocalConfig, *, heads: int, dim_head: int, max_len: int):
        super().__init__(cfg, heads=heads, dim_head=dim_head, max_len=max_len)
        if cfg.window < 1 or cfg.look_backward < 0 or cfg.look_forward < 0:
            raise ValueError(f"local needs window >= 1, look_backward >= 0, look_forward >= 0; got {cfg}")

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
        return local_attention(q, k, v, self.cfg, key_padding_mask=key_padding_mask, causal=causal)
