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

from harness.core.attention import allowed_mask
from mechanisms.gated import blocked_gated_attention, gate_logits, gated_attention, sample_gates


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


@pytest.mark.parametrize("soft", [False, True])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("lq,lk", [(13, 13), (6, 13), (13, 6)])
def test_blocked_path_equals_the_plain_formula_in_float64(soft, causal, lq, lk):
    """Outputs and gradients (q, k, v and the gates, closed ones included) of the blocked
    recomputing path equal autograd through the plain formula, with padding and a query row
    whose every key is closed."""
    q, k, v = qkv(lq=lq, lk=lk, dtype=torch.float64, scale=2.0)
    g = torch.Generator().manual_seed(3)
    gates = torch.rand(2, 2, lk, generator=g, dtype=torch.float64)
    gates = gates if soft else (gates > 0.4).double()
    gates[1, 1] = 0.0  # a head with every gate closed
    kpm = padding_mask(2, lk, [lk, max(lk - 4, 1)])
    grad = torch.randn(2, 2, lq, 8, generator=g, dtype=torch.float64)
    results = []
    for fast in (False, True):
        x = [t.clone().requires_grad_() for t in (q, k, v, gates)]
        if fast:
            out = blocked_gated_attention(*x, key_padding_mask=kpm, causal=causal, block_size=4)
        else:
            allowed = allowed_mask(lq, lk, key_padding_mask=kpm, causal=causal)
            out = gated_attention(*x, allowed=allowed)
        (out * grad).sum().backward()
        results.append([out.detach()] + [t.grad for t in x])
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-8)
    assert results[1][4][0].abs().sum() > 0  # closed gates get a gradient too


def test_blocked_path_keeps_nothing_quadratic_for_backward():
    q, k, v = (t.requires_grad_() for t in qkv(batch=1, heads=1, lq=64, dim=4))
    gates = torch.ones(1, 1, 64, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
        blocked_gated_attention(q, k, v, gates, block_size=16)
    assert max(saved) <= 64 * 4


def test_module_fast_and_plain_paths_agree():
    q, k, v = qkv(lq=11)
    kpm = padding_mask(2, 11, [11, 7])
    fast, plain = build("gated", gate_bias=0.0), build("gated", gate_bias=0.0, block_size=0)
    for causal in (False, True):
        torch.testing.assert_close(
            call(fast, q, k, v, key_padding_mask=kpm, causal=causal),
            call(plain, q, k, v, key_padding_mask=kpm, causal=causal),
            atol=1e-6,
            rtol=1e-5,
        )
