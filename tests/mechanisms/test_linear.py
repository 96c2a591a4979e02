import pytest
import torch
from mechanism_checks import (
    assert_causal,
    assert_padding_invariant,
    assert_subquadratic,
    build,
    call,
    largest_intermediate,
    padding_mask,
    qkv,
)

from mechanisms.linear import elu_feature_map, linear_attention_reference


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("chunk", [1, 4, 64])
@pytest.mark.parametrize("length", [1, 13])
def test_matches_the_plain_formula_in_float64(causal, chunk, length):
    mech = build("linear", causal_chunk_size=chunk)
    q, k, v = qkv(lq=length, dtype=torch.float64)
    kpm = padding_mask(2, length, [length, max(1, length - 4)])
    for mask in (None, kpm):
        out = call(mech, q, k, v, key_padding_mask=mask, causal=causal)
        ref = linear_attention_reference(q, k, v, eps=1e-6, key_padding_mask=mask, causal=causal)
        torch.testing.assert_close(out, ref)


@pytest.mark.parametrize("lq,lk", [(5, 13), (13, 5), (1, 9)])
@pytest.mark.parametrize("causal", [False, True])
def test_cross_lengths_bottom_right_aligned(lq, lk, causal):
    mech = build("linear", causal_chunk_size=3)
    q, k, v = qkv(lq=lq, lk=lk, dtype=torch.float64)
    kpm = padding_mask(2, lk, [lk, lk - 2])
    out = call(mech, q, k, v, key_padding_mask=kpm, causal=causal)
    torch.testing.assert_close(out, linear_attention_reference(q, k, v, eps=1e-6, key_padding_mask=kpm, causal=causal))


def test_reference_is_the_recurrent_form():
    """Eq. 9's running sums S_i = Σ_{j≤i} φ(k_j) v_jᵀ, z_i = Σ_{j≤i} φ(k_j), one position at a time."""
    q, k, v = qkv(batch=1, heads=1, lq=6, dtype=torch.float64)
    qf, kf = elu_feature_map(q[0, 0]), elu_feature_map(k[0, 0])
    s, z, rows = torch.zeros(8, 8, dtype=torch.float64), torch.zeros(8, dtype=torch.float64), []
    for i in range(6):  # the recurrence, written out for the test only
        s, z = s + torch.outer(kf[i], v[0, 0, i]), z + kf[i]
        rows.append(qf[i] @ s / (qf[i] @ z + 1e-6))
    torch.testing.assert_close(linear_attention_reference(q, k, v, eps=1e-6, causal=True)[0, 0], torch.stack(rows))


def test_fully_padded_row_is_exactly_zero():
    mech = build("linear")
    q, k, v = qkv(lq=9)
    kpm = padding_mask(2, 9, [9, 0])
    for causal in (False, True):
        out = call(mech, q, k, v, key_padding_mask=kpm, causal=causal)
        assert torch.equal(out[1], torch.zeros_like(out[1]))


def test_causal_with_adversarial_magnitudes_in_float32():
    mech = build("linear", causal_chunk_size=4)
    assert_causal(mech, length=17, t=9)
    assert_padding_invariant(mech, lq=17, causal=True)
    q, k, v = qkv(lq=17)
    out = call(mech, q, k, v, causal=True)
    q2, k2, v2 = (x.clone() for x in (q, k, v))
    for x in (q2, k2, v2):
        x[:, :, 10:] = 1e4 * torch.randn_like(x[:, :, 10:])
    torch.testing.assert_close(out[:, :, :10], call(mech, q2, k2, v2, causal=True)[:, :, :10], rtol=1e-6, atol=1e-6)


def test_causal_chunks_never_build_a_per_position_state():
    """Chunked prefix sums: no tensor reaches L·d² (what a (B, H, L, d, d) cumsum would be)."""
    length, dim, chunk = 1024, 16, 32
    mech = build("linear", heads=1, dim_head=dim, max_len=length, causal_chunk_size=chunk)
    largest, op = largest_intermediate(mech, length=length, dim=dim, causal=True, key_padding=True)
    assert largest <= length * max(chunk, dim), f"{op} built {largest} elements"


@pytest.mark.slow
def test_no_quadratic_tensor():
    mech = build("linear", heads=1, dim_head=16, max_len=8192)
    assert_subquadratic(mech, length=8192, causal=True, key_padding=True)
    assert_subquadratic(mech, length=8192)
