import pytest
import torch
from mechanism_checks import (
    assert_fully_padded_row_finite,
    assert_padding_invariant,
    assert_subquadratic,
    build,
    call,
    padding_mask,
    qkv,
)

from harness.core.attention import UnsupportedCapability
from mechanisms.fnet import fourier_mix_reference


@pytest.mark.parametrize("norm", ["ortho", "backward"])
@pytest.mark.parametrize("fft_length", ["max_len", "input"])
def test_matches_explicit_dft_float64(norm, fft_length):
    mech = build("fnet", max_len=20, norm=norm, fft_length=fft_length)
    q, k, v = qkv(lq=13, dtype=torch.float64)
    n = 20 if fft_length == "max_len" else 13
    torch.testing.assert_close(call(mech, q, k, v), fourier_mix_reference(v, fft_length=n, norm=norm))


def test_hidden_fft_mixes_across_heads_and_ignores_q_k():
    mech = build("fnet", heads=2)
    q, k, v = qkv(lq=9)
    out = call(mech, q, k, v)
    torch.testing.assert_close(call(mech, q * 5 + 1, -k, v), out, atol=0, rtol=0)
    v2 = v.clone()
    v2[:, 1] += 1.0  # change only head 1's values
    assert not torch.allclose(call(mech, q, k, v2)[:, 0], out[:, 0])  # head 0's output moves too


def test_outputs_do_not_depend_on_the_amount_of_padding():
    """With the DFT over max_len, an example padded to 9 or to 16 gives the same outputs at its
    real positions (fft_length='input' would not)."""
    mech = build("fnet", max_len=32)
    q, k, v = qkv(lq=16)
    valid = 7
    kpm16 = padding_mask(2, 16, [valid, valid])
    kpm9 = padding_mask(2, 9, [valid, valid])
    long = call(mech, q, k, v, key_padding_mask=kpm16)
    short = call(mech, q[:, :, :9], k[:, :, :9], v[:, :, :9], key_padding_mask=kpm9)
    torch.testing.assert_close(long[:, :, :valid], short[:, :, :valid], atol=1e-5, rtol=1e-5)
    loose = build("fnet", max_len=32, fft_length="input")
    a = call(loose, q, k, v.masked_fill(kpm16[:, None, :, None], 0))[:, :, :valid]
    b = call(loose, q[:, :, :9], k[:, :, :9], v[:, :, :9].masked_fill(kpm9[:, None, :, None], 0))[:, :, :valid]
    assert not torch.allclose(a, b, atol=1e-3)


def test_padding():
    mech = build("fnet")
    assert_padding_invariant(mech, lq=13)
    assert_fully_padded_row_finite(mech)
    q, k, v = qkv(lq=10)
    assert call(mech, q, k, v, key_padding_mask=padding_mask(2, 10, [10, 0]))[1].abs().max() == 0


def test_refusals_and_subquadratic():
    q, k, v = qkv(lq=8)
    with pytest.raises(UnsupportedCapability, match="'fnet' does not support causal attention"):
        build("fnet")(q, k, v, causal=True)
    with pytest.raises(ValueError, match="max_len"):
        build("fnet", max_len=4)(q, k, v)
    with pytest.raises(ValueError, match="fft_length"):
        build("fnet", fft_length="input")(q, k, v, key_padding_mask=padding_mask(2, 8, [8, 5]))
    with pytest.raises(ValueError, match="norm"):
        build("fnet", norm="forward")
    assert not list(build("fnet").parameters())
    assert_subquadratic(build("fnet", max_len=8192), length=8192, heads=1, dim=16)


def test_gradients_reach_v_only():
    mech = build("fnet").train()
    q, k, v = (x.requires_grad_() for x in qkv(lq=13))
    mech(q, k, v, key_padding_mask=padding_mask(2, 13, [13, 9])).square().mean().backward()
    assert q.grad is None and k.grad is None and mech.ignored_inputs == ("q", "k")
    assert torch.isfinite(v.grad).all() and v.grad.abs().sum() > 0
    assert v.grad[1, :, 9:].abs().max() == 0  # padded values are zeroed before the FFT
