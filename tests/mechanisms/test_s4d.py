import math

import pytest
import torch
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

from harness.core.attention import UnsupportedCapability
from mechanisms.s4d import s4d_kernel, s4d_kernel_reference


@pytest.mark.parametrize("length", [1, 2, 5, 16, 17, 300])
def test_blocked_vandermonde_equals_the_direct_kernel(length):
    mech = build("s4d", d_state=16, init="inv")
    params = [p.double() for p in (mech.log_dt, mech.log_a_real, mech.a_imag)]
    c = torch.view_as_complex(mech.c.double().contiguous())
    torch.testing.assert_close(
        s4d_kernel(*params, c, length), s4d_kernel_reference(*params, c, length), atol=1e-12, rtol=1e-10
    )
    c32 = torch.view_as_complex(mech.c.detach().contiguous())
    fast = s4d_kernel(mech.log_dt, mech.log_a_real, mech.a_imag, c32, length)
    torch.testing.assert_close(fast.double(), s4d_kernel_reference(*params, c, length), atol=1e-4, rtol=1e-4)


def recurrence(mech, v, *, causal):
    """The SSM run step by step in float64: x_t = Ā x_{t−1} + B̄ u_t, y_t = 2 Re(C x_t) + D u_t,
    plus (bidirectional, non-causal) the backward recurrence x'_t = Ā x'_{t+1} + B̄ u_{t+1}."""
    b, h, length, d = v.shape
    u = v.double().transpose(2, 3).reshape(b, h * d, length)
    dt = mech.log_dt.double().exp()
    a = torch.complex(-mech.log_a_real.double().exp(), mech.a_imag.double())
    a_bar = torch.exp(a * dt[:, None])  # (Ch, N/2)
    b_bar = (a_bar - 1) / a
    c = torch.view_as_complex(mech.c.double().contiguous())  # (S, Ch, N/2)
    y = u * mech.d.double()[:, None]
    x = torch.zeros(b, h * d, a.shape[-1], dtype=torch.complex128)
    for t in range(length):
        x = a_bar * x + b_bar * u[..., t, None]
        y[..., t] += 2 * (c[0] * x).sum(-1).real
    if mech.cfg.bidirectional and not causal:
        x = torch.zeros_like(x)
        for t in reversed(range(length - 1)):
            x = a_bar * x + b_bar * u[..., t + 1, None]
            y[..., t] += 2 * (c[1] * x).sum(-1).real
    if mech.cfg.activation == "gelu":
        y = torch.nn.functional.gelu(y)
    return y.reshape(b, h, d, length).transpose(2, 3)


@pytest.mark.parametrize("init", ["lin", "inv"])
@pytest.mark.parametrize("bidirectional", [True, False])
@pytest.mark.parametrize("causal", [False, True])
def test_fft_convolution_equals_the_recurrence_float64(init, bidirectional, causal):
    mech = build("s4d", d_state=8, init=init, bidirectional=bidirectional, dt_min=0.01, dt_max=0.5)
    q, k, v = qkv(lq=23, dtype=torch.float64)
    torch.testing.assert_close(
        call(mech, q, k, v, causal=causal), recurrence(mech, v, causal=causal), atol=1e-9, rtol=1e-9
    )
    q, k, v = qkv(lq=23)
    torch.testing.assert_close(
        call(mech, q, k, v, causal=causal).double(), recurrence(mech, v, causal=causal), atol=1e-4, rtol=1e-4
    )


def test_initialisations():
    lin = build("s4d", d_state=8, init="lin")
    inv = build("s4d", d_state=8, init="inv")
    n = torch.arange(4.0)
    torch.testing.assert_close(lin.a_imag[0], math.pi * n)
    torch.testing.assert_close(inv.a_imag[0], 8 / math.pi * (8 / (2 * n + 1) - 1))
    torch.testing.assert_close(lin.log_a_real.exp(), torch.full_like(lin.log_a_real, 0.5))
    assert lin.c.shape == (2, 16, 4, 2) and build("s4d", bidirectional=False).c.shape[0] == 1
    dt = lin.log_dt.exp()
    assert dt.min() >= 0.001 and dt.max() <= 0.1


def test_ignores_q_and_k_and_mixes_per_channel():
    mech = build("s4d")
    q, k, v = qkv(lq=11)
    out = call(mech, q, k, v)
    torch.testing.assert_close(call(mech, -q, k * 3, v), out, atol=0, rtol=0)
    v2 = v.clone()
    v2[:, 1, :, 3] += 1.0  # one channel of head 1
    moved = (call(mech, q, k, v2) - out).abs().amax(dim=(0, 2))  # (H, D)
    assert moved[1, 3] > 0 and moved.sum() == moved[1, 3]


def test_causal_with_large_magnitudes():
    mech = build("s4d")
    assert_causal(mech, length=17, t=9)
    q, k, v = qkv(lq=30)
    out = call(mech, q, k, v, causal=True)
    v2 = v.clone()
    v2[:, :, 20:] *= 1e4
    diff = (call(mech, q, k, v2, causal=True)[:, :, :20] - out[:, :, :20]).abs().max()
    # An FFT convolution is causal up to float32 round-off relative to the largest input
    # (here ~3e-8 of it); a real leak would be of the order of the tail itself.
    assert diff < 1e-6 * v2.abs().max(), float(diff)


@pytest.mark.parametrize("causal", [False, True])
def test_padding_values_and_amount_change_nothing(causal):
    mech = build("s4d")
    assert_padding_invariant(mech, lq=13, causal=causal)
    assert_fully_padded_row_finite(mech, causal=causal)
    q, k, v = qkv(lq=16)
    valid = 7
    long = call(mech, q, k, v, key_padding_mask=padding_mask(2, 16, [valid, valid]), causal=causal)
    short = call(
        mech, q[:, :, :9], k[:, :, :9], v[:, :, :9], key_padding_mask=padding_mask(2, 9, [valid, valid]), causal=causal
    )
    torch.testing.assert_close(long[:, :, :valid], short[:, :, :valid], atol=1e-5, rtol=1e-5)


def value_and_parameter_gradients(mech, *, causal):
    """Finite, nonzero gradients for v and every parameter; none for q, k (ignored inputs)."""
    mech.train()
    q, k, v = (x.requires_grad_() for x in qkv(lq=13))
    mech(q, k, v, key_padding_mask=padding_mask(2, 13, [13, 10]), causal=causal).square().mean().backward()
    assert q.grad is None and k.grad is None and mech.ignored_inputs == ("q", "k")
    assert torch.isfinite(v.grad).all() and v.grad.abs().sum() > 0
    for name, p in mech.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert name == "c" and causal and mech.cfg.bidirectional or p.grad.abs().sum() > 0, name


def test_gradients_subquadratic_and_refusals():
    value_and_parameter_gradients(build("s4d"), causal=False)
    value_and_parameter_gradients(build("s4d"), causal=True)
    assert_subquadratic(build("s4d", heads=1, dim_head=16), length=8192, heads=1, dim=16)
    q, k, v = qkv(lq=5, lk=8)
    with pytest.raises(UnsupportedCapability, match="'s4d' does not support cross attention"):
        build("s4d")(q, k, v)
    with pytest.raises(ValueError, match="init"):
        build("s4d", init="legs")
