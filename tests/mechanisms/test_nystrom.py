import math

import pytest
import torch
import torch.nn.functional as F
from mechanism_checks import (
    assert_fully_padded_row_finite,
    assert_gradients_finite,
    assert_padding_invariant,
    build,
    call,
    dense_attention_oracle,
    padding_mask,
    qkv,
)

from harness.core.attention import UnsupportedCapability
from mechanisms.nystrom import iterative_pinv, segment_means


def smooth_qkv(length, *, batch=2, heads=2, dim=8, dtype=torch.float64):
    """Queries/keys that vary smoothly along the sequence (where segment means are good
    landmarks), random values."""
    g = torch.Generator().manual_seed(1)
    t = torch.linspace(0, 1, length, dtype=dtype)[None, None, :, None]
    freq = torch.randn(batch, heads, 1, dim, generator=g, dtype=dtype) * 3
    q = 2 * torch.sin(2 * math.pi * t * freq + 1.0)
    k = 2 * torch.cos(2 * math.pi * t * freq)
    v = torch.randn(batch, heads, length, dim, generator=g, dtype=dtype)
    return q, k, v


@pytest.mark.parametrize("length", [7, 12, 33, 64])
def test_exact_softmax_when_every_token_is_a_landmark(length):
    """num_landmarks >= L: exact softmax, as the authors' code computes it, with the default
    6 pinv iterations (the three-factor form would be ~4% off at L = m = 64)."""
    for landmarks in (length, 100):
        mech = build("nystrom", num_landmarks=landmarks, conv_kernel_size=0)
        kpm = padding_mask(2, length, [length, length - 3])
        for mask in (None, kpm):
            q, k, v = qkv(lq=length, dtype=torch.float64)
            ref = dense_attention_oracle(q, k, v, key_padding_mask=mask)
            torch.testing.assert_close(call(mech, q, k, v, key_padding_mask=mask), ref, atol=1e-12, rtol=1e-12)
            q, k, v = qkv(lq=length)
            out = call(mech, q, k, v, key_padding_mask=mask)
            assert out.dtype == torch.float32
            ref = dense_attention_oracle(q, k, v, key_padding_mask=mask)
            torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=1e-5)
            assert mech.metrics()["landmarks"] == length


def test_error_falls_as_landmarks_grow():
    length = 64
    q, k, v = smooth_qkv(length)
    ref = dense_attention_oracle(q, k, v)
    errors = []
    for landmarks in (4, 8, 16, 32, 64):
        mech = build("nystrom", num_landmarks=landmarks, pinv_iterations=30, conv_kernel_size=0)
        errors.append(float((call(mech, q, k, v) - ref).norm() / ref.norm()))
    assert all(a > b for a, b in zip(errors, errors[1:])), errors
    assert errors[0] > 0.1 and errors[-1] < 1e-8, errors


def test_error_falls_with_default_iterations_at_any_landmark_count():
    """With the default 6 iterations (a truncated, regularising pinv) the error falls steadily
    as m → L on random inputs too, including counts that do not divide L. A converged pinv
    does not: for m < L it inverts tiny singular values of the middle factor."""
    length = 64
    q, k, v = qkv(lq=length, dtype=torch.float64)
    ref = dense_attention_oracle(q, k, v)
    errors = []
    for landmarks in (4, 8, 16, 32, 48, 56, 64):
        mech = build("nystrom", num_landmarks=landmarks, conv_kernel_size=0)
        errors.append(float((call(mech, q, k, v) - ref).norm() / ref.norm()))
    assert all(a > b for a, b in zip(errors, errors[1:])), errors
    assert errors[0] > 0.5 and errors[-1] < 0.05, errors


@pytest.mark.parametrize("factor", [8.0, 1000.0])
def test_pinv_scaling_is_per_matrix(factor):
    """Example 0's output does not change when example 1 gets a very different scale
    (a batch-wide max in the pinv initialisation would couple them)."""
    mech = build("nystrom", num_landmarks=4, conv_kernel_size=0)  # 6 iterations: far from converged
    q, k, v = qkv(lq=16)
    out = call(mech, q, k, v)
    q2, k2 = q.clone(), k.clone()
    q2[1] *= factor
    k2[1] *= factor
    out2 = call(mech, q2, k2, v)
    assert not torch.allclose(out[1], out2[1])
    torch.testing.assert_close(out[0], out2[0], atol=0, rtol=0)


def test_iterative_pinv_is_per_matrix_and_converges():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(3, 6, 6, generator=g, dtype=torch.float64)
    a[1] = a[1] * 1e3
    a[2, :, 0] = 0  # rank deficient
    a[2, 3] = 0
    alone = iterative_pinv(a[:1], 4)
    torch.testing.assert_close(iterative_pinv(a, 4)[:1], alone, atol=0, rtol=0)
    torch.testing.assert_close(iterative_pinv(a, 60), torch.linalg.pinv(a), atol=1e-8, rtol=1e-8)
    assert iterative_pinv(torch.zeros(2, 3, 3), 6).abs().max() == 0  # zero matrix -> zero, not NaN
    rect = torch.randn(2, 4, 7, generator=g, dtype=torch.float64)
    torch.testing.assert_close(iterative_pinv(rect, 60), torch.linalg.pinv(rect), atol=1e-8, rtol=1e-8)


def test_segment_means_spread_padding_and_exclude_masked_tokens():
    x = torch.arange(10, dtype=torch.float32).reshape(1, 1, 10, 1).expand(2, 1, 10, 1)
    means, seg_valid = segment_means(x, None, 4)  # 10 tokens, 4 segments: [0:3] [3:5] [5:8] [8:10]
    assert seg_valid is None
    torch.testing.assert_close(means[0, 0, :, 0], torch.tensor([1.0, 3.5, 6.0, 8.5]))
    valid = torch.ones(2, 10, dtype=torch.bool)
    valid[1, 2:5] = False  # example 1: 7 real tokens 0 1 5 6 7 8 9 -> segments [0 1] [5 6] [7 8] [9]
    means, seg_valid = segment_means(x, valid, 4)
    torch.testing.assert_close(means[0, 0, :, 0], torch.tensor([1.0, 3.5, 6.0, 8.5]))
    torch.testing.assert_close(means[1, 0, :, 0], torch.tensor([0.5, 5.5, 7.5, 9.0]))
    assert seg_valid.tolist() == [[True] * 4, [True] * 4]
    valid[1] = torch.arange(10) < 3  # 3 real tokens, fewer than 4 segments: one each, the 4th empty
    means, seg_valid = segment_means(x, valid, 4)
    torch.testing.assert_close(means[1, 0, :, 0], torch.tensor([0.0, 1.0, 2.0, 0.0]))
    assert seg_valid.tolist() == [[True] * 4, [True, True, True, False]]
    means, seg_valid = segment_means(x, None, 64)  # L < m: every token its own landmark
    torch.testing.assert_close(means[0, 0, :, 0], torch.arange(10.0))


def test_conv_residual_is_a_depthwise_conv_of_unpadded_values():
    length, kernel = 13, 5
    with_conv = build("nystrom", num_landmarks=4, conv_kernel_size=kernel)
    without = build("nystrom", num_landmarks=4, conv_kernel_size=0)
    assert not list(without.parameters())
    q, k, v = qkv(lq=length)
    kpm = padding_mask(2, length, [length, 9])
    diff = call(with_conv, q, k, v, key_padding_mask=kpm) - call(without, q, k, v, key_padding_mask=kpm)
    weight = with_conv.value_conv.weight[:, 0, :, 0]  # (H, kernel)
    v0 = F.pad(v.masked_fill(kpm[:, None, :, None], 0.0), (0, 0, kernel // 2, kernel // 2))
    expected = sum(weight[None, :, t, None, None] * v0[:, :, t : t + length] for t in range(kernel))
    torch.testing.assert_close(diff, expected, atol=1e-5, rtol=1e-5)
    even = build("nystrom", num_landmarks=4, conv_kernel_size=4)
    assert call(even, q, k, v).shape == q.shape


@pytest.mark.parametrize("landmarks", [3, 4, 64])
@pytest.mark.parametrize("length", [12, 13])
def test_padded_keys_have_no_influence(landmarks, length):
    assert_padding_invariant(build("nystrom", num_landmarks=landmarks), lq=length)


def test_fully_padded_row_is_finite_and_zero():
    mech = build("nystrom", num_landmarks=3)
    assert_fully_padded_row_finite(mech)
    q, k, v = qkv(lq=10)
    out = call(mech, q, k, v, key_padding_mask=padding_mask(2, 10, [10, 0]))
    assert out[1].abs().max() == 0


@pytest.mark.parametrize("key_padding", [False, True])
def test_gradients_finite(key_padding):
    assert_gradients_finite(build("nystrom", num_landmarks=4), length=13, key_padding=key_padding)
    mech = build("nystrom", num_landmarks=4)
    q, k, v = qkv(lq=13)
    mech(q, k, v).square().mean().backward()
    assert mech.value_conv.weight.grad is not None and mech.value_conv.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("length", [1, 5, 65, 100])
def test_any_length_fp32_and_bf16_autocast(length):
    mech = build("nystrom")  # 64 landmarks
    q, k, v = qkv(lq=length)
    out = call(mech, q, k, v)
    assert out.shape == q.shape and torch.isfinite(out).all()
    assert mech.metrics() == {"landmarks": float(min(64, length))}
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = call(mech, q, k, v)
    assert torch.isfinite(low).all()
    assert (low.float() - out).abs().max() < 0.1 * out.abs().max() + 0.05


def test_unsupported_calls_raise():
    mech = build("nystrom")
    q, k, v = qkv(lq=8)
    with pytest.raises(UnsupportedCapability, match="'nystrom' does not support causal attention"):
        mech(q, k, v, causal=True)
    q2, k2, v2 = qkv(lq=5, lk=8)
    with pytest.raises(UnsupportedCapability, match=r"'nystrom' does not support cross attention \(Lq=5, Lk=8\)"):
        mech(q2, k2, v2)
    with pytest.raises(ValueError, match="num_landmarks"):
        build("nystrom", num_landmarks=0)


def test_conv_kernel_default_is_the_authors_lra_35():
    """mlpen/Nystromformer LRA/code/lra_config.py: "conv_kernel_size": 35 for every nystrom run."""
    mech = build("nystrom")
    assert mech.cfg.conv_kernel_size == 35
    assert mech.value_conv.weight.shape[2] == 35
