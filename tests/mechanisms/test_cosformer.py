import pytest
import torch
from mechanism_checks import (
    assert_causal,
    assert_fully_padded_row_finite,
    assert_gradients_finite,
    assert_padding_invariant,
    assert_subquadratic,
    build,
    call,
    padding_mask,
    qkv,
)

from mechanisms.cosformer import cosformer_reference


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("lq,lk", [(13, 13), (5, 13), (1, 1), (70, 70)])
def test_matches_quadratic_form_float64(causal, lq, lk):
    mech = build("cosformer", causal_chunk_size=8)
    q, k, v = qkv(lq=lq, lk=lk, dtype=torch.float64)
    kpm = padding_mask(2, lk, [lk, max(1, lk - 4)])
    for mask in (None, kpm):
        out = call(mech, q, k, v, key_padding_mask=mask, causal=causal)
        ref = cosformer_reference(q, k, v, key_padding_mask=mask, causal=causal)
        torch.testing.assert_close(out, ref, atol=1e-10, rtol=1e-10)


def test_causal_cross_with_more_queries_than_keys():
    """Lq > Lk, causal: queries before the first key see nothing (zeros), the rest match."""
    mech = build("cosformer", causal_chunk_size=4)
    q, k, v = qkv(lq=9, lk=6, dtype=torch.float64)
    out = call(mech, q, k, v, causal=True)
    torch.testing.assert_close(out, cosformer_reference(q, k, v, causal=True), atol=1e-10, rtol=1e-10)
    assert out[:, :, :3].abs().max() == 0


def test_float32_matches_reference_with_adversarial_magnitudes():
    mech = build("cosformer", causal_chunk_size=16)
    q, k, v = qkv(lq=50, scale=30.0)
    for causal in (False, True):
        out = call(mech, q, k, v, causal=causal)
        ref = cosformer_reference(q, k, v, causal=causal)
        torch.testing.assert_close(out.double(), ref, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("chunk", [1, 5, 64])
def test_causal(chunk):
    mech = build("cosformer", causal_chunk_size=chunk)
    assert_causal(mech, length=17, t=9)
    q, k, v = qkv(lq=30, scale=50.0)  # large magnitudes: nothing leaks through float32 rounding
    out = call(mech, q, k, v, causal=True)
    k2, v2 = k.clone(), v.clone()
    k2[:, :, 20:] *= 1e4
    v2[:, :, 20:] *= 1e4
    torch.testing.assert_close(call(mech, q, k2, v2, causal=True)[:, :, :20], out[:, :, :20], atol=0, rtol=0)


@pytest.mark.parametrize("causal", [False, True])
def test_padding(causal):
    mech = build("cosformer", causal_chunk_size=4)
    assert_padding_invariant(mech, lq=13, causal=causal)
    assert_fully_padded_row_finite(mech, causal=causal)
    q, k, v = qkv(lq=10)
    out = call(mech, q, k, v, key_padding_mask=padding_mask(2, 10, [10, 0]), causal=causal)
    assert out[1].abs().max() == 0


def test_gradients_and_subquadratic():
    assert_gradients_finite(build("cosformer"), length=13, key_padding=True)
    assert_gradients_finite(build("cosformer", causal_chunk_size=4), length=13, causal=True, key_padding=True)
    assert_subquadratic(build("cosformer"), length=8192, heads=1, dim=16, backward=True)
    assert_subquadratic(build("cosformer"), length=8192, heads=1, dim=16, causal=True)


def test_bad_config_is_refused():
    with pytest.raises(ValueError, match="causal_chunk_size"):
        build("cosformer", causal_chunk_size=0)
