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

from mechanisms.rela import relu_attention


def dense_rela(q, k, v, mech, *, key_padding_mask=None, causal=False):
    """ReLA written out in float64: ReLU(q·k/√d) over allowed pairs, no normalisation,
    then g ⊙ x/√(mean x² + ε) ⊙ σ(q W_g + b_g). Returns (output, weights, allowed)."""
    q, k, v = q.double(), k.double(), v.double()
    lq, lk, d = q.shape[-2], k.shape[-2], q.shape[-1]
    scores = torch.einsum("bhid,bhjd->bhij", q, k) / d**0.5
    allowed = torch.ones(q.shape[0], 1, lq, lk, dtype=torch.bool)
    if causal:
        allowed = allowed & (torch.arange(lk)[None, :] <= torch.arange(lq)[:, None] + (lk - lq))
    if key_padding_mask is not None:
        allowed = allowed & ~key_padding_mask[:, None, None, :]
    weights = torch.where(allowed & (scores > 0), scores, torch.zeros_like(scores))
    mixed = torch.einsum("bhij,bhjd->bhid", weights, v)
    rms = (mixed.square().mean(-1, keepdim=True) + mech.cfg.norm_eps).sqrt()
    out = mixed / rms * mech.norm_gain.double()[None, :, None, :]
    if mech.gate_weight is not None:
        gate = torch.einsum("bhid,hde->bhie", q, mech.gate_weight.double()) + mech.gate_bias.double()[None, :, None]
        out = out * torch.sigmoid(gate)
    return out, weights, allowed.expand_as(weights)


@pytest.mark.parametrize("output_gate", [True, False])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("lq,lk", [(9, 9), (5, 11), (11, 5)])
def test_matches_dense_formula(output_gate, causal, lq, lk):
    mech = build("rela", output_gate=output_gate)
    with torch.no_grad():  # move the parameters off their init so they are really tested
        mech.norm_gain.uniform_(0.5, 1.5)
        if output_gate:
            mech.gate_bias.normal_()
    q, k, v = qkv(lq=lq, lk=lk)
    kpm = padding_mask(2, lk, [lk, max(lk - 3, 1)])
    for mask in (None, kpm):
        out = call(mech, q, k, v, key_padding_mask=mask, causal=causal)
        ref, weights, allowed = dense_rela(q, k, v, mech, key_padding_mask=mask, causal=causal)
        torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=1e-5)
        share = ((weights == 0) & allowed).sum() / allowed.sum()
        assert mech.metrics()["sparsity"] == pytest.approx(float(share), abs=1e-6)
        assert 0.2 < float(share) < 0.95  # causal/padded zeros are not counted as sparsity


def test_weights_are_not_normalised():
    q, k, v = qkv(lq=7)
    mixed, weights, allowed = relu_attention(q, k, v)
    expected = torch.relu(q @ k.transpose(-1, -2) / 8**0.5)
    assert allowed is None
    torch.testing.assert_close(weights, expected)
    torch.testing.assert_close(mixed, expected @ v)
    assert not torch.allclose(weights.sum(-1), torch.ones(()))
    mixed2, _, _ = relu_attention(2 * q, k, v)  # doubling the scores doubles the output
    torch.testing.assert_close(mixed2, 2 * mixed)


def test_heads_switch_off():
    """A query with no positive score gets exactly zero output (and no NaN)."""
    mech = build("rela")
    q, k, v = qkv(lq=6)
    q, k = q.abs(), k.abs()  # positive scores ...
    q[:, :, 0] = -q[:, :, 0]  # ... except for query 0: negative with every key
    out = call(mech, q, k, v)
    assert torch.isfinite(out).all()
    assert out[:, :, 0].abs().max() == 0 and out[:, :, 1:].abs().sum(-1).min() > 0


def test_rms_norm_without_gate_has_unit_rms():
    mech = build("rela", output_gate=False)
    assert mech.gate_weight is None
    q, k, v = qkv(lq=10)
    out = call(mech, q, k, v) * 100  # scale of v should not matter either
    out2 = call(mech, q, k, 100 * v) * 100
    torch.testing.assert_close(out.square().mean(-1), torch.full(out.shape[:-1], 1e4), rtol=1e-4, atol=0)
    torch.testing.assert_close(out, out2, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("causal", [False, True])
def test_masking(causal):
    mech = build("rela")
    assert_padding_invariant(mech, causal=causal)
    assert_padding_invariant(mech, lq=13, causal=causal)
    assert_fully_padded_row_finite(mech, causal=causal)
    q, k, v = qkv(lq=10)
    out = call(mech, q, k, v, key_padding_mask=padding_mask(2, 10, [10, 0]), causal=causal)
    assert out[1].abs().max() == 0


def test_causal():
    assert_causal(build("rela"))
    assert_causal(build("rela"), length=13, t=3)


@pytest.mark.parametrize("causal,key_padding", [(False, False), (True, True)])
def test_gradients_finite(causal, key_padding):
    mech = build("rela")
    assert_gradients_finite(mech, causal=causal, key_padding=key_padding)
    q, k, v = qkv(lq=9)
    mech(q, k, v).sum().backward()
    assert mech.gate_weight.grad.abs().sum() > 0 and mech.norm_gain.grad.abs().sum() > 0


@pytest.mark.parametrize("length", [1, 5, 65, 100])
def test_any_length_fp32_and_bf16_autocast(length):
    mech = build("rela")
    q, k, v = qkv(lq=length)
    out = call(mech, q, k, v, causal=True)
    assert out.shape == q.shape and torch.isfinite(out).all()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = call(mech, q, k, v, causal=True)
    assert torch.isfinite(low).all()
    assert (low.float() - out).abs().max() < 0.1
