"""Reformer's LSH attention (Kitaev, Kaiser & Levskaya 2020, "Reformer: The Efficient
Transformer", ICLR 2020, arXiv:2001.04451; authors' code google/trax
``trax/layers/research/efficient_attention.py``, and lucidrains' reformer-pytorch
``LSHAttention``, which follows it step by step and is our peer ``reformer_peer``).

Shared-QK attention: the keys are the unit-normalised queries, k̂_j = q_j/‖q_j‖, and a token
never attends to itself unless it has nothing else to attend to (its logit is set to −5·10⁴).
Angular LSH with random rotations R_r (d × n_b/2, Gaussian, drawn anew at every call):

    h_r(x) = argmax([x R_r ; −x R_r])          (one bucket id in 0 … n_b − 1 per round r)

For each of ``n_hashes`` rounds the positions are sorted by (bucket, position), the sorted
sequence is cut into chunks of c = ``bucket_size`` tokens, and each chunk attends to itself
and to the previous chunk (cyclically, over the rounds' chunks laid end to end, as the
authors' code):

    o_r,i = Σ_{j ∈ window_r(i)} softmax_j(q_i · k̂_j / √d) v_j,     ℓ_r,i = logsumexp_j(q_i · k̂_j / √d)
    out_i = Σ_r softmax_r(ℓ_r,i) o_r,i                                 (rounds combined by their mass)

Cost O(n_hashes · L · 2c · d) time and memory, no (L, L) tensor.

Causal: the original positions travel through the sort, and query i attends to the keys of
**its own bucket** that precede it by at most c − 1 places in the sorted order (its c most
recent same-bucket tokens, itself included, all inside its chunk and the one before). The
reference instead masks j > i inside the hash-sorted chunks; but where a chunk boundary falls
depends on how many *later* tokens hashed into lower buckets, so a future token changes which
past keys an earlier query sees (measured: changing tokens 20… of 40 changed outputs before 20
in 20 of 20 random draws). Our window depends on tokens ≤ i only, so it is strictly causal.

Under the harness contract the backbone passes separate q and k; shared-QK uses q for both
and **ignores k** (``ignored_inputs``; the backbone's Wk then gets no gradient).

Lengths and padding: L is padded internally to a multiple of c (c = min(bucket_size, L));
n_b defaults to the number of chunks rounded up to even (≥ 2), as the reference's
n_b = L / bucket_size. Padded and internal padding positions are put in an extra bucket n_b
that sorts after every real one, so they never move a real token's place in the sorted
order, and are masked as keys: padded values change nothing (tested), a query with no
allowed key in any round returns 0. ``n_buckets = 1`` disables hashing (one bucket): with
``bucket_size ≥ L`` this is exactly shared-QK softmax attention minus the self-mask rule
(tested against the float64 oracle).

Deviations from the authors' code: (1) padding via the extra bucket (reformer-pytorch hashes
padded tokens like real ones, so their values move real tokens between chunks); (2) any
length (the reference asserts L divisible by 2·bucket_size); (3) logits, softmax and the
round weights in at least float32 under autocast; (4) duplicate query–key pairs across rounds
are not de-duplicated (the reference's default ``allow_duplicate_attention=True``); no hash
dropout, no per-head rotations (the reference's defaults); (5) the causal window (above).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor

from harness.attention import Attention, AttentionContext
from harness.registry import register_mechanism

SELF_LOGIT = -5e4  # the reference's TOKEN_SELF_ATTN_VALUE: self only when nothing else is allowed


@dataclass
class ReformerConfig:
    bucket_size: int = 64  # chunk length c: each query sees 2c keys per round (cost O(n_hashes·L·2c·d))
    n_hashes: int = 4  # hashing rounds: more rounds = fewer missed neighbours, proportionally more cost
    n_buckets: int = 0  # buckets per round; 0 = number of chunks rounded up to even (reference); 1 = no hashing


def num_buckets(cfg: ReformerConfig, padded_length: int, chunk: int) -> int:
    if cfg.n_buckets > 0:
        return cfg.n_buckets
    chunks = padded_length // chunk
    return max(2, chunks + chunks % 2)


def hash_buckets(x: Tensor, rotations: Tensor | None) -> Tensor:
    """Angular LSH. x: (B, H, L, d), rotations: (1, d, R, n_b/2) -> (B, H, R, L) ids in 0 … n_b−1
    (all 0 when rotations is None: one bucket)."""
    if rotations is None:
        return x.new_zeros(x.shape[0], x.shape[1], 1, x.shape[2], dtype=torch.long)
    rotated = torch.einsum("bhld,drk->bhrlk", x, rotations[0].to(x.dtype))  # (B, H, R, L, n_b/2)
    return torch.cat([rotated, -rotated], dim=-1).argmax(-1)


def lsh_attention(
    q: Tensor,
    v: Tensor,
    *,
    rotations: Tensor | None,
    n_hashes: int,
    n_buckets: int,
    chunk: int,
    key_padding_mask: Tensor | None = None,
    causal: bool = False,
) -> Tensor:
    """Shared-QK LSH attention. q, v: (B, H, L, d), L a multiple of chunk; rotations:
    (1, d, n_hashes, n_buckets/2) or None (n_buckets = 1) -> (B, H, L, d) in at least float32."""
    b, h, length, d = q.shape
    dtype = torch.promote_types(q.dtype, torch.float32)
    q, v = q.to(dtype), v.to(dtype)
    valid = None if key_padding_mask is None else ~key_padding_mask  # (B, L) or None: nothing padded
    buckets = hash_buckets(q, rotations).expand(b, h, n_hashes, length)  # (B, H, R, L)
    if valid is not None:
        buckets = buckets.masked_fill(~valid[:, None, None, :], n_buckets)  # padding: an extra, last bucket
    pos = torch.arange(length, device=q.device)
    sorted_key, order = (buckets * length + pos).sort(-1)  # (B, H, R, L) positions in sorted order
    flat = order.reshape(b, h, n_hashes * length)  # rounds end to end
    n_chunks = n_hashes * length // chunk
    rounds = torch.arange(n_hashes, device=q.device)[:, None]
    q_bucket = (sorted_key // length + rounds * (n_buckets + 1)).view(b, h, n_chunks, chunk)  # unique per round
    q_place = torch.arange(n_hashes * length, device=q.device).view(n_chunks, chunk)  # place on the sorted axis
    gather = lambda x: x.gather(2, flat[..., None].expand(-1, -1, -1, d)).view(b, h, n_chunks, chunk, d)  # noqa: E731
    sq, sv = gather(q), gather(v)  # (B, H, n, c, d)
    sk = F.normalize(sq, dim=-1)  # shared QK: keys are the unit queries
    q_pos = flat.view(b, h, n_chunks, chunk)  # (B, H, n, c)

    def look_one_back(x: Tensor) -> Tensor:  # (B, H, n, c, …) -> (B, H, n, 2c, …): own chunk + previous
        return x if n_chunks == 1 else torch.cat([x, x.roll(1, dims=2)], dim=3)

    sk, sv, k_pos = look_one_back(sk), look_one_back(sv), look_one_back(q_pos)
    dots = torch.einsum("bhnid,bhnjd->bhnij", sq * d**-0.5, sk)  # (B, H, n, c, 2c)
    allowed = None  # (B, H, n, c, 2c) bool, None = every key in the window
    if valid is not None:
        k_valid = look_one_back(valid.gather(1, flat.reshape(b, -1)).view(b, h, n_chunks, chunk))
        allowed = k_valid[..., None, :]
    if causal:  # same bucket, at most c places back on the sorted axis: only earlier tokens decide
        k_bucket, k_place = look_one_back(q_bucket), look_one_back(q_place[None, None])
        back = q_place[None, None, :, :, None] - k_place[..., None, :]  # (1, 1, n, c, 2c)
        same = (k_bucket[..., None, :] == q_bucket[..., :, None]) & (back >= 0) & (back < chunk)
        allowed = same if allowed is None else allowed & same
    dots = dots.masked_fill(q_pos[..., :, None] == k_pos[..., None, :], SELF_LOGIT)
    if allowed is not None:  # finite fill: exp(min − lse) is exactly 0 in any row with an allowed key
        dots = dots.masked_fill(~allowed, torch.finfo(dtype).min)
    lse = dots.logsumexp(-1, keepdim=True)  # (B, H, n, c, 1)
    out = torch.exp(dots - lse) @ sv  # (B, H, n, c, d)
    if allowed is not None:  # a row with no allowed key (uniform over masked ones) is zeroed
        out = out * allowed.any(-1, keepdim=True)
    # unsort: scatter each round's sorted rows back to their positions
    index = (flat.view(b, h, n_hashes, length) + length * torch.arange(n_hashes, device=q.device)[:, None])
    index = index.view(b, h, n_hashes * length)
    out = out.new_zeros(b, h, n_hashes * length, d).scatter(2, index[..., None].expand(-1, -1, -1, d), out.view(b, h, -1, d))
    lse = lse.new_zeros(b, h, n_hashes * length).scatter(2, index, lse.view(b, h, -1))
    out, lse = out.view(b, h, n_hashes, length, d), lse.view(b, h, n_hashes, length)
    round_weights = torch.softmax(lse, dim=2)  # (B, H, R, L): rounds combined by their mass
    return (out * round_weights[..., None]).sum(2)


def lsh_attention_reference(
    q: Tensor, v: Tensor, *, rotations: Tensor | None, n_hashes: int, n_buckets: int, chunk: int,
    key_padding_mask: Tensor | None = None, causal: bool = False,
) -> Tensor:
    """The same attention written densely in float64 (O(R²·L²), for tests): every query i of
    round r scores every token copy (j, r'); the copy is in i's window when its chunk on the
    rounds-end-to-end sorted axis is i's chunk or the one before it (cyclically) — causal:
    when it has i's bucket in i's round and lies 0 … c−1 places before i on that axis."""
    b, h, length, d = q.shape
    q, v = q.double(), v.double()
    valid = torch.ones(b, length, dtype=torch.bool) if key_padding_mask is None else ~key_padding_mask
    buckets = hash_buckets(q.float(), rotations).expand(b, h, n_hashes, length)
    buckets = buckets.masked_fill(~valid[:, None, None, :], n_buckets)
    rank = (buckets * length + torch.arange(length)).argsort(-1).argsort(-1)  # (B, H, R, L) sorted place of i
    n_chunks = n_hashes * length // chunk
    chunk_of = (rank + length * torch.arange(n_hashes)[:, None]) // chunk  # (B, H, R, L) chunk on the flat axis
    chunk_of = chunk_of.reshape(b, h, n_hashes * length)  # copies (r, j) flattened
    qi, kj = chunk_of[..., :, None], chunk_of[..., None, :]  # queries (r, i) × keys (r', j)
    window = (kj == qi) | ((kj == (qi - 1) % n_chunks) & (n_chunks > 1))
    scores = (q @ F.normalize(q, dim=-1).transpose(-1, -2)) * d**-0.5  # (B, H, L, L)
    scores = scores.masked_fill(torch.eye(length, dtype=torch.bool), SELF_LOGIT).repeat(1, 1, n_hashes, n_hashes)
    allowed = window & valid.repeat(1, n_hashes)[:, None, None, :]
    if causal:  # same bucket of the same round, 0 … c−1 places back on the sorted axis
        place = (rank + length * torch.arange(n_hashes)[:, None]).reshape(b, h, n_hashes * length)
        bucket_id = (buckets + (n_buckets + 1) * torch.arange(n_hashes)[:, None]).reshape(b, h, n_hashes * length)
        back = place[..., :, None] - place[..., None, :]
        allowed = allowed & (bucket_id[..., :, None] == bucket_id[..., None, :]) & (back >= 0) & (back < chunk)
    scores = scores.masked_fill(~allowed, float("-inf"))
    lse = scores.logsumexp(-1)  # (B, H, R·L)
    weights = torch.nan_to_num(torch.exp(scores - lse[..., None]))
    out = (weights @ v.repeat(1, 1, n_hashes, 1)).view(b, h, n_hashes, length, d)
    lse = lse.view(b, h, n_hashes, length)
    any_allowed = allowed.any(-1).view(b, h, n_hashes, length)
    round_weights = torch.nan_to_num(torch.softmax(lse.masked_fill(~any_allowed, float("-inf")), dim=2))
    return (out * round_weights[..., None]).sum(2)


@register_mechanism("reformer", ReformerConfig, causal=True, key_padding=True)
class Reformer(Attention):
    """Reformer LSH attention (Kitaev et al. 2020): shared QK, hashed chunks, n_hashes rounds."""

    ignored_inputs: ClassVar[tuple[str, ...]] = ("k",)

    def __init__(self, cfg: ReformerConfig, *, heads: int, dim_head: int, max_len: int):
        super().__init__(cfg, heads=heads, dim_head=dim_head, max_len=max_len)
        if cfg.bucket_size < 1 or cfg.n_hashes < 1 or cfg.n_buckets < 0 or (cfg.n_buckets > 1 and cfg.n_buckets % 2):
            raise ValueError(
                f"reformer needs bucket_size >= 1, n_hashes >= 1 and n_buckets 0 (derived), 1 (no hashing) "
                f"or even, got {cfg}"
            )
        self._buckets = 0

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
        chunk = min(self.cfg.bucket_size, length)
        padded = -(-length // chunk) * chunk
        n_buckets = num_buckets(self.cfg, padded, chunk)
        # Random rotations drawn anew at every call, as the reference (shape as reformer-pytorch's).
        rotations = None if n_buckets == 1 else torch.randn(1, d, self.cfg.n_hashes, n_buckets // 2, device=q.device)
        kpm = None if key_padding_mask is None else key_padding_mask.bool()
        if padded > length:
            q, v = (F.pad(x, (0, 0, 0, padded - length)) for x in (q, v))
            kpm = torch.zeros(b, length, dtype=torch.bool, device=q.device) if kpm is None else kpm
            kpm = F.pad(kpm, (0, padded - length), value=True)
        with torch.autocast(q.device.type, enabled=False):
            out = lsh_attention(
                q, v, rotations=rotations, n_hashes=self.cfg.n_hashes, n_buckets=n_buckets, chunk=chunk,
                key_padding_mask=kpm, causal=causal,
            )
        self._buckets = n_buckets
        return out[:, :, :length].to(v.dtype)

    def metrics(self) -> dict[str, float]:
        return {"buckets": float(self._buckets)}
