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

import mechanisms.adaptive as adaptive
from harness.core.attention import UnsupportedCapability

WINDOW, RAMP = 4, 2


def dense_adaptive(mech, q, k, v, *, key_padding_mask=None, causal=False):
    """The module docstring's formula in float64 with explicit (L, L) visibility matrices:
    out_i = g·C_i + (1 − g)·P_i, each branch 0 for a query that sees no key through it."""
    q, k, v = q.double(), k.double(), v.double()
    length, dim = q.shape[-2], q.shape[-1]
    landmarks = mech.landmarks.detach().double()  # (H, r, D)
    gate = torch.sigmoid(mech.gate_logit.detach().double())[None, :, None, None]
    span = mech.spans().detach().double()[None, :, None, None]  # z_h
    i, j = torch.arange(length)[:, None], torch.arange(length)[None, :]
    sees = torch.ones(q.shape[0], 1, length, length, dtype=torch.bool)  # query i sees key j
    if causal:
        sees = sees & (j <= i)
    if key_padding_mask is not None:
        sees = sees & ~key_padding_mask[:, None, None, :]

    # content: per query i, r slots pooled over the keys it sees, then softmax over slots
    cap = adaptive.POOL_LOGIT_CAP
    pool = cap * torch.tanh(torch.einsum("hmd,bhjd->bhmj", landmarks, k) / math.sqrt(dim) / cap)  # (B, H, r, L)
    pool = pool[:, :, None].expand(-1, -1, length, -1, -1).masked_fill(~sees[:, :, :, None], -math.inf)
    pool_w = torch.softmax(pool, -1).nan_to_num(0.0)  # (B, H, Lq, r, Lk), rows with no key -> 0
    k_slot, v_slot = pool_w @ k[:, :, None], pool_w @ v[:, :, None]  # (B, H, Lq, r, D)
    slot_w = torch.softmax(torch.einsum("bhid,bhimd->bhim", q, k_slot) / math.sqrt(dim), -1)
    content = torch.einsum("bhim,bhimd->bhid", slot_w, v_slot) * sees.any(-1)[..., None]

    # pattern: local window |i − j| < W, soft span s(|i − j|), relative bias b(i − j)
    dist = i - j
    bias = mech.rel_bias.detach().double()[:, (dist + WINDOW - 1).clamp(0, 2 * WINDOW - 2)]  # (H, L, L)
    soft = ((RAMP + span - dist.abs()) / RAMP).clamp(0, 1) * (dist.abs() < WINDOW)  # (1, H, L, L)
    logits = torch.einsum("bhid,bhjd->bhij", q, k) / math.sqrt(dim) + bias
    weights = torch.exp(logits - logits.amax(-1, keepdim=True)) * soft * sees
    local = weights @ v / weights.sum(-1, keepdim=True).clamp_min(1e-300)
    return gate * content + (1 - gate) * local


def build_adaptive(**overrides):
    cfg = {"num_landmarks": 3, "max_span": WINDOW, "span_ramp": RAMP, **overrides}
    mech = build("adaptive", **cfg)
    with torch.no_grad():  # move every parameter off its init so each one is tested
        mech.rel_bias.normal_()
        mech.gate_logit.copy_(torch.tensor([-0.7, 1.2]))
        mech.span_logit.copy_(torch.tensor([-1.0, 0.8]))
    return mech


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("length", [1, 5, 12, 13])
def test_matches_dense_reference_of_the_documented_formula(causal, length):
    mech = build_adaptive()
    q, k, v = qkv(lq=length, dtype=torch.float64)
    kpm = padding_mask(2, length, [length, max(length - 4, 1)])
    for mask in (None, kpm):
        out = call(mech, q, k, v, key_padding_mask=mask, causal=causal)
        ref = dense_adaptive(mech, q, k, v, key_padding_mask=mask, causal=causal)
        assert out.dtype == torch.float64
        torch.testing.assert_close(out, ref, atol=1e-10, rtol=1e-9)
    q, k, v = qkv(lq=length)  # float32 inputs: the mechanism works in float32
    out32 = call(mech, q, k, v, key_padding_mask=kpm, causal=causal)
    ref = dense_adaptive(mech, q, k, v, key_padding_mask=kpm, causal=causal)
    assert out32.dtype == torch.float32
    torch.testing.assert_close(out32.double(), ref, atol=1e-5, rtol=1e-4)


def test_gates_and_spans_are_metrics_and_mean_what_they_say():
    mech = build_adaptive()
    metrics = mech.metrics()
    gates = torch.sigmoid(torch.tensor([-0.7, 1.2]))
    spans = (WINDOW - RAMP) * torch.sigmoid(torch.tensor([-1.0, 0.8]))
    for h in range(2):
        assert metrics[f"gate_head{h}"] == pytest.approx(float(gates[h]))
        assert metrics[f"span_head{h}"] == pytest.approx(float(spans[h]))
    assert metrics["gate_mean"] == pytest.approx(float(gates.mean()))
    assert metrics["span_mean"] == pytest.approx(float(spans.mean()))
    # g → 0: a local head sees nothing at distance ≥ R + z (its learned span), however big the change
    q, k, v = qkv(lq=12)
    with torch.no_grad():
        mech.gate_logit.fill_(-60.0)
        mech.span_logit.copy_(torch.tensor([-3.0, -2.0]))  # z ≈ 0.09, 0.24 tokens: reach R + z < 3 < W
    reach = math.ceil(RAMP + float(mech.spans().detach().max()))
    assert reach == 3 < WINDOW
    out = call(mech, q, k, v)

    def changed_beyond(distance):
        k2, v2 = k.clone(), v.clone()
        for x in (k2, v2):
            x[:, :, 6 + distance :] = 100.0
            x[:, :, : 6 - distance + 1] = 100.0
        return call(mech, q, k2, v2)[:, :, 6]

    torch.testing.assert_close(out[:, :, 6], changed_beyond(reach), atol=1e-6, rtol=1e-5)
    assert not torch.allclose(out[:, :, 6], changed_beyond(reach - 1))  # inside the span it does matter
    # g → 1: a global content head does see far-away keys
    with torch.no_grad():
        mech.gate_logit.fill_(60.0)
    assert not torch.allclose(call(mech, q, k, v)[:, :, 6], changed_beyond(reach))


def test_causal_and_padding():
    mech = build_adaptive()
    assert_causal(mech)
    assert_causal(mech, length=13, t=3)
    for causal in (False, True):
        assert_padding_invariant(mech, causal=causal)
        assert_padding_invariant(mech, lq=13, causal=causal)
        assert_fully_padded_row_finite(mech, causal=causal)
        q, k, v = qkv(lq=10)
        assert call(mech, q, k, v, key_padding_mask=padding_mask(2, 10, [10, 0]), causal=causal)[1].abs().max() == 0


def test_gradients_reach_gates_spans_landmarks_and_bias():
    mech = build_adaptive()
    assert_gradients_finite(mech)
    assert_gradients_finite(mech, causal=True, key_padding=True)
    mech.zero_grad()
    q, k, v = qkv(lq=13)
    call(mech, q, k, v, causal=True).square().mean().backward()
    for name in ("gate_logit", "span_logit", "landmarks", "rel_bias"):
        grad = getattr(mech, name).grad
        assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0, name


def test_span_penalty_is_the_aux_loss():
    mech = build_adaptive(span_penalty=0.3)
    q, k, v = qkv(lq=9)
    call(mech, q, k, v)
    expected = 0.3 * mech.spans().mean() / WINDOW
    torch.testing.assert_close(mech.aux_loss, expected)
    mech.aux_loss.backward()
    assert mech.span_logit.grad.abs().sum() > 0
    no_penalty = build_adaptive()
    call(no_penalty, q, k, v)
    assert no_penalty.aux_loss is None


def test_long_inputs_bf16_and_unsupported_calls():
    mech = build("adaptive")  # defaults: 16 landmarks, window 32
    q, k, v = qkv(lq=70)
    out = call(mech, q, k, v, causal=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = call(mech, q, k, v, causal=True)
    assert torch.isfinite(out).all() and torch.isfinite(low).all()
    assert (low.float() - out).abs().max() < 0.1
    q2, k2, v2 = qkv(lq=5, lk=8)
    with pytest.raises(UnsupportedCapability, match=r"'adaptive' does not support cross attention \(Lq=5, Lk=8\)"):
        mech(q2, k2, v2)
    for bad, says in (
        ({"span_ramp": 32}, "1 <= span_ramp < max_span"),
        ({"num_landmarks": 0}, "num_landmarks >= 1"),
        ({"gate_init": 1.0}, r"gate_init and span_init in \(0, 1\)"),
    ):
        with pytest.raises(ValueError, match=says):
            build("adaptive", **bad)
