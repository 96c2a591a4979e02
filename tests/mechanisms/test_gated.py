import pytest
import torch
from mechanism_checks import (
    assert_causal,
    assert_fully_padded_row_finite,
    assert_gradients_finite,
    assert_padding_invariant,
    build,
    call,
    dense_attention_oracle,
    padding_mask,
    qkv,
)

from mechanisms.gated import gate_logits, sample_gates


def logits_of(mech, k):
    return gate_logits(k, mech.gate_w1, mech.gate_b1, mech.gate_w2, mech.gate_b2).detach()


def closed_bias(open_gates):
    """(B, H, Lk) open gates -> (B, H, 1, Lk) additive bias, -inf at closed keys."""
    return torch.zeros(open_gates.shape, dtype=torch.float64).masked_fill(~open_gates, float("-inf"))[:, :, None]


@pytest.mark.parametrize("training", [False, True])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("lq,lk", [(9, 9), (5, 11), (11, 5)])
def test_all_gates_open_is_softmax(training, causal, lq, lk):
    """gate_bias = 50 opens every gate (logistic noise is bounded by ±14), so this is softmax."""
    mech = build("gated", gate_bias=50.0).train(training)
    q, k, v = qkv(lq=lq, lk=lk)
    kpm = padding_mask(2, lk, [lk, max(lk - 3, 1)])
    for mask in (None, kpm):
        out = call(mech, q, k, v, key_padding_mask=mask, causal=causal)
        ref = dense_attention_oracle(q, k, v, key_padding_mask=mask, causal=causal)
        torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=1e-5)
        assert mech.metrics()["gate_density"] == 1.0


@pytest.mark.parametrize("causal", [False, True])
def test_eval_matches_softmax_over_open_keys(causal):
    mech = build("gated", gate_bias=0.0)  # about half the gates closed
    q, k, v = qkv(lq=10, lk=10)
    kpm = padding_mask(2, 10, [10, 7])
    open_gates = logits_of(mech, k) > 0  # (B, H, Lk)
    assert 0 < open_gates.float().mean() < 1
    out = call(mech, q, k, v, key_padding_mask=kpm, causal=causal)
    ref = dense_attention_oracle(q, k, v, key_padding_mask=kpm, causal=causal, bias=closed_bias(open_gates))
    torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=1e-5)
    real = (~kpm)[:, None, :].expand_as(open_gates)
    assert mech.metrics()["gate_density"] == pytest.approx(open_gates[real].float().mean().item())


def test_eval_is_deterministic():
    mech = build("gated", gate_bias=0.0)
    q, k, v = qkv(lq=12)
    torch.manual_seed(1)
    a = mech(q, k, v)
    torch.manual_seed(2)
    b = mech(q, k, v)
    torch.testing.assert_close(a, b, atol=0, rtol=0)


@pytest.mark.parametrize("training", [False, True])
def test_closed_keys_have_no_influence(training):
    """Changing the values of closed keys changes nothing (hard straight-through gates in training too)."""
    mech = build("gated", gate_bias=0.0).train(training)
    q, k, v = qkv(lq=10)
    torch.manual_seed(1234)  # the draw call() will make
    gates = sample_gates(logits_of(mech, k), training=training, temperature=0.5, straight_through=True).detach()
    closed = gates == 0  # (B, H, Lk)
    assert closed.any() and (~closed).any()
    out = call(mech, q, k, v)
    v2 = v.clone()
    v2[closed] = torch.randn(int(closed.sum()), v.shape[-1]) * 10
    out2 = call(mech, q, k, v2)
    torch.testing.assert_close(out, out2, atol=1e-6, rtol=1e-6)


def test_training_gates_are_stochastic():
    mech = build("gated", gate_bias=0.0).train()
    q, k, v = qkv(lq=16)
    torch.manual_seed(1)
    a = mech(q, k, v)
    torch.manual_seed(2)
    b = mech(q, k, v)
    assert (a - b).abs().max() > 1e-4


def test_all_gates_closed_gives_zeros_and_finite_gradients():
    mech = build("gated", gate_bias=-50.0)
    q, k, v = qkv(lq=8)
    out = call(mech, q, k, v)
    assert torch.isfinite(out).all() and out.abs().max() == 0
    assert mech.metrics()["gate_density"] == 0.0
    assert_gradients_finite(mech)


def test_aux_loss_is_sparsity_penalty_with_gradient_to_gate_network():
    mech = build("gated", sparsity_weight=0.5).train()
    q, k, v = qkv(lq=9)
    kpm = padding_mask(2, 9, [9, 4])
    call(mech, q, k, v, key_padding_mask=kpm)
    aux = mech.aux_loss
    assert aux is not None and aux.dim() == 0 and torch.isfinite(aux)
    probs = torch.sigmoid(logits_of(mech, k))
    real = (~kpm)[:, None, :].expand_as(probs)
    assert aux.item() == pytest.approx(0.5 * probs[real].mean().item(), rel=1e-5)
    assert mech.metrics()["gate_probability"] == pytest.approx(probs[real].mean().item(), rel=1e-5)
    aux.backward()
    for p in (mech.gate_w1, mech.gate_w2, mech.gate_b2):
        assert p.grad is not None and p.grad.abs().sum() > 0


@pytest.mark.parametrize("straight_through", [True, False])
def test_task_loss_trains_the_gates(straight_through):
    """The relaxed estimator passes the task-loss gradient to the gate network."""
    mech = build("gated", gate_bias=0.0, straight_through=straight_through).train()
    q, k, v = qkv(lq=9)
    call(mech, q, k, v, causal=True).square().sum().backward()
    assert mech.gate_w1.grad.abs().sum() > 0 and torch.isfinite(mech.gate_w1.grad).all()


def test_large_scores_stay_finite():
    mech = build("gated", gate_bias=0.0)
    q, k, v = qkv(lq=12, scale=30.0)
    assert_gradients_finite(mech)
    mech.train()
    q, k, v = (x.requires_grad_() for x in (q, k, v))
    out = mech(q, k, v, causal=True)
    (out.square().sum() + mech.aux_loss).backward()
    assert torch.isfinite(out).all() and all(torch.isfinite(x.grad).all() for x in (q, k, v))


def test_bf16_autocast_close_to_fp32():
    mech = build("gated", gate_bias=50.0)
    q, k, v = qkv(lq=13)
    ref = call(mech, q, k, v, causal=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = call(mech, q, k, v, causal=True)
    torch.testing.assert_close(out.float(), ref, atol=5e-2, rtol=5e-2)


def test_contract_checks():
    mech = build("gated")
    for causal in (False, True):
        assert_padding_invariant(mech, causal=causal)
        assert_fully_padded_row_finite(mech, causal=causal)
        assert_gradients_finite(mech, causal=causal, key_padding=True)
    assert_causal(mech)
    assert_causal(mech, length=13, t=12)
