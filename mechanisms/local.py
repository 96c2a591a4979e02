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

Two forms of the same formula: :func:`local_attention_reference`, the plain one (gather each
block's keys, score, masked softmax, weigh; the shared engine of ``mechanisms._blocks``),
and :func:`local_attention`, the one that runs: each block's keys are cut out of the padded
sequence with ``unfold`` (as the library's look-around does) and the blocks go through one
``scaled_dot_product_attention`` call, blocks as heads, so the softmax is fused (no score
tensor kept for the backward pass) and the backward of the gather is a cheap fold. The
tests compare the two, values and gradients, in float64.

Deviations: LRA's own local attention (``lra_benchmarks/models/local/local_attention.py``)
lets each block see only itself (look_backward = look_forward = 0 here); the default
look-around of one block each side follows lucidrains. Under ``scale=lra`` ``protocol=lra``
(``PROTOCOLS`` below) runs LRA's settings: blocks of 50 (``local/local.py``
``LocalTransformerEncoder`` ``block_size=50``), 64 on Image and Pathfinder
(``image/configs/{cifar10,pathfinder32}/local_base.py`` ``config.model.block_size = 64``), no
look-around. LRA's code reshapes the (L, d) queries, keys and values to (block_size, L/block_size)
and attends along the first axis, so its "blocks" are the positions congruent modulo
L/block_size (a strided pattern), while its padding mask is reshaped as contiguous blocks; ours
are contiguous blocks, as the paper's local attention. Those image configs also change the
model per mechanism (CIFAR-10: 1 layer, width 128, 2 heads, mean pooling): not followed. No rotary embeddings (the
library
adds them when given ``dim``; the harness's backbone owns positions). Self-attention only
(no ``cross``): the window is defined on one sequence's positions.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from harness.core import Attention, AttentionContext, register_mechanism
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


def local_attention_reference(q, k, v, cfg: LocalConfig, *, key_padding_mask=None, causal=False) -> Tensor:
    """q, k, v: (B, H, L, D) -> (B, H, L, D), blocked sliding-window softmax attention, the
    plain form: gathered keys, scores, masked softmax (what the tests hold the fast form to)."""
    key_index, allowed = local_pattern(q.shape[-2], cfg, causal=causal, device=q.device)
    return gathered_block_attention(
        q, k, v, key_index, allowed, block=cfg.window, key_padding_mask=key_padding_mask, causal=causal
    )


def look_around(x: Tensor, window: int, back: int, fwd: int) -> Tensor:
    """(B, H, L, D) -> (B·H, N, (back+fwd+1)·w, D): the keys of blocks n−back … n+fwd for each
    block n, zeros outside the sequence (masked by the caller)."""
    b, h, length, d = x.shape
    n = -(-length // window)
    padded = F.pad(x, (0, 0, back * window, fwd * window + n * window - length))  # (B, H, (N+back+fwd)·w, D)
    blocks = padded.reshape(b * h, n + back + fwd, window, d).unfold(1, back + fwd + 1, 1)  # (BH, N, w, D, M)
    return blocks.permute(0, 1, 4, 2, 3).reshape(b * h, n, (back + fwd + 1) * window, d)


def local_attention(q, k, v, cfg: LocalConfig, *, key_padding_mask=None, causal=False) -> Tensor:
    """q, k, v: (B, H, L, D) -> (B, H, L, D), the same attention as
    :func:`local_attention_reference`, the blocks as heads of one fused SDPA call."""
    b, h, length, d = q.shape
    w, back = cfg.window, cfg.look_backward
    fwd = 0 if causal else cfg.look_forward
    n, s = -(-length // w), (back + fwd + 1) * w
    if 2 * s >= length:  # short sequences: each block sees about every key; the reference goes dense
        return local_attention_reference(q, k, v, cfg, key_padding_mask=key_padding_mask, causal=causal)
    key_index, allowed = local_pattern(length, cfg, causal=causal, device=q.device)  # (1, N, S), (1, N, w, S)
    mask = (key_index >= 0)[:, :, None, :]  # (1, N, 1, S): keys inside the sequence
    if allowed is not None:
        mask = mask & allowed
    if causal:
        qpos = torch.arange(n * w, device=q.device).view(1, n, w, 1)
        mask = mask & (key_index[:, :, None, :] <= qpos)  # (1, N, w, S)
    if key_padding_mask is not None:
        keep = ~key_padding_mask.bool()[:, key_index[0].clamp_min(0)]  # (B, N, S)
        per_example = (mask & keep[:, :, None, :])[:, None]  # (B, 1, N, 1|w, S)
        mask = per_example.expand(b, h, *per_example.shape[2:]).reshape(b * h, *per_example.shape[2:])
    # a query with no key at all (its keys all padded; a query past the end under an exact band)
    # gets zeros, as in the reference; it is let see every gathered key so the fused softmax stays finite
    empty = None
    if key_padding_mask is not None or allowed is not None:
        empty = ~mask.any(-1, keepdim=True)  # (1|BH, N, 1|w, 1)
        mask = mask | empty
    qb = F.pad(q, (0, 0, 0, n * w - length)).reshape(b * h, n, w, d)  # (BH, N, w, D): blocks as heads
    out = F.scaled_dot_product_attention(
        qb, look_around(k, w, back, fwd), look_around(v, w, back, fwd), attn_mask=mask, scale=d**-0.5
    )  # (BH, N, w, D)
    if empty is not None:
        out = out.masked_fill(empty, 0.0)
    return out.reshape(b, h, n * w, d)[:, :, :length]


# The authors' settings per scale=lra protocol (sources: the module docstring).
PROTOCOLS = {
    "lra": {
        "*": {"window": 50, "look_backward": 0, "look_forward": 0, "exact_window": False},  # local.py
        "image": {"window": 64},
        "pathfinder": {"window": 64},
    },  # image/configs/*/local_base.py
}


@register_mechanism("local", LocalConfig, causal=True, key_padding=True, family="sparse", protocols=PROTOCOLS)
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
