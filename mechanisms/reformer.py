"""Reformer's LSH attention (Kitaev, Kaiser & Levskaya 2020, "Reformer: The Efficient
Transformer", ICLR 2020, arXiv:2001.04451; authors' code google/trax
``trax/layers/research/efficient_attention.py``, and lucidrains' reformer-pytorch
``LSHAttention``, which follows it step by step and is our peer ``reformer_peer``).

Shared-QK attention: the keys are the unit-normalised queries, k̂_j = q_j/‖q_j‖, and a token
never attends to itself unless it has nothing else to attend to (its logit is set to −5·10⁴).
Angular LSH with random rotations R_r (d × n_b/2, Gaussian; see "Random draws" below):

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
allowed key in any round returns 0 (a padded query too).

Padding amount: everything is per example, from its real length ℓ. Its bucket count is its
own (⌈ℓ/bucket_size⌉ rounded up to even, ≥ 2) and so are its rotations: exactly the
``randn(1, d, n_hashes, n_b/2)`` it would draw alone (one draw per distinct count in the
batch, each from the same generator state); round r of its sorted tokens takes the slots r·P …
r·P + ℓ − 1 of the rounds-end-to-end axis, P = ⌈ℓ/c⌉·c, and its first chunk looks back at
its own last one. So an example alone and the same example padded in a batch give the same
outputs on their real tokens (tested in float64 to 1e-10 in
``tests/mechanisms/test_padding_invariance.py``). A short example (ℓ ≤ bucket_size) is one
chunk per round either way. ``n_buckets = 1`` disables hashing (one bucket): with
``bucket_size ≥ L`` this is exactly shared-QK softmax attention minus the self-mask rule
(tested against the float64 oracle).

Random draws: the rotations come from a generator seeded by (the layer's ``seed``, the
training step ``context.step``), drawn on the CPU: new rotations every training step (the
reference draws anew at every call), the same for every forward pass of one step (two
towers, accumulation, evaluation at that step) and for every row of the batch, whatever the
other rows, the padding or torch's global random state (tested registry-wide in
``tests/test_batch_rows.py``: an example alone equals itself at rows 0, 1, 2 of a batch of 3).
``seed = -1`` (default): each instance (layer) draws its own seed from torch's RNG when built,
so the layers differ and a run is reproducible from its seed. ``redraw = False`` keeps one
draw (step 0) for good.

Protocol settings under ``scale=lra`` (``PROTOCOLS`` below): ``protocol=lra`` runs LRA's
``ReformerAttention`` defaults (google-research/long-range-arena
``lra_benchmarks/models/reformer/reformer_attention.py``: ``n_hashes=1``, ``n_buckets=10``,
``chunk_len=10``; ``ReformerBlock`` passes none of them and no config overrides them): its
``lsh_attention_single_head`` cuts the sorted sequence into ``n_hashes · n_buckets`` = 10
chunks, after padding the length L to L + 10 − (L mod 10) (10 more when L is a multiple of
10; the CLS token, where the encoder adds one, counts), so a chunk is ⌈(L + 1)/10⌉ tokens:
bucket_size 201 on ListOps (2000 tokens), 101 on Text (1000), 401 on Retrieval (4000 per
document, no CLS), 103 on Image and Pathfinder (1024); and its rotations come from
``jax.random.PRNGKey(0)`` at every call, in every layer: ``seed = 0``, ``redraw = False``.
``protocol=nystromformer`` and ``protocol=pytorch`` run ``reformer-2`` (mlpen/Nystromformer
``LRA/code/lra_config.py`` ``"reformer-2": {"num_hash": 2}``; pkuzengqi/Skyformer
``src/config.py`` ``"reformer": {"num_hash": 2}``), i.e. HuggingFace's ``LSHSelfAttention``
with ``ReformerConfig`` defaults (``LRA/code/attention_reformer.py``,
``src/models/attention_reformer.py``): chunk length 64 (our ``bucket_size`` default), one
chunk looked back, 2 hashes.

Deviations from the authors' code: (1) padding via the extra bucket (reformer-pytorch hashes
padded tokens like real ones, so their values move real tokens between chunks); (2) any
length (the reference asserts L divisible by 2·bucket_size); (3) logits, softmax and the
round weights in at least float32 under autocast; (4) duplicate query–key pairs across rounds
are not de-duplicated (the reference's default ``allow_duplicate_attention=True``); no hash
dropout, no per-head rotations (the reference's defaults); (5) the causal window (above);
(6) per-example bucket counts and round layout (above): the reference derives n_b and the
chunk boundaries from the padded length, so padding changes every example's hashing;
(7) random draws per (layer seed, training step) (above), not per call. LRA's own code
(``reformer_attention.py``) further differs and is not reproduced: its logits are multiplied
by √d instead of divided (``* (qdim ** 0.5)``), its keys are the raw queries
(``length_norm=False``), a token may attend to itself, and there is no padding mask; HF's
``LSHSelfAttention`` (the PyTorch protocols) uses a power-of-two bucket count (ours: the chunk
count rounded up to even).

Implementation (speed only, the same function): the hash ids, argmax([xR; −xR]), come from the
maximum and minimum of xR (ties as the argmax of the concatenation), computed without gradient a
slab of rows at a time, so the (B, H, R, L, n_b) rotations are never stored; one sort, unsorted by
scatter; the chunk attention is one autograd function (``_ChunkSoftmax``): logits filled in
place, torch's fused softmax, the logsumexp read off the softmax at each row's maximum, and a
hand-written backward (the logsumexp's gradient included), instead of masked_fill, logsumexp
and exp(dots − lse) through autograd; without padding and not causal the self logits are set on
the chunk diagonals and in the round-boundary chunks only (the only places a token meets itself).
Rounding differs from the step-by-step form at the last bits (gradients tested against the
dense float64 formula).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable

from harness.core import Attention, AttentionContext, draw_seed, instance_seed, register_mechanism

SELF_LOGIT = -5e4  # the reference's TOKEN_SELF_ATTN_VALUE: self only when nothing else is allowed


@dataclass
class ReformerConfig:
    bucket_size: int = 64  # chunk length c: each query sees 2c keys per round (cost O(n_hashes·L·2c·d))
    n_hashes: int = 4  # hashing rounds: more rounds = fewer missed neighbours, proportionally more cost
    n_buckets: int = 0  # buckets per round; 0 = number of chunks rounded up to even (reference); 1 = no hashing
    seed: int = -1  # rotation seed; -1 = each instance (layer) draws its own from torch's RNG when built
    redraw: bool = True  # new rotations every training step (context.step); False: one draw for good (LRA)


def num_buckets(cfg: ReformerConfig, padded_length: int, chunk: int) -> int:
    if cfg.n_buckets > 0:
        return cfg.n_buckets
    chunks = padded_length // chunk
    return max(2, chunks + chunks % 2)


def draw_rotations(d: int, n_hashes: int, example_buckets: Tensor, device, seed: int) -> tuple[Tensor, Tensor | None]:
    """Random rotations for the examples' bucket counts (B,): each example gets exactly the
    ``torch.randn(1, d, n_hashes, n_b/2)`` it would draw alone from a generator seeded ``seed``
    (``harness.core.attention.draw_seed``), one draw per distinct count, on the CPU. One count in the
    batch: (1, d, R, n_b/2) and None; several: (B, d, R, max/2) (zeros beyond an example's
    columns) and the per-example counts for ``hash_buckets``."""
    counts = sorted(set(example_buckets.tolist()))

    def draw(count: int) -> Tensor:
        return torch.randn(1, d, n_hashes, count // 2, generator=torch.Generator().manual_seed(seed)).to(device)

    if len(counts) == 1:
        return draw(counts[0]), None
    rotations = torch.zeros(example_buckets.shape[0], d, n_hashes, counts[-1] // 2, device=device)
    for count in counts:
        rotations[example_buckets == count, :, :, : count // 2] = draw(count)
    return rotations, example_buckets


def example_num_buckets(real: Tensor, bucket_size: int) -> Tensor:
    """(B,) real lengths -> (B,) derived n_b of each example alone: its chunks, rounded up to even, ≥ 2."""
    chunks = (-(-real // bucket_size)).clamp_min(1)
    return (chunks + chunks % 2).clamp_min(2)


def _signed_argmax(rotated: Tensor) -> Tensor:
    """argmax over the last axis of [r, −r] without building it: the first maximum of r if it is
    ≥ −min(r), else n/2 + the first minimum of r (ties resolve as the argmax of the concatenation)."""
    high, at_high = rotated.max(-1)
    low, at_low = rotated.min(-1)
    return torch.where(high >= -low, at_high, at_low + rotated.shape[-1])


def hash_buckets(x: Tensor, rotations: Tensor | None, example_buckets: Tensor | None = None) -> Tensor:
    """Angular LSH. x: (B, H, L, d), rotations: (1 or B, d, R, n/2) -> (B, H, R, L) ids in
    0 … n_b−1 (all 0 when rotations is None: one bucket). example_buckets (B,) even, ≤ n:
    example b hashes with the first n_b/2 rotation columns only, n_b = example_buckets[b]
    (None: all n)."""
    if rotations is None:
        return x.new_zeros(x.shape[0], x.shape[1], 1, x.shape[2], dtype=torch.long)
    x = x.detach()  # ids only: no gradient flows through the hash
    if example_buckets is None and rotations.shape[0] == 1:
        # (x R) a slab of rows at a time on the CPU (a few MB, so it is reduced while in cache,
        # never stored whole); in one piece on an accelerator
        b, h, length, d = x.shape
        rounds, half = rotations.shape[2], rotations.shape[3]
        rot = rotations[0].reshape(d, rounds * half).to(x.dtype)
        rows = max(1, (1 << 19) // (rounds * half)) if x.device.type == "cpu" else max(1, b * h * length)
        ids = torch.cat([_signed_argmax((slab @ rot).view(-1, rounds, half)) for slab in x.reshape(-1, d).split(rows)])
        return ids.view(b, h, length, rounds).transpose(-1, -2)  # (B, H, R, L)
    if rotations.shape[0] == 1:
        rotated = torch.einsum("bhld,drk->bhrlk", x, rotations[0].to(x.dtype))  # (B, H, R, L, n/2)
    else:
        rotated = torch.einsum("bhld,bdrk->bhrlk", x, rotations.to(x.dtype))
    if example_buckets is None:
        return _signed_argmax(rotated)
    half = rotated.shape[-1]
    used = (example_buckets // 2)[:, None, None, None]  # (B, 1, 1, 1) columns example b uses
    unused = torch.arange(half, device=x.device) >= used[..., None]  # (B, 1, 1, 1, n/2)
    both = torch.cat([rotated.masked_fill(unused, -torch.inf), (-rotated).masked_fill(unused, -torch.inf)], dim=-1)
    ids = both.argmax(-1)  # (B, H, R, L) in [0, n/2) ∪ [n/2, n/2 + n_b/2)
    return torch.where(ids < half, ids, ids - half + used)


def round_slots(valid: Tensor, chunk: int) -> Tensor:
    """(B, L) bool -> (B,) slots one round takes on the sorted axis: the example's real length
    rounded up to whole chunks, ⌈ℓ/c⌉·c (at least one chunk)."""
    return (-(-valid.sum(-1) // chunk)).clamp_min(1) * chunk


class _ChunkSoftmax(torch.autograd.Function):
    """Chunked attention that also returns every row's logsumexp, forward and backward in few
    passes over the (…, c, 2c) logits: dots = q kᵀ (q already scaled), the masked logits filled
    in place (``fill``), p = softmax(dots) (torch's fused kernel), lse = max + log Σ exp(dots − max)
    read off p at the row's maximum (p there is 1/Σ), out = p v. Backward: ∂dots = p ⊙ (∂p −
    ⟨p, ∂p⟩) + ∂lse·p, 0 at the filled logits (as ``masked_fill``'s backward). The same math as
    ``masked_fill``, ``logsumexp`` and ``exp(dots − lse)`` written out; rounding differs at the
    last bits.

    ``fill(t, self_value, blocked_value)`` writes the two fills into t (B, H, n, c, 2c) in place."""

    @staticmethod
    def forward(ctx, q, k, v, fill):
        dots = torch.matmul(q, k.transpose(-1, -2))  # (B, H, n, c, 2c)
        fill(dots, SELF_LOGIT, torch.finfo(dots.dtype).min)
        high = dots.amax(-1, keepdim=True)
        p = torch.softmax(dots, -1)
        del dots
        lse = high - p.amax(-1, keepdim=True).log()  # (B, H, n, c, 1): p at the maximum is exp(0)/Σ
        ctx.save_for_backward(q, k, v, p)
        ctx.fill = fill
        return p @ v, lse

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out, grad_lse):
        q, k, v, p = ctx.saved_tensors
        if grad_out is not None:
            grad_dots = torch._softmax_backward_data(grad_out @ v.transpose(-1, -2), p, -1, p.dtype)
        else:
            grad_dots = torch.zeros_like(p)
        if grad_lse is not None:
            grad_dots.addcmul_(p, grad_lse)
        ctx.fill(grad_dots, 0.0, 0.0)
        grad_q = grad_dots @ k if ctx.needs_input_grad[0] else None
        grad_k = grad_dots.transpose(-1, -2) @ q if ctx.needs_input_grad[1] else None
        grad_v = None
        if ctx.needs_input_grad[2] and grad_out is not None:
            grad_v = p.transpose(-1, -2) @ grad_out
        return grad_q, grad_k, grad_v, None


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
    example_buckets: Tensor | None = None,
) -> Tensor:
    """Shared-QK LSH attention. q, v: (B, H, L, d), L a multiple of chunk; rotations:
    (1, d, n_hashes, n_buckets/2) or None (n_buckets = 1); example_buckets: (B,) per-example
    bucket counts ≤ n_buckets (None: n_buckets for all) -> (B, H, L, d) in at least float32,
    0 at padded positions.

    Layout per example: round r's ℓ real tokens, sorted by (bucket, position), take the slots
    r·P … r·P + ℓ − 1 of the sorted axis, P = ⌈ℓ/c⌉·c; the slots after R·P are empty; chunk n
    looks back at chunk n − 1 modulo the example's own R·P/c chunks. So nothing in it depends
    on the padded length."""
    b, h, length, d = q.shape
    dtype = torch.promote_types(q.dtype, torch.float32)
    q, v = q.to(dtype), v.to(dtype)
    device = q.device
    valid = torch.ones(b, length, dtype=torch.bool, device=device) if key_padding_mask is None else ~key_padding_mask
    real = valid.sum(-1)  # (B,)
    per_round = round_slots(valid, chunk)  # (B,) P
    total = n_hashes * length  # slots of the sorted axis (R·P ≤ R·L)
    n_chunks = total // chunk
    rounds = torch.arange(n_hashes, device=device)
    buckets = hash_buckets(q, rotations, example_buckets).expand(b, h, n_hashes, length)  # (B, H, R, L)
    buckets = buckets.masked_fill(~valid[:, None, None, :], n_buckets)  # padding sorts after every real token
    sorted_key, order = (buckets * length + torch.arange(length, device=device)).sort(-1)  # (B, H, R, L)
    bucket_id = sorted_key // length + rounds[:, None] * (n_buckets + 1)  # unique per round
    if key_padding_mask is None:  # every slot real, P = L: the rounds' sorted orders end to end
        flat, slot_bucket, slot_valid = order.reshape(b, h, total), bucket_id.reshape(b, h, total), None
    else:
        rank = torch.arange(length, device=device)
        slot = rounds[:, None] * per_round[:, None, None] + rank  # (B, R, L) slot of the rank-th token of round r
        slot = torch.where(rank < real[:, None, None], slot, total).view(b, 1, -1).expand(b, h, -1)  # total = dump
        flat = order.new_zeros(b, h, total + 1).scatter_(2, slot, order.view(b, h, -1))[..., :total]  # token per slot
        slot_bucket = order.new_full((b, h, total + 1), -1).scatter_(2, slot, bucket_id.view(b, h, -1))[..., :total]
        slot_valid = valid.new_zeros(b, total + 1).scatter_(1, slot[:, 0], True)[:, :total]  # (B, total)

    chunk_id = torch.arange(n_chunks, device=device)
    own_chunks = n_hashes * per_round // chunk  # (B,) chunks this example uses
    prev = torch.remainder(chunk_id - 1, own_chunks[:, None])  # (B, n): cyclic over its own chunks
    back_ok = prev != chunk_id  # one chunk in all: no second copy of it

    def look_one_back(x: Tensor) -> Tensor:  # (B, H, n, c, …) -> (B, H, n, 2c, …): own chunk + previous
        if slot_valid is None:  # all examples use all n chunks: a roll
            return x if n_chunks == 1 else torch.cat([x, x.roll(1, dims=2)], dim=3)
        index = prev.view(b, 1, n_chunks, *([1] * (x.dim() - 3))).expand(x.shape)
        return torch.cat([x, x.gather(2, index)], dim=3)

    gather = lambda x: x.gather(2, flat[..., None].expand(-1, -1, -1, d)).view(b, h, n_chunks, chunk, d)  # noqa: E731
    sq, sv = gather(q), gather(v)  # (B, H, n, c, d)
    sk = F.normalize(sq, dim=-1)  # shared QK: keys are the unit queries
    q_pos = flat.view(b, h, n_chunks, chunk)  # (B, H, n, c)
    sk, sv, k_pos = look_one_back(sk), look_one_back(sv), look_one_back(q_pos)
    allowed = None  # (B, H, n, 1|c, 2c) bool, None = every key in the window
    if slot_valid is not None:
        k_valid = look_one_back(slot_valid.view(b, 1, n_chunks, chunk).expand(b, h, -1, -1))  # (B, H, n, 2c)
        k_valid = (
            k_valid
            & torch.cat(
                [torch.ones_like(back_ok)[..., None].expand(-1, -1, chunk), back_ok[..., None].expand(-1, -1, chunk)],
                dim=-1,
            )[:, None]
        )
        allowed = k_valid[..., None, :]
    if causal:  # same bucket, at most c places back on the sorted axis: only earlier tokens decide
        q_bucket = slot_bucket.view(b, h, n_chunks, chunk)
        q_place = torch.arange(total, device=device).view(1, 1, n_chunks, chunk).expand(b, h, -1, -1)
        k_bucket, k_place = look_one_back(q_bucket), look_one_back(q_place)
        back = q_place[..., :, None] - k_place[..., None, :]  # (B, H, n, c, 2c)
        same = (k_bucket[..., None, :] == q_bucket[..., :, None]) & (back >= 0) & (back < chunk)
        allowed = same if allowed is None else allowed & same
    if slot_valid is None and not causal:
        # every slot real, rounds of L slots end to end: a token meets itself on the diagonal of its
        # own chunk, and in the previous chunk only where that is the last chunk of another round
        per_chunks = length // chunk
        first = q_pos.view(b, h, n_hashes, per_chunks, chunk)[:, :, :, 0]  # (B, H, R, c) rounds' first chunks
        back_self = None
        if n_hashes > 1:
            back_pos = k_pos.view(b, h, n_hashes, per_chunks, 2 * chunk)[:, :, :, 0, chunk:]
            back_self = first[..., :, None] == back_pos[..., None, :]  # (B, H, R, c, c)

        def fill(t: Tensor, self_value: float, blocked_value: float) -> None:
            t[..., :chunk].diagonal(dim1=-2, dim2=-1).fill_(self_value)
            if back_self is not None:
                t.view(b, h, n_hashes, per_chunks, chunk, 2 * chunk)[:, :, :, 0, :, chunk:].masked_fill_(
                    back_self, self_value
                )
    else:
        self_mask = q_pos[..., :, None] == k_pos[..., None, :]
        blocked = None if allowed is None else ~allowed

        def fill(t: Tensor, self_value: float, blocked_value: float) -> None:
            t.masked_fill_(self_mask, self_value)
            if blocked is not None:  # finite fill: exp(min − lse) is exactly 0 in any row with an allowed key
                t.masked_fill_(blocked, blocked_value)

    out, lse = _ChunkSoftmax.apply(sq * d**-0.5, sk, sv, fill)  # (B, H, n, c, d), (B, H, n, c, 1)
    if allowed is not None:  # a row with no allowed key is 0
        out = out * allowed.any(-1, keepdim=True)
    # unsort: each real slot back to (round, position); empty slots to a dump row
    slot_round = torch.arange(total, device=device) // per_round[:, None]  # (B, total)
    index = flat + (slot_round * length)[:, None]  # (B, H, total)
    if slot_valid is not None:
        index = torch.where(slot_valid[:, None], index, total)
    if slot_valid is None:  # a permutation of the slots: every row written, no dump row
        out = out.new_empty(b, h, total, d).scatter(2, index[..., None].expand(-1, -1, -1, d), out.view(b, h, -1, d))
        lse = lse.new_empty(b, h, total).scatter(2, index, lse.view(b, h, -1))
        out, lse = out.view(b, h, n_hashes, length, d), lse.view(b, h, n_hashes, length)
    else:
        out = out.new_zeros(b, h, total + 1, d).scatter(
            2, index[..., None].expand(-1, -1, -1, d), out.view(b, h, -1, d)
        )
        lse = lse.new_zeros(b, h, total + 1).scatter(2, index, lse.view(b, h, -1))
        out, lse = out[:, :, :total].view(b, h, n_hashes, length, d), lse[:, :, :total].view(b, h, n_hashes, length)
    round_weights = torch.softmax(lse, dim=2)  # (B, H, R, L): rounds combined by their mass
    return (out * round_weights[..., None]).sum(2)


def lsh_attention_reference(
    q: Tensor,
    v: Tensor,
    *,
    rotations: Tensor | None,
    n_hashes: int,
    n_buckets: int,
    chunk: int,
    key_padding_mask: Tensor | None = None,
    causal: bool = False,
    example_buckets: Tensor | None = None,
) -> Tensor:
    """The same attention written densely in float64 (O(R²·L²), for tests): every query i of
    round r scores every token copy (j, r'); the copy is in i's window when its chunk on the
    rounds-end-to-end sorted axis is i's chunk or the one before it (cyclically over the
    example's own R·P/c chunks, P = ⌈ℓ/c⌉·c slots a round) — causal: when it has i's bucket in
    i's round and lies 0 … c−1 places before i on that axis. Padded queries give 0."""
    b, h, length, d = q.shape
    q, v = q.double(), v.double()
    valid = torch.ones(b, length, dtype=torch.bool) if key_padding_mask is None else ~key_padding_mask
    buckets = hash_buckets(q.float(), rotations, example_buckets).expand(b, h, n_hashes, length)
    buckets = buckets.masked_fill(~valid[:, None, None, :], n_buckets)
    rank = (buckets * length + torch.arange(length)).argsort(-1).argsort(-1)  # (B, H, R, L) sorted place of i
    per_round = round_slots(valid, chunk)[:, None, None, None]  # (B, 1, 1, 1)
    place = (rank + per_round * torch.arange(n_hashes)[:, None]).reshape(b, h, n_hashes * length)
    own_chunks = (n_hashes * per_round // chunk).view(b, 1, 1, 1)
    chunk_of = place // chunk  # copies (r, j) flattened
    qi, kj = chunk_of[..., :, None], chunk_of[..., None, :]  # queries (r, i) × keys (r', j)
    window = (kj == qi) | ((kj == torch.remainder(qi - 1, own_chunks)) & (own_chunks > 1))
    scores = (q @ F.normalize(q, dim=-1).transpose(-1, -2)) * d**-0.5  # (B, H, L, L)
    scores = scores.masked_fill(torch.eye(length, dtype=torch.bool), SELF_LOGIT).repeat(1, 1, n_hashes, n_hashes)
    allowed = window & valid.repeat(1, n_hashes)[:, None, None, :]
    if causal:  # same bucket of the same round, 0 … c−1 places back on the sorted axis
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
    return (out * round_weights[..., None]).sum(2) * valid[:, None, :, None]


# The authors' settings per scale=lra protocol (sources: the module docstring). LRA: bucket_size is
# the length of one of its 10 chunks, (L + 10 - L mod 10) / 10 with the CLS token counted in L.
_LRA_CHUNKS = {"listops": 201, "text": 101, "retrieval": 401, "image": 103, "pathfinder": 103}
PROTOCOLS = {
    "lra": {
        "*": {"n_hashes": 1, "n_buckets": 10, "seed": 0, "redraw": False},  # reformer_attention.py defaults
        **{task: {"bucket_size": size} for task, size in _LRA_CHUNKS.items()},
    },
    "nystromformer": {"*": {"n_hashes": 2, "bucket_size": 64, "n_buckets": 0}},  # lra_config.py "reformer-2"
    "pytorch": {"*": {"n_hashes": 2, "bucket_size": 64, "n_buckets": 0}},  # Skyformer src/config.py "reformer"
}


@register_mechanism("reformer", ReformerConfig, causal=True, key_padding=True, family="routing", protocols=PROTOCOLS)
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
        if cfg.seed < -1:
            raise ValueError(f"reformer needs seed >= -1 (-1: drawn per instance), got {cfg.seed}")
        self.seed = instance_seed(cfg.seed)
        self._buckets = 0

    def draw_seed(self, step: int = 0) -> int:
        """The generator seed of this instance's rotations at training step ``step``."""
        return draw_seed(self.seed, step if self.cfg.redraw else 0)

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
        kpm = None if key_padding_mask is None else key_padding_mask.bool()
        # Rotations from (layer seed, training step), shape as reformer-pytorch's: the same for
        # every row of the batch and every forward pass of one step, whatever torch's global RNG.
        seed = self.draw_seed(0 if context is None else int(context.step))
        example_buckets = None
        if self.cfg.n_buckets > 0:
            n_buckets = self.cfg.n_buckets
            rotations = None
            if n_buckets > 1:
                rotations, _ = draw_rotations(d, self.cfg.n_hashes, torch.tensor([n_buckets]), q.device, seed)
        else:  # each example's own count from its real length, and the rotations it would draw alone
            real = torch.full((b,), length, device=q.device) if kpm is None else (~kpm).sum(-1)
            counts = example_num_buckets(real, self.cfg.bucket_size)
            n_buckets = int(counts.max())
            rotations, example_buckets = draw_rotations(d, self.cfg.n_hashes, counts, q.device, seed)
        if padded > length:
            q, v = (F.pad(x, (0, 0, 0, padded - length)) for x in (q, v))
            kpm = torch.zeros(b, length, dtype=torch.bool, device=q.device) if kpm is None else kpm
            kpm = F.pad(kpm, (0, padded - length), value=True)
        with torch.autocast(q.device.type, enabled=False):
            out = lsh_attention(
                q,
                v,
                rotations=rotations,
                n_hashes=self.cfg.n_hashes,
                n_buckets=n_buckets,
                chunk=chunk,
                key_padding_mask=kpm,
                causal=causal,
                example_buckets=example_buckets,
            )
        self._buckets = float(n_buckets) if example_buckets is None else float(example_buckets.float().mean())
        return out[:, :, :length].to(v.dtype)

    def metrics(self) -> dict[str, float]:
        return {"buckets": float(self._buckets)}
