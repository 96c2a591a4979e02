import pytest
import torch
import torch.nn.functional as F
from mechanism_checks import (
    assert_causal,
    assert_fully_padded_row_finite,
    assert_padding_invariant,
    assert_subquadratic,
    build,
    call,
    padding_mask,
    qkv,
)

from harness.core.attention import UnsupportedCapability, allowed_mask
from mechanisms.reformer import SELF_LOGIT, hash_buckets, lsh_attention, lsh_attention_reference


def shared_qk_oracle(q, v, *, key_padding_mask=None, causal=False):
    """Softmax over q_i·(q_j/|q_j|)/√d in float64, self only when nothing else is allowed."""
    q, v = q.double(), v.double()
    length = q.shape[-2]
    scores = q @ F.normalize(q, dim=-1).transpose(-1, -2) / q.shape[-1] ** 0.5
    scores = scores.masked_fill(torch.eye(length, dtype=torch.bool), SELF_LOGIT)
    allowed = allowed_mask(length, length, key_padding_mask=key_padding_mask, causal=causal)
    if allowed is not None:
        scores = scores.masked_fill(~allowed, float("-inf"))
    return torch.nan_to_num(scores.softmax(-1)) @ v


@pytest.mark.parametrize("n_hashes", [1, 3])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("length", [1, 2, 13])
def test_one_bucket_one_chunk_is_shared_qk_softmax(n_hashes, causal, length):
    mech = build("reformer", n_buckets=1, bucket_size=64, n_hashes=n_hashes)
    q, k, v = qkv(lq=length, dtype=torch.float64)
    kpm = padding_mask(2, length, [length, max(1, length - 4)])
    for mask in (None, kpm):
        out = call(mech, q, k, v, key_padding_mask=mask, causal=causal)
        ref = shared_qk_oracle(q, v, key_padding_mask=mask, causal=causal)
        real = slice(None) if mask is None else ~mask[:, None, :, None].expand_as(out)  # padded queries: unspecified
        torch.testing.assert_close(out[real], ref[real], atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("n_hashes,n_buckets,chunk", [(1, 4, 4), (2, 4, 4), (3, 6, 2), (2, 2, 16)])
def test_chunked_form_equals_the_dense_window_formula(causal, n_hashes, n_buckets, chunk):
    """The sorted, chunked computation equals the dense float64 formula over the same windows,
    with the same random rotations, padding included."""
    length = 16
    q, k, v = qkv(lq=length, dtype=torch.float64)
    rotations = torch.randn(1, 8, n_hashes, n_buckets // 2)
    kpm = padding_mask(2, length, [length, 11])
    per_example = torch.tensor([n_buckets, 2])  # the second example hashes with fewer buckets
    for mask, buckets in ((None, None), (kpm, None), (kpm, per_example)):
        args = dict(
            rotations=rotations,
            n_hashes=n_hashes,
            n_buckets=n_buckets,
            chunk=chunk,
            key_padding_mask=mask,
            causal=causal,
            example_buckets=buckets,
        )
        out = lsh_attention(q, v, **args)
        torch.testing.assert_close(out, lsh_attention_reference(q, v, **args), atol=1e-10, rtol=1e-10)


def test_per_example_buckets_use_the_first_rotation_columns():
    """An example hashed with n_b of n buckets gets the ids it would get from the first n_b/2
    rotation columns alone (so its buckets do not depend on the batch's widest example)."""
    x = torch.randn(2, 2, 9, 8, dtype=torch.float64)
    rotations = torch.randn(1, 8, 3, 4)  # up to 8 buckets
    ids = hash_buckets(x, rotations, torch.tensor([8, 4]))
    torch.testing.assert_close(ids[0], hash_buckets(x[:1], rotations)[0], atol=0, rtol=0)
    torch.testing.assert_close(ids[1], hash_buckets(x[1:], rotations[..., :2])[0], atol=0, rtol=0)
    assert int(ids[1].max()) < 4


def test_more_rounds_miss_fewer_neighbours():
    """On clustered queries the LSH output moves towards full shared-QK attention as n_hashes
    grows (a query only sees the cluster members hashed into its window; more rounds, more seen)."""
    errors = {1: 0.0, 8: 0.0}
    for seed in range(3):
        g = torch.Generator().manual_seed(seed)
        centres = F.normalize(torch.randn(16, 16, generator=g, dtype=torch.float64), dim=-1)
        q = centres[torch.arange(128) % 16] * 12 + 0.05 * torch.randn(128, 16, generator=g, dtype=torch.float64)
        q, v = q.view(1, 1, 128, 16), torch.randn(1, 1, 128, 16, generator=g, dtype=torch.float64)
        ref = shared_qk_oracle(q, v)
        for n_hashes in errors:
            mech = build("reformer", heads=1, dim_head=16, bucket_size=16, n_hashes=n_hashes, seed=seed)
            errors[n_hashes] += float((call(mech, q, q, v) - ref).norm() / ref.norm()) / 3
    assert errors[8] < 0.85 * errors[1], errors


@pytest.mark.parametrize("length", [13, 40])
def test_causal_and_padding(length):
    mech = build("reformer", bucket_size=4, n_hashes=2)
    assert_causal(mech, length=length, t=9)
    for causal in (False, True):
        assert_padding_invariant(mech, lq=length, causal=causal)
        assert_fully_padded_row_finite(mech, length=length, causal=causal)
    for seed in range(10):  # strictly causal: later tokens (any magnitude) never move earlier windows
        q, k, v = qkv(lq=length, scale=40.0, seed=seed)
        out = call(mech, q, k, v, causal=True)
        q2, v2 = q.clone(), v.clone()
        q2[:, :, 9:] = torch.randn_like(q2[:, :, 9:]) * 1e3
        v2[:, :, 9:] *= 1e3
        # equal up to float32 summation order (keys land in other slots of the window): ~1e-7
        torch.testing.assert_close(call(mech, q2, k, v2, causal=True)[:, :, :9], out[:, :, :9], atol=1e-5, rtol=1e-5)
    kpm = padding_mask(2, length, [length, 0])
    assert call(mech, q, k, v, key_padding_mask=kpm)[1].abs().max() == 0


def test_gradients_ignore_k_subquadratic_and_refusals():
    mech = build("reformer", bucket_size=4, n_hashes=2).train()
    q, k, v = (x.requires_grad_() for x in qkv(lq=13))
    mech(q, k, v, key_padding_mask=padding_mask(2, 13, [13, 9]), causal=True).square().mean().backward()
    assert k.grad is None and mech.ignored_inputs == ("k",)
    assert torch.isfinite(q.grad).all() and q.grad.abs().sum() > 0 and torch.isfinite(v.grad).all()
    assert_subquadratic(build("reformer", n_hashes=2), length=8192, heads=1, dim=16)
    with pytest.raises(UnsupportedCapability, match=r"'reformer' does not support cross attention \(Lq=5, Lk=8\)"):
        build("reformer")(*qkv(lq=5, lk=8))
    with pytest.raises(ValueError, match="n_buckets"):
        build("reformer", n_buckets=3)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("n_hashes,n_buckets,chunk", [(1, 4, 4), (2, 4, 4), (3, 6, 2), (2, 2, 16), (2, 4, 8)])
def test_chunked_gradients_equal_the_dense_window_formula(causal, n_hashes, n_buckets, chunk):
    """The hand-written backward of the chunked softmax (its logsumexp included, which weights the
    rounds) gives the dense float64 formula's gradients for q and v, padding included."""
    length = 16
    q, k, v = qkv(lq=length, dtype=torch.float64)
    rotations = torch.randn(1, 8, n_hashes, n_buckets // 2)
    kpm = padding_mask(2, length, [length, 11])
    grad = torch.randn_like(q)
    for mask, buckets in ((None, None), (kpm, None), (kpm, torch.tensor([n_buckets, 2]))):
        args = dict(
            rotations=rotations,
            n_hashes=n_hashes,
            n_buckets=n_buckets,
            chunk=chunk,
            key_padding_mask=mask,
            causal=causal,
            example_buckets=buckets,
        )
        grads = []
        for fn in (lsh_attention, lsh_attention_reference):
            qq, vv = q.detach().clone().requires_grad_(), v.detach().clone().requires_grad_()
            (fn(qq, vv, **args) * grad).sum().backward()
            grads.append((qq.grad, vv.grad))
        torch.testing.assert_close(grads[0], grads[1], atol=1e-10, rtol=1e-10)


def test_hash_ids_are_the_argmax_over_both_signs():
    """The slab-wise hash equals argmax([xR, −xR]) exactly (the reference's form), zero rows included."""
    x = torch.randn(2, 3, 300, 8)
    x[0, 0, :5] = 0.0  # all-zero rotated rows: the first column wins, as the argmax of the concatenation
    rotations = torch.randn(1, 8, 3, 5)
    rotated = torch.einsum("bhld,drk->bhrlk", x, rotations[0])
    expected = torch.cat([rotated, -rotated], dim=-1).argmax(-1)
    assert torch.equal(hash_buckets(x, rotations), expected)
