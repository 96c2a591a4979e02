import pytest
import torch
from mechanism_checks import (
    assert_fully_padded_row_finite,
    assert_gradients_finite,
    assert_padding_invariant,
    assert_subquadratic,
    build,
    call,
    padding_mask,
    qkv,
)

from harness.core.attention import UnsupportedCapability
from mechanisms.skyformer import gaussian_attention_reference, sample_landmarks


@pytest.mark.parametrize("lq,lk", [(9, 9), (4, 11), (1, 1)])
def test_exact_when_every_point_is_a_landmark(lq, lk):
    """num_landmarks ≥ Lq + Lk, no ridge, exact pinv: the Nyström product is C V itself."""
    mech = build("skyformer", num_landmarks=64, ridge=0.0, pinv_iterations=0)
    q, k, v = qkv(lq=lq, lk=lk, dtype=torch.float64, scale=0.7)
    kpm = padding_mask(2, lk, [lk, max(1, lk - 3)])
    for mask in (None, kpm):
        out = call(mech, q, k, v, key_padding_mask=mask)
        torch.testing.assert_close(
            out, gaussian_attention_reference(q, k, v, key_padding_mask=mask), atol=1e-7, rtol=1e-6
        )


def test_error_falls_as_landmarks_grow():
    length = 48
    q, k, v = qkv(lq=length, dtype=torch.float64, scale=0.7)
    ref = gaussian_attention_reference(q, k, v)
    errors = []
    for m in (8, 32, 96):
        mech = build("skyformer", num_landmarks=m, ridge=0.0, pinv_iterations=0)
        errors.append(float((call(mech, q, k, v) - ref).norm() / ref.norm()))
    assert errors[0] > errors[1] > errors[2] and errors[2] < 1e-6, errors


def test_default_iterative_inverse_is_close_to_the_ridge_inverse():
    """6 Newton–Schulz iterations on the normalised κ(S,S) + 0.1 I land near its exact inverse."""
    q, k, v = qkv(lq=40, dtype=torch.float64)
    it = call(build("skyformer", num_landmarks=32), q, k, v)
    exact = call(build("skyformer", num_landmarks=32, pinv_iterations=0), q, k, v)
    assert float((it - exact).norm() / exact.norm()) < 0.05


def test_landmarks_are_valid_points_without_replacement():
    valid = padding_mask(2, 10, [10, 4]).logical_not()
    idx = sample_landmarks(valid, 6)
    assert idx.shape == (2, 6)
    assert all(len(set(row.tolist())) == 6 for row in idx)
    assert set(idx[1, :4].tolist()) == {0, 1, 2, 3}  # the 4 valid points first


def test_examples_do_not_couple():
    mech = build("skyformer", num_landmarks=8)
    q, k, v = qkv(lq=16)
    out = call(mech, q, k, v)
    q2, k2 = q.clone(), k.clone()
    q2[1] *= 30
    k2[1] *= 30
    torch.testing.assert_close(call(mech, q2, k2, v)[0], out[0], atol=0, rtol=0)


@pytest.mark.parametrize("landmarks", [4, 64])
def test_padding(landmarks):
    mech = build("skyformer", num_landmarks=landmarks)
    assert_padding_invariant(mech, lq=13)
    assert_fully_padded_row_finite(mech)
    q, k, v = qkv(lq=10)
    assert call(mech, q, k, v, key_padding_mask=padding_mask(2, 10, [10, 0]))[1].abs().max() == 0


def test_gradients_subquadratic_and_refusals():
    assert_gradients_finite(build("skyformer", num_landmarks=8), length=13, key_padding=True)
    assert_subquadratic(build("skyformer"), length=8192, heads=1, dim=16)
    mech = build("skyformer")
    q, k, v = qkv(lq=8)
    with pytest.raises(UnsupportedCapability, match="'skyformer' does not support causal attention"):
        mech(q, k, v, causal=True)
    with pytest.raises(ValueError, match="num_landmarks"):
        build("skyformer", num_landmarks=1)
