import math

import pytest
import torch
from mechanism_checks import (
    assert_causal,
    assert_fully_padded_row_finite,
    assert_gradients_finite,
    assert_padding_invariant,
    build,
    call,
    padding_mask,
    qkv,
)


def rms(x):
    return x / torch.sqrt(x.square().mean(-1, keepdim=True) + 1e-6)


def dense_reference(mech, q, k, v, key_padding_mask=None, causal=False):
    """The documented formula in float64 with an explicit (Lq, Lk) visibility matrix."""
    q, k, v = q.double(), k.double(), v.double()
    lq, lk = q.shape[-2], k.shape[-2]
    see = torch.ones(q.shape[0], 1, lq, lk, dtype=torch.bool)
    if causal:
        see = see & (torch.arange(lk)[None, :] <= torch.arange(lq)[:, None] + lk - lq)
    if key_padding_mask is not None:
        see = see & ~key_padding_mask[:, None, None, :]
    gate = torch.sigmoid(k)[:, :, None] * see[..., None]  # (B, H, Lq, Lk, D)
    summary = (gate * v[:, :, None]).sum(3) / gate.sum(3).clamp_min(1e-300)
    normalize = mech.cfg.normalize
    z = torch.cat([rms(q), rms(summary)] if normalize else [q, summary], -1)
    factors, out_proj = mech.factors.detach().double(), mech.out_proj.detach().double()
    x = None
    for n in range(factors.shape[1]):
        u = torch.einsum("bhic,hcr->bhir", z, factors[:, n])
        x = u if x is None else u * x + x
        x = rms(x) if normalize else x
    out = torch.einsum("bhir,hrd->bhid", x, out_proj)
    return out * see.any(-1, keepdim=True)


@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("lq,lk", [(9, 9), (5, 11), (11, 5)])
def test_matches_dense_reference(normalize, causal, lq, lk):
    mech = build("polynomial", degree=4, rank=6, normalize=normalize)
    q, k, v = qkv(lq=lq, lk=lk)
    kpm = padding_mask(2, lk, [lk, max(lk - 3, 1)])
    for mask in (None, kpm):
        out = call(mech, q, k, v, key_padding_mask=mask, causal=causal)
        ref = dense_reference(mech, q, k, v, key_padding_mask=mask, causal=causal)
        torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("degree", [1, 2, 3, 5])
def test_unnormalised_output_is_a_degree_n_polynomial(degree):
    """Without normalisation, scaling q and v by t scales z = [q; m] by t, so the output is
    a polynomial in t of degree exactly N with no constant term."""
    mech = build("polynomial", degree=degree, rank=5, normalize=False).double()
    q, k, v = qkv(lq=7, dtype=torch.float64, seed=3)
    outs = torch.stack([mech(t * q, k, t * v, causal=True) for t in range(degree + 2)])
    assert outs[0].abs().max() == 0
    diffs = [outs]
    for _ in range(degree + 1):
        diffs.append(diffs[-1][1:] - diffs[-1][:-1])
    scale = outs.abs().max()
    assert diffs[degree].abs().max() > 1e-3 * scale  # degree N term is present
    assert diffs[degree + 1].abs().max() < 1e-9 * scale  # and nothing above it


def test_normalisation_keeps_activations_bounded_as_degree_grows():
    q, k, v = qkv(lq=10, scale=30.0)
    v = v * 30.0
    peaks = {}
    for normalize in (True, False):
        for degree in (1, 4, 8, 16):
            mech = build("polynomial", degree=degree, rank=8, normalize=normalize)
            out = call(mech, q, k, v)
            assert torch.isfinite(out).all()
            peaks[normalize, degree] = float(out.detach().norm(dim=-1).max())
            if normalize:  # ‖x_N‖ = √r exactly, so ‖out‖ ≤ ‖C‖₂ √r
                bound = torch.linalg.matrix_norm(mech.out_proj.detach(), ord=2).max() * math.sqrt(8)
                assert peaks[normalize, degree] <= bound * (1 + 1e-5)
    assert peaks[False, 16] > 100 * peaks[False, 1], peaks  # without it, degree blows up


def test_cross_causal_is_bottom_right_aligned():
    mech = build("polynomial")
    q, k, v = qkv(lq=3, lk=8)
    out = call(mech, q, k, v, causal=True)
    full = call(mech, q[:, :, -1:], k, v)
    torch.testing.assert_close(out[:, :, -1:], full)
    q, k, v = qkv(lq=8, lk=3)  # the first Lq - Lk queries see no key: zeros
    assert call(mech, q, k, v, causal=True)[:, :, :5].abs().max() == 0


@pytest.mark.parametrize("causal", [False, True])
def test_masking(causal):
    mech = build("polynomial")
    assert_padding_invariant(mech, causal=causal)
    assert_fully_padded_row_finite(mech, causal=causal)
    q, k, v = qkv(lq=6)
    out = call(mech, q, k, v, key_padding_mask=padding_mask(2, 6, [6, 0]), causal=causal)
    assert out[1].abs().max() == 0 and out[0].abs().max() > 0
    if causal:
        assert_causal(mech)


def test_gradients_and_bf16_autocast():
    mech = build("polynomial")
    assert_gradients_finite(mech)
    assert_gradients_finite(mech, causal=True, key_padding=True)
    assert mech.aux_loss is None
    q, k, v = (x.requires_grad_() for x in qkv(lq=13))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = mech(q, k, v, key_padding_mask=padding_mask(2, 13, [13, 9]), causal=True)
    out.float().square().mean().backward()
    assert torch.isfinite(out).all() and torch.isfinite(k.grad).all()
    assert mech.factors.grad is not None and torch.isfinite(mech.factors.grad).all()
