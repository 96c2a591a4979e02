"""Sparse Sinkhorn attention (Tay, Bahri, Yang, Metzler & Juan 2020, "Sparse Sinkhorn
Attention", ICML 2020, arXiv:2002.11296; authors' code google-research/long-range-arena
``lra_benchmarks/models/sinkhorn_transformer/sinkhorn_attention.py``; lucidrains'
sinkhorn-transformer ``SinkhornAttention`` is our peer ``sinkhorn_peer``).

The sequence is cut into N_B blocks of b tokens. A learned sorting network scores, from a
summary of each key block (the sum of its keys, as the authors' code), where that block
should go, and the Sinkhorn operator turns the scores into a doubly-stochastic, nearly
permutation matrix (§3.2 of the paper, Gumbel-Sinkhorn of Mena et al. 2018):

    R = (k̄ W + c) / τ  (+ Gumbel noise while training),   k̄_i = Σ_{t ∈ block i} k_t      (N_B × N_B)
    P = Sinkhorn(R):  S⁰ = R;  Sⁿ = col-norm(row-norm(Sⁿ⁻¹)) in log space;  P = exp(S^iters)
    K̃_j = Σ_i P_ij K_i,   Ṽ_j = Σ_i P_ij V_i                       (the block sorted into slot j)

and each query block j attends to its own block and to its sorted block. ``combine``:

    "sum" (default, the authors' LRA code: ``x = x + sorted_x``, two attentions each
           normalised on its own):  softmax(Q_j K_jᵀ/√d) V_j + softmax(Q_j K̃_jᵀ/√d) Ṽ_j
    "joint" (lucidrains' sinkhorn-transformer, one softmax over 2b keys):
           softmax(Q_j [K̃_j; K_j]ᵀ/√d) [Ṽ_j; V_j]

(a query with only masked keys on one side gets 0 from that side). O(L·2b·d + N_B²·d)
time, O(L·2b + N_B²) memory, no (L, L) tensor. With one block (L ≤ b) the sorted block is the
block itself, so "joint" is plain softmax attention and "sum" twice it.
W: (d, ⌈max_len/b⌉) shared by the heads (as the authors' DenseGeneral); the first N_B
columns are used, so L ≤ max_len. Accuracy/speed knobs: ``block_size`` (bigger = more keys
per query), ``sinkhorn_iters`` and ``temperature`` (sharper = closer to a hard permutation).

Padding: queries, keys and values of padded positions are zeroed before the block sums
and the sorting, so they have no influence on P or on any sorted key; a sorted key slot is
masked when every key mixed into it is padded (the authors' sorted padding mask, Σ_i P_ij
valid_i,t > 0); own-block padded keys are masked. Lengths that are not a multiple of b are
padded internally the same way. A query whose keys are all padded returns 0. The block count
is per example: the blocks after an example's last real token are all padding and are kept
out of its sort (P is the identity there, the real blocks are sorted among themselves by the
Sinkhorn of their own N_ℓ × N_ℓ scores), so an example's outputs on its real tokens do not
depend on how much padding its batch has (tested in float64 to 1e-10; in eval: the
training Gumbel noise is drawn for the padded block count, so its draw still differs). A one-block example
(ℓ ≤ b) attends to its own keys twice, which is its plain softmax whatever the block size, so
it too matches itself alone (where b = ℓ). The authors' code sorts all N blocks of the padded
length, so padding blocks take part in (and change) the sort: a deviation, (5) below.

Deviations from the authors' code: (1) ``sort`` is Sinkhorn by default (the paper's method;
the LRA code's ``sort_activation`` defaults to a plain softmax over the slots, which
``SinkhornTransformerBlock`` never changes: ``sort="softmax"``, what ``protocol=lra`` uses);
Gumbel noise only in training (``gumbel_noise``; the LRA code has none), deterministic in eval;
(2) blocks are contiguous (the LRA code's reshape to (block_size, num_blocks) makes strided
blocks); (3) no causal variant: the paper's causal
Sinkhorn sorts with cumulative block sums, but a block's own summary still contains the later
tokens of that block, so an honest strictly causal version needs more than the paper gives —
the flag is off; no cross attention (query and key block counts must match); (4) softmax and
Sinkhorn in at least float32 under autocast; (5) the per-example block count (above);
(6) the sorted block: the LRA code forms it with ``einsum('bskhd,bnhl->bsnhd', block_key,
permutation)``, which sums over both the source-block axis k and the slot axis l, so with
its default softmax sort (rows summing to 1) every slot receives the sum of all key blocks;
we mix K̃_j = Σ_i P_ij K_i as the paper's §3.2 describes; (7) defaults: lucidrains' (7
iterations, τ = 0.75, no clipping, block 64). ``scale=lra`` (``protocol=lra``, ``PROTOCOLS``
below) runs LRA's settings: block_size 50
(``sinkhorn_transformer.py`` ``SinkhornTransformerEncoder`` default; 64 on CIFAR-10 and
Pathfinder: ``image/configs/{cifar10,pathfinder32}/sinkhorn_base.py``
``config.model.block_size = 64``), the softmax sort, no Gumbel noise, the two attentions summed,
and for ``sort=sinkhorn`` its ``sinkhorn_operator``'s 1 iteration, temperature 1 and log
weights clipped to ±1 (``clip``). The CIFAR-10 config also sets ``weight_decay = 0.7``,
``dropout_rate = 0.1``, one layer and leaves the base config's 32-wide model (32/1/32/64):
model and training settings that ``harness/conf/protocol/lra/image.yaml`` (the Transformer's) does not
follow per mechanism. The PyTorch protocols (mlpen/Nystromformer, pkuzengqi/Skyformer) ran no
Sinkhorn attention.

Implementation (speed only, the same function): with no key padding mask and L a multiple of b
nothing is padded, zeroed or masked, so q, k, v are used as given, and when every slot of P
holds some weight (then every sorted key is valid) the block softmaxes run unmasked in
``F.scaled_dot_product_attention`` (fused; rounding differs at the last bits); otherwise the
masked form (``block_softmax``), which also keeps an empty slot's keys out of the gradients.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from harness.core import Attention, AttentionContext, register_mechanism


@dataclass
class SinkhornConfig:
    block_size: int = 64  # b tokens per block: each query sees 2b keys (its sorted block + its own)
    sinkhorn_iters: int = 7  # row/column normalisations of the sort matrix (lucidrains' "best in paper")
    temperature: float = 0.75  # τ: lower = closer to a hard permutation
    gumbel_noise: bool = True  # Gumbel-Sinkhorn noise on the sort scores while training (never in eval)
    combine: str = "sum"  # "sum": own-block and sorted-block attentions added (authors' LRA code); "joint": one softmax
    sort: str = (
        "sinkhorn"  # "sinkhorn" (the paper) or "softmax": each key block's weights over the slots (LRA's default)
    )
    clip: float = 0.0  # sinkhorn sort: clip the final log weights to ±clip before exp (LRA's operator: 1); 0 = none


COMBINES = ("sum", "joint")
SORTS = ("sinkhorn", "softmax")


def real_block_pairs(real_blocks: Tensor, n: int) -> Tensor:
    """real_blocks (B,) -> (B, N, N) bool: the pairs that may carry sort weight, the real blocks
    among themselves and each all-padding block (after an example's real ones) with itself."""
    ids = torch.arange(n, device=real_blocks.device)
    pad = ids[None, :] >= real_blocks[:, None]  # (B, N) all-padding blocks
    return ~(pad[:, :, None] | pad[:, None, :]) | (ids[:, None] == ids[None, :])


def restrict_to_real_blocks(log_scores: Tensor, real_blocks: Tensor) -> Tensor:
    """(B, H, N, N) scores, real_blocks (B,) -> scores whose Sinkhorn is block diagonal: the
    first real_blocks rows and columns as given, the identity on the all-padding blocks after
    them (0 on their diagonal, a finite −∞ elsewhere, so exp gives exactly 0 and no NaN). The
    real blocks are then sorted among themselves exactly as with no padding blocks at all."""
    n = log_scores.shape[-1]
    pairs = real_block_pairs(real_blocks, n)[:, None]  # (B, 1, N, N)
    ids = torch.arange(n, device=log_scores.device)
    pad = (ids[None, :] >= real_blocks[:, None])[:, None, :, None] & (ids[:, None] == ids[None, :])
    low = torch.finfo(log_scores.dtype).min / 4
    return log_scores.masked_fill(~pairs, low).masked_fill(pad, 0.0)


def sinkhorn(log_scores: Tensor, iters: int, *, clip: float = 0.0, allowed: Tensor | None = None) -> Tensor:
    """(…, N, N) scores -> doubly-stochastic matrix exp(Sⁿ), rows then columns normalised in log space.

    ``clip`` > 0: exp(clip(Sⁿ, −clip, clip)) as LRA's ``sinkhorn_operator`` ends (no longer doubly
    stochastic: every weight lies in [e^−clip, e^clip]); ``allowed`` (broadcastable bool) keeps
    the pairs outside it at exactly 0 (clipping would lift them to e^−clip)."""
    for _ in range(iters):
        log_scores = log_scores - log_scores.logsumexp(-1, keepdim=True)
        log_scores = log_scores - log_scores.logsumexp(-2, keepdim=True)
    if clip > 0:
        log_scores = log_scores.clamp(-clip, clip)
    weights = log_scores.exp()
    return weights if allowed is None else weights * allowed


def gumbel_like(x: Tensor, eps: float = 1e-6) -> Tensor:
    """Standard Gumbel noise -log(-log(u)) drawn as sinkhorn-transformer does (so seeded draws agree)."""
    u = torch.empty_like(x).uniform_(0, 1)
    return -torch.log(-torch.log(u + eps) + eps)


def block_softmax(q: Tensor, keys: Tensor, values: Tensor, key_valid: Tensor) -> Tensor:
    """Blocked softmax attention. q: (B, H, N, b, d), keys/values: (B, H, N, S, d), key_valid:
    (B, H, N, S) -> (B, H, N, b, d); masked keys get weight exactly 0, a row with none is 0."""
    dots = torch.einsum("bhnid,bhnjd->bhnij", q, keys) * q.shape[-1] ** -0.5  # (B, H, N, b, S)
    dots = dots.masked_fill(~key_valid[..., None, :], torch.finfo(dots.dtype).min)
    weights = dots.softmax(-1) * key_valid[..., None, :]  # exactly 0 at masked keys, also in empty rows
    return weights @ values


def _blocks_sdpa(q: Tensor, keys: Tensor, values: Tensor) -> Tensor:
    """Unmasked blocked softmax attention through torch's fused kernel: (B, H, N, b, d) queries,
    (B, H, N, S, d) keys/values -> (B, H, N, b, d); softmax(q kᵀ/√d) v per block, as ``block_softmax``
    with every key valid (the same math; fused, so rounding differs at the last bits)."""
    b, h, n, t, d = q.shape
    flat = lambda x: x.reshape(b * h, n, x.shape[-2], d)  # noqa: E731  4-D: the fused (flash) CPU kernel
    return F.scaled_dot_product_attention(flat(q), flat(keys), flat(values)).view(b, h, n, t, d)


def sorted_block_attention(
    q: Tensor, k: Tensor, v: Tensor, perm: Tensor, valid: Tensor | None, block: int, combine: str = "joint"
) -> Tensor:
    """Each query block attends to its sorted block and itself: "joint" = one softmax over the
    2b keys [K̃_j; K_j] (lucidrains), "sum" = softmax over K_j plus softmax over K̃_j, each
    normalised on its own (the authors' LRA code: ``x = x + sorted_x``).

    q, k, v: (B, H, L, d) with padded rows zeroed, L = N_B·b; perm: (B, H, N_B, N_B), perm[i, j]
    = weight of key block i in slot j; valid: (B, L) bool, None = every position real -> (B, H, L, d)
    in q's dtype. With every position real and every slot holding some weight (then no key is
    masked) the two softmaxes run unmasked through ``F.scaled_dot_product_attention``."""
    b, h, length, d = q.shape
    n = length // block
    qb, kb, vb = (x.view(b, h, n, block, d) for x in (q, k, v))  # (B, H, N, b, d)
    k_sorted = torch.einsum("bhij,bhitd->bhjtd", perm, kb)  # (B, H, N, b, d)
    v_sorted = torch.einsum("bhij,bhitd->bhjtd", perm, vb)
    # all real: slot j's sorted keys are valid iff Σ_i P_ij > 0 (a sum of nonnegative weights)
    if valid is None and bool((perm > 0).any(-2).all()):
        if combine == "sum":
            out = _blocks_sdpa(qb, kb, vb) + _blocks_sdpa(qb, k_sorted, v_sorted)
        else:
            out = _blocks_sdpa(qb, torch.cat([k_sorted, kb], dim=3), torch.cat([v_sorted, vb], dim=3))
        return out.reshape(b, h, length, d)
    if valid is None:
        valid = torch.ones(b, length, dtype=torch.bool, device=q.device)
    vmask = valid.view(b, 1, n, block).to(perm.dtype).expand(b, h, n, block)
    sorted_valid = torch.einsum("bhij,bhit->bhjt", perm, vmask) > 0  # some real key mixed in
    if combine == "sum":
        out = block_softmax(qb, kb, vb, vmask > 0) + block_softmax(qb, k_sorted, v_sorted, sorted_valid)
    else:
        keys = torch.cat([k_sorted, kb], dim=3)  # (B, H, N, 2b, d)
        values = torch.cat([v_sorted, vb], dim=3)
        out = block_softmax(qb, keys, values, torch.cat([sorted_valid, vmask > 0], dim=3))
    return out.reshape(b, h, length, d)


# The authors' settings per scale=lra protocol (sources: the module docstring, deviation 7).
PROTOCOLS = {
    "lra": {
        # sinkhorn_transformer.py block_size=50; sinkhorn_attention.py sort_activation='softmax' (no noise);
        # its sinkhorn_operator, if selected, n_iters=1, temp=1.0, clip=1.0; x = x + sorted_x ("sum")
        "*": {
            "block_size": 50,
            "sort": "softmax",
            "gumbel_noise": False,
            "sinkhorn_iters": 1,
            "temperature": 1.0,
            "clip": 1.0,
            "combine": "sum",
        },
        "image": {"block_size": 64},  # image/configs/cifar10/sinkhorn_base.py config.model.block_size = 64
        "pathfinder": {"block_size": 64},  # image/configs/pathfinder32/sinkhorn_base.py
    },
}


@register_mechanism("sinkhorn", SinkhornConfig, key_padding=True, family="routing", protocols=PROTOCOLS)
class SinkhornAttention(Attention):
    """Sparse Sinkhorn attention (Tay et al. 2020): learned block sorting + local blocks."""

    def __init__(self, cfg: SinkhornConfig, *, heads: int, dim_head: int, max_len: int):
        super().__init__(cfg, heads=heads, dim_head=dim_head, max_len=max_len)
        if cfg.block_size < 1 or cfg.sinkhorn_iters < 0 or cfg.temperature <= 0:
            raise ValueError(f"sinkhorn needs block_size >= 1, sinkhorn_iters >= 0 and temperature > 0, got {cfg}")
        if cfg.combine not in COMBINES:
            raise ValueError(f"sinkhorn.combine='{cfg.combine}'; valid: {', '.join(COMBINES)}")
        if cfg.sort not in SORTS or cfg.clip < 0:
            raise ValueError(f"sinkhorn.sort='{cfg.sort}' (valid: {', '.join(SORTS)}) and clip={cfg.clip} (>= 0)")
        self.max_blocks = math.ceil(max_len / cfg.block_size)
        self.sort_net = nn.Linear(dim_head, self.max_blocks)  # key-block sum -> score of each target slot
        self._perm: Tensor | None = None

    def sort_matrix(self, k: Tensor, n_blocks: int, block: int, real_blocks: Tensor | None = None) -> Tensor:
        """k: (B, H, L, d) with padded rows zeroed, real_blocks (B,) blocks holding a real token
        (None: all) -> P: (B, H, N, N), float32+: doubly stochastic (``sort="sinkhorn"``, no clip) or
        row-stochastic (``sort="softmax"``); the identity on the all-padding blocks, which are kept
        out of the real blocks' sort."""
        b, h, length, d = k.shape
        summary = k.view(b, h, n_blocks, block, d).sum(3)  # (B, H, N, d)
        weight, bias = self.sort_net.weight[:n_blocks].to(k.dtype), self.sort_net.bias[:n_blocks].to(k.dtype)
        scores = summary @ weight.T + bias  # (B, H, N, N): row i = key block i, column j = slot j
        if self.training and self.cfg.gumbel_noise:
            scores = scores + gumbel_like(scores)
        scores = scores / self.cfg.temperature
        allowed = None
        if real_blocks is not None:
            scores = restrict_to_real_blocks(scores, real_blocks)
            allowed = real_block_pairs(real_blocks, n_blocks)[:, None]
        if self.cfg.sort == "softmax":  # LRA's default sort_activation: softmax over the slots, no clipping
            return scores.softmax(-1)
        return sinkhorn(scores, self.cfg.sinkhorn_iters, clip=self.cfg.clip, allowed=allowed)

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
        b, h, length, d = q.shape
        in_dtype = q.dtype
        block = min(self.cfg.block_size, length)
        n_blocks = -(-length // block)
        if n_blocks > self.max_blocks:
            raise ValueError(
                f"sinkhorn: length {length} needs {n_blocks} blocks of {block}, but the sort net was built "
                f"for max_len={self.max_len} ({self.max_blocks} blocks); build it with a larger max_len"
            )
        padded = n_blocks * block
        dtype = torch.promote_types(q.dtype, torch.float32)
        with torch.autocast(q.device.type, enabled=False):
            if key_padding_mask is None and padded == length:  # every position real: nothing to zero or mask
                q, k, v = (x.to(dtype) for x in (q, k, v))
                perm = self.sort_matrix(k, n_blocks, block, None)
                out = sorted_block_attention(q, k, v, perm, None, block, self.cfg.combine)
            else:
                valid = (
                    torch.ones(b, length, dtype=torch.bool, device=q.device)
                    if key_padding_mask is None
                    else ~key_padding_mask.bool()
                )
                valid = F.pad(valid, (0, padded - length), value=False)
                q, k, v = (
                    F.pad(x.to(dtype), (0, 0, 0, padded - length)).masked_fill(~valid[:, None, :, None], 0.0)
                    for x in (q, k, v)
                )
                # blocks up to each example's last real token take part in its sort; the all-padding
                # ones after it do not, so the amount of padding does not change the sort
                last = torch.where(valid, torch.arange(padded, device=q.device), -1).amax(-1)  # (B,)
                real_blocks = None if key_padding_mask is None else (last // block + 1).clamp_min(1)
                perm = self.sort_matrix(k, n_blocks, block, real_blocks)
                out = sorted_block_attention(q, k, v, perm, valid, block, self.cfg.combine)
        self._perm = perm.detach()
        return out[:, :, :length].to(in_dtype)

    def metrics(self) -> dict[str, float]:
        """sort_sharpness: mean over slots of the largest weight (1 = hard permutation, 1/N_B = uniform)."""
        return {} if self._perm is None else {"sort_sharpness": float(self._perm.amax(-2).mean())}
