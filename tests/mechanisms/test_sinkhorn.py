import math

import pytest
import torch
from mechanism_checks import (
    assert_fully_padded_row_finite,
    assert_gradients_finite,
    assert_padding_invariant,
    assert_subquadratic,
    build,
    call,
    dense_attention_oracle,
    padding_mask,
    qkv,
)

from harness.core.attention import UnsupportedCapability
from mechanisms.sinkhorn import sinkhorn, sorted_block_attention


@pytest.mark.parametrize("length", [1, 7, 16])
def test_one_block_is_full_softmax(length):
    """block_size ≥ L: one block, P = [[1]], the sorted block is the block itself: softmax attention."""
    q, k, v = qkv(lq=length, dtype=torch.float64)
    kpm = padding_mask(2, length, [length, max(1, length - 3)])
    for combine, times in (("joint", 1.0), ("sum", 2.0)):  # sum: own block + sorted (= own) block
        mech = build("sinkhorn", block_size=64, combine=combine)
        for mask in (None, kpm):
            out = call(mech, q, k, v, key_padding_mask=mask)
            ref = times * dense_attention_oracle(q, k, v, key_padding_mask=mask)
            real = slice(None) if mask is None else ~mask[:, None, :, None].expand_as(out)
            torch.testing.assert_close(out[real], ref[real], atol=1e-10, rtol=1e-10)


def test_hard_permutation_attends_to_own_and_sorted_block():
    """With a hard permutation π (a derangement), block j attends exactly to blocks j and π⁻¹(j):
    the dense float64 oracle with that block mask, padding included."""
    block, n = 4, 4
    q, k, v = qkv(lq=block * n, dtype=torch.float64)
    source = torch.tensor([2, 0, 3, 1])  # slot j receives key block source[j]
    perm = torch.zeros(n, n, dtype=torch.float64)
    perm[source, torch.arange(n)] = 1.0
    perm = perm.expand(2, 2, n, n)
    blocks = torch.arange(block * n) // block
    allowed = (blocks[None, :] == blocks[:, None]) | (blocks[None, :] == source[blocks][:, None])
    own = blocks[None, :] == blocks[:, None]
    sorted_ = blocks[None, :] == source[blocks][:, None]

    def oracle(mask, valid):
        bias = torch.zeros(16, 16, dtype=torch.float64).masked_fill(~mask, float("-inf"))
        return torch.nan_to_num(dense_attention_oracle(q, k, v, key_padding_mask=~valid, bias=bias))

    for valid_len in (16, 11):
        valid = ~padding_mask(2, 16, [16, valid_len])
        qz, kz, vz = (x.masked_fill(~valid[:, None, :, None], 0) for x in (q, k, v))
        keep = valid[:, None, :, None].expand(2, 2, 16, 8)
        joint = sorted_block_attention(qz, kz, vz, perm, valid, block, "joint")
        torch.testing.assert_close(joint[keep], oracle(allowed, valid)[keep], atol=1e-10, rtol=1e-10)
        # the authors' form: two softmaxes, own block and sorted block, added
        summed = sorted_block_attention(qz, kz, vz, perm, valid, block, "sum")
        ref = oracle(own, valid) + oracle(sorted_, valid)
        torch.testing.assert_close(summed[keep], ref[keep], atol=1e-10, rtol=1e-10)


def test_default_is_the_authors_sum_of_two_softmaxes():
    """google-research/long-range-arena sinkhorn_attention.py: x = x + sorted_x."""
    block, length = 4, 16
    mech = build("sinkhorn", block_size=block, max_len=length).double()
    assert mech.cfg.combine == "sum"
    q, k, v = qkv(lq=length, dtype=torch.float64)
    out = call(mech, q, k, v)
    perm = mech._perm  # (B, H, N, N) the sort this call used
    qb, kb, vb = (x.reshape(2, 2, 4, block, 8) for x in (q, k, v))
    k_sorted = torch.einsum("bhij,bhitd->bhjtd", perm, kb)
    v_sorted = torch.einsum("bhij,bhitd->bhjtd", perm, vb)
    att = lambda keys, values: torch.softmax(qb @ keys.transpose(-1, -2) / 8**0.5, -1) @ values  # noqa: E731
    expected = (att(kb, vb) + att(k_sorted, v_sorted)).reshape(2, 2, length, 8)
    torch.testing.assert_close(out, expected, atol=1e-10, rtol=1e-10)
    joint = build("sinkhorn", block_size=block, max_len=length, combine="joint").double()
    assert float((call(joint, q, k, v) - out).abs().max()) > 0.1


def test_sinkhorn_is_doubly_stochastic_and_sharpens_with_temperature():
    g = torch.Generator().manual_seed(0)
    scores = torch.randn(3, 6, 6, generator=g, dtype=torch.float64)
    p = sinkhorn(scores, 50)
    torch.testing.assert_close(p.sum(-1), torch.ones(3, 6, dtype=torch.float64))
    torch.testing.assert_close(p.sum(-2), torch.ones(3, 6, dtype=torch.float64))
    assert sinkhorn(scores / 0.05, 50).amax(-2).mean() > p.amax(-2).mean()


def test_sort_net_is_learned_and_noise_only_in_training():
    mech = build("sinkhorn", block_size=4, max_len=32)
    q, k, v = qkv(lq=16)
    torch.testing.assert_close(mech(q, k, v), mech(q, k, v), atol=0, rtol=0)  # eval: deterministic
    mech.train()
    assert not torch.allclose(mech(q, k, v), mech(q, k, v))  # Gumbel noise
    mech.eval()
    out = mech(q, k, v)
    out.square().mean().backward()
    assert mech.sort_net.weight.grad.abs().sum() > 0
    assert 0.25 <= mech.metrics()["sort_sharpness"] <= 1.0


@pytest.mark.parametrize("block_size", [4, 5, 64])
def test_padding(block_size):
    mech = build("sinkhorn", block_size=block_size)
    assert_padding_invariant(mech, lq=17)
    assert_fully_padded_row_finite(mech, length=17)
    q, k, v = qkv(lq=10)
    assert call(mech, q, k, v, key_padding_mask=padding_mask(2, 10, [10, 0]))[1].abs().max() == 0


def test_gradients_subquadratic_and_refusals():
    assert_gradients_finite(build("sinkhorn", block_size=4), length=13, key_padding=True)
    assert_subquadratic(build("sinkhorn", heads=1, dim_head=16, max_len=8192), length=8192, heads=1, dim=16)
    mech = build("sinkhorn", block_size=4, max_len=16)
    with pytest.raises(UnsupportedCapability, match="'sinkhorn' does not support causal attention"):
        mech(*qkv(lq=8), causal=True)
    with pytest.raises(ValueError, match="max_len"):
        mech(*qkv(lq=20))
    with pytest.raises(ValueError, match="temperature"):
        build("sinkhorn", temperature=0.0)


@pytest.mark.parametrize("settings", [{"sort": "softmax"}, {"sinkhorn_iters": 1, "temperature": 1.0, "clip": 1.0}])
def test_lras_sorts_keep_padding_out(settings):
    """LRA's sorts (a softmax over the slots; its Sinkhorn operator: 1 iteration, log weights
    clipped to ±1): the sort matrix has their form, padded values change nothing, and an example
    padded in a batch gives what it gives alone (the clip must not lift padding blocks to e^−1)."""
    mech = build("sinkhorn", block_size=4, max_len=32, gumbel_noise=False, **settings).double()
    for p in mech.parameters():
        torch.nn.init.normal_(p, std=0.5)
    q, k, v = qkv(lq=24, dtype=torch.float64)
    p = mech.sort_matrix(k, 6, 4)  # (B, H, 6, 6)
    if settings.get("sort") == "softmax":
        torch.testing.assert_close(p.sum(-1), torch.ones_like(p.sum(-1)))
    else:
        assert p.min() >= math.exp(-1.0) - 1e-12 and p.max() <= math.exp(1.0) + 1e-12
        assert not torch.allclose(p.sum(-1), torch.ones_like(p.sum(-1)))  # clipped: no longer stochastic
    assert_padding_invariant(mech, lq=16)
    kpm = padding_mask(2, 24, [24, 13])
    batched = call(mech, q, k, v, key_padding_mask=kpm)
    alone = call(mech, q[1:, :, :13], k[1:, :, :13], v[1:, :, :13])
    torch.testing.assert_close(batched[1, :, :13], alone[0], atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("combine", ["sum", "joint"])
def test_unmasked_fast_path_equals_the_masked_form(combine):
    """With every position real (valid=None) the blocks go through the fused unmasked kernel:
    outputs and gradients equal the masked form run with an all-true mask, in float64."""
    block, length = 4, 16
    q, k, v = qkv(lq=length, dtype=torch.float64)
    perm = torch.rand(2, 2, 4, 4, dtype=torch.float64).softmax(-1)
    grad = torch.randn_like(q)
    results = []
    for valid in (None, torch.ones(2, length, dtype=torch.bool)):
        inputs = [x.detach().clone().requires_grad_() for x in (q, k, v, perm)]
        out = sorted_block_attention(*inputs[:4], valid, block, combine)
        (out * grad).sum().backward()
        results.append((out, *(x.grad for x in inputs)))
    torch.testing.assert_close(results[0], results[1], atol=1e-10, rtol=1e-10)


def test_a_slot_without_weight_falls_back_to_the_mask():
    """A slot no block is sorted into (a zero column of P) has no valid sorted key: its queries
    get only their own block, as the masked form says, also with no padding at all; the gradients
    (of P too, where an unmasked softmax would send some) are the masked form's."""
    block, length = 4, 16
    q, k, v = qkv(lq=length, dtype=torch.float64)
    perm = torch.eye(4, dtype=torch.float64)[[0, 0, 2, 3]].expand(2, 2, 4, 4).contiguous()  # slot 1 empty
    assert not bool((perm > 0).any(-2).all())
    grad = torch.randn_like(q)
    results = []
    for valid in (None, torch.ones(2, length, dtype=torch.bool)):
        inputs = [x.detach().clone().requires_grad_() for x in (q, k, v, perm)]
        out = sorted_block_attention(*inputs[:4], valid, block, "sum")
        (out * grad).sum().backward()
        results.append((out, *(x.grad for x in inputs)))
    torch.testing.assert_close(results[0], results[1], atol=1e-10, rtol=1e-10)
