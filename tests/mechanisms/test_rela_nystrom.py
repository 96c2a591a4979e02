import math

import pytest
import torch
from mechanism_checks import (
    assert_fully_padded_row_finite,
    assert_gradients_finite,
    assert_padding_invariant,
    build,
    call,
    padding_mask,
    qkv,
)

from harness.core.attention import UnsupportedCapability


def dense_row_normalised_rela(mech, q, k, v, key_padding_mask=None, skip=None):
    """The dense form the mechanism approximates, in float64: P = N(ReLU(QKᵀ/√d)) with padded
    keys 0 and N dividing each row by max(row sum, 1e-6); o = P V (+ skip); then the authors'
    gated RMSNorm over the joined heads, g ⊙ o/√(mean_{H·D} o² + ε) ⊙ σ(w ⊙ o)."""
    q, k, v = q.double(), k.double(), v.double()
    weights = torch.relu(torch.einsum("bhid,bhjd->bhij", q, k) / math.sqrt(q.shape[-1]))
    if key_padding_mask is not None:
        weights = weights.masked_fill(key_padding_mask[:, None, None, :], 0.0)
    p = weights / weights.sum(-1, keepdim=True).clamp_min(1e-6)
    o = p @ v + (0 if skip is None else skip)
    out = o / (o.square().mean(dim=(1, 3), keepdim=True) + mech.cfg.norm_eps).sqrt()
    out = out * mech.norm_gain.detach().double()[None, :, None, :]
    return out * torch.sigmoid(mech.gate.detach().double()[None, :, None, :] * o)


def smooth_qkv(length, *, batch=2, heads=2, dim=8, dtype=torch.float64):
    """Queries/keys varying smoothly along the sequence (segment means are good landmarks)."""
    g = torch.Generator().manual_seed(1)
    t = torch.linspace(0, 1, length, dtype=dtype)[None, None, :, None]
    freq = torch.randn(batch, heads, 1, dim, generator=g, dtype=dtype) * 3
    q = 2 * torch.sin(2 * math.pi * t * freq + 1.0)
    k = 2 * torch.cos(2 * math.pi * t * freq)
    return q, k, torch.randn(batch, heads, length, dim, generator=g, dtype=dtype)


def randomise_gate(mech):
    with torch.no_grad():  # move the norm/gate parameters off their init so they are really tested
        mech.norm_gain.uniform_(0.5, 1.5)
        mech.gate.normal_()
    return mech


@pytest.mark.parametrize("length", [7, 12, 33])
def test_exact_when_every_token_is_a_landmark(length):
    """m >= L: the three factors all equal P, and P·pinv(P)·P = P for the Moore–Penrose inverse
    (P may be singular: ReLU rows can be all zero)."""
    q, k, v = qkv(lq=length, dtype=torch.float64)
    q_off, k_off = q.abs(), k.abs()  # positive scores, except query 1: negative with every key,
    q_off[:, :, 1] = -q_off[:, :, 1]  # so row 1 of P is zero and P is singular
    kpm = padding_mask(2, length, [length, length - 3])
    for landmarks in (length, 64):
        mech = randomise_gate(build("rela_nystrom", num_landmarks=landmarks, conv_kernel_size=0))
        for mask in (None, kpm):
            keep = torch.ones_like(q, dtype=torch.bool) if mask is None else ~mask[:, None, :, None].expand_as(q)
            for queries, keys in ((q, k), (q_off, k_off)):
                out = call(mech, queries, keys, v, key_padding_mask=mask)
                ref = dense_row_normalised_rela(mech, queries, keys, v, key_padding_mask=mask)
                torch.testing.assert_close(out[keep], ref[keep], atol=1e-9, rtol=1e-9)
            assert out[:, :, 1].abs().max() == 0  # the switched-off query outputs 0


@pytest.mark.parametrize("inputs", ["smooth", "random"])
def test_approaches_dense_rela_as_landmarks_grow(inputs):
    """With the default 6 pinv iterations the error falls steadily as m → L, also at landmark
    counts that do not divide L (exactness at m = L with a converged pinv is tested above).
    A converged pinv is not used here: for m < L it inverts the tiny singular values of an
    ill-conditioned middle factor and the error need not fall monotonically."""
    length = 64
    q, k, v = smooth_qkv(length) if inputs == "smooth" else qkv(lq=length, dtype=torch.float64)
    errors = []
    for landmarks in (4, 8, 16, 32, 48, 64):
        mech = randomise_gate(build("rela_nystrom", num_landmarks=landmarks, conv_kernel_size=0))
        ref = dense_row_normalised_rela(mech, q, k, v)
        errors.append(float((call(mech, q, k, v).detach() - ref).norm() / ref.norm()))
    assert all(a > b for a, b in zip(errors, errors[1:])), errors
    assert errors[0] > 0.3 and errors[-1] < 0.05, errors


def test_dense_limit_is_rela_with_one_head_and_no_gate():
    """Row normalisation divides o by a positive per-row scale; RMSNorm ignores it only when the
    scale is shared by every entry it normalises (one head) and no gate reads o's scale:
    then m = L without the conv skip gives ``rela``; with the gate σ(w ⊙ o) it does not."""
    q, k, v = qkv(lq=10, heads=1, dtype=torch.float64)
    approx = build("rela_nystrom", heads=1, num_landmarks=10, conv_kernel_size=0, stabiliser="init")
    with torch.no_grad():
        approx.norm_gain.uniform_(0.5, 1.5)
    exact = build("rela", heads=1, stabiliser="init")
    exact.load_state_dict(approx.state_dict())
    torch.testing.assert_close(call(approx, q, k, v), call(exact, q, k, v), atol=1e-4, rtol=1e-4)


def test_conv_skip_is_nystroms_and_enters_before_the_norm():
    """Same conv option and default as nystrom; the skip conv(V) is added to P V before the
    stabiliser (checked at m = L, where P V is exact)."""
    assert build("rela_nystrom").cfg.conv_kernel_size == build("nystrom").cfg.conv_kernel_size == 35
    mech = randomise_gate(build("rela_nystrom", num_landmarks=16, conv_kernel_size=5))
    q, k, v = qkv(lq=12, dtype=torch.float64)
    kpm = padding_mask(2, 12, [12, 9])
    w = mech.value_conv.weight.detach().double()  # (H, 1, 5, 1)
    skip = torch.nn.functional.conv2d(v.masked_fill(kpm[:, None, :, None], 0.0), w, padding=(2, 0), groups=2)
    ref = dense_row_normalised_rela(mech, q, k, v, key_padding_mask=kpm, skip=skip)
    keep = ~kpm[:, None, :, None].expand_as(q)
    torch.testing.assert_close(call(mech, q, k, v, key_padding_mask=kpm)[keep], ref[keep], atol=1e-10, rtol=1e-10)


def test_pinv_scaling_is_per_matrix():
    """Example 0's output is bit-identical whatever example 1 holds (here: 1000× larger and
    different inputs): the pinv initialisation never takes a max over the batch."""
    mech = build("rela_nystrom", num_landmarks=4)  # 6 iterations: far from converged, so Z₀ matters
    q, k, v = qkv(lq=16)
    out = call(mech, q, k, v)
    q2, k2, v2 = qkv(lq=16, seed=5)
    q2, k2, v2 = torch.cat([q[:1], 1000 * q2[1:]]), torch.cat([k[:1], k2[1:]]), torch.cat([v[:1], 1000 * v2[1:]])
    out2 = call(mech, q2, k2, v2)
    assert torch.isfinite(out2).all() and not torch.allclose(out[1], out2[1])
    torch.testing.assert_close(out[0], out2[0], atol=0, rtol=0)


@pytest.mark.parametrize("landmarks", [3, 4, 64])
@pytest.mark.parametrize("length", [12, 13])
def test_padded_positions_are_left_out(landmarks, length):
    """Padding (at lengths not divisible by m too) changes nothing at valid positions: padded
    tokens are excluded from the landmark means and get weight 0."""
    assert_padding_invariant(build("rela_nystrom", num_landmarks=landmarks), lq=length)


def test_sparsity_metric_is_the_share_of_zero_relu_weights():
    length, landmarks = 12, 4
    mech = build("rela_nystrom", num_landmarks=landmarks)
    q, k, v = qkv(lq=length)
    kpm = padding_mask(2, length, [length, 10])
    call(mech, q, k, v, key_padding_mask=kpm)
    valid = ~kpm
    q_scaled = q * 8**-0.5
    q_land, k_land = torch.zeros(2, 2, landmarks, 8), torch.zeros(2, 2, landmarks, 8)
    for i, real in enumerate((length, 10)):  # segments of each example's real tokens: ⌊t·m/ℓ⌋
        seg = torch.arange(real) * landmarks // real
        counts = torch.bincount(seg, minlength=landmarks).float()[:, None]
        q_land[i] = torch.zeros(2, landmarks, 8).index_add_(1, seg, q_scaled[i, :, :real]) / counts
        k_land[i] = torch.zeros(2, landmarks, 8).index_add_(1, seg, k[i, :, :real]) / counts
    left = (q_scaled @ k_land.transpose(-1, -2) <= 0)[valid[:, None, :, None].expand(2, 2, length, landmarks)]
    right = (q_land @ k.transpose(-1, -2) <= 0)[valid[:, None, None, :].expand(2, 2, landmarks, length)]
    expected = (left.float().mean() + right.float().mean()) / 2
    assert mech.metrics()["sparsity"] == pytest.approx(float(expected), abs=1e-6)
    assert 0.1 < float(expected) < 0.9


def test_fully_padded_rows_gradients_lengths_and_bf16():
    mech = build("rela_nystrom", num_landmarks=4)
    assert_fully_padded_row_finite(mech)
    q, k, v = qkv(lq=10)
    assert call(mech, q, k, v, key_padding_mask=padding_mask(2, 10, [10, 0]))[1].abs().max() == 0
    assert_gradients_finite(mech, length=13)
    assert_gradients_finite(mech, length=13, key_padding=True)
    for length in (1, 5, 65):
        q, k, v = qkv(lq=length)
        out = call(build("rela_nystrom"), q, k, v)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = call(build("rela_nystrom"), q, k, v)
        assert out.shape == q.shape and torch.isfinite(out).all() and torch.isfinite(low).all()


def test_unsupported_calls_raise():
    mech = build("rela_nystrom")
    q, k, v = qkv(lq=8)
    with pytest.raises(UnsupportedCapability, match="'rela_nystrom' does not support causal attention"):
        mech(q, k, v, causal=True)
    with pytest.raises(ValueError, match="num_landmarks >= 1"):
        build("rela_nystrom", num_landmarks=0)
