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

from mechanisms.rela import blocked_relu_attention, relu_attention


def dense_relu_weights(q, k, *, key_padding_mask=None, causal=False):
    """ReLU(q·k/√d) over allowed pairs in float64, and the allowed mask (B, H, Lq, Lk)."""
    q, k = q.double(), k.double()
    lq, lk, d = q.shape[-2], k.shape[-2], q.shape[-1]
    scores = torch.einsum("bhid,bhjd->bhij", q, k) / d**0.5
    allowed = torch.ones(q.shape[0], 1, lq, lk, dtype=torch.bool)
    if causal:
        allowed = allowed & (torch.arange(lk)[None, :] <= torch.arange(lq)[:, None] + (lk - lq))
    if key_padding_mask is not None:
        allowed = allowed & ~key_padding_mask[:, None, None, :]
    weights = torch.where(allowed & (scores > 0), scores, torch.zeros_like(scores))
    return weights, allowed.expand_as(weights)


def authors_rela(q, k, v, mech, *, key_padding_mask=None, causal=False):
    """The authors' dot_attention + gated_rms_norm (bzhangGo/zero modules/rela.py), written
    out in float64 on the joined heads: o = combine_heads(W V) of width n = H·D, then
    scale ⊙ o · rsqrt(mean_n(o²) + ε) ⊙ σ(gate ⊙ o)."""
    weights, allowed = dense_relu_weights(q, k, key_padding_mask=key_padding_mask, causal=causal)
    mixed = torch.einsum("bhij,bhjd->bhid", weights, v.double())
    b, h, lq, d = mixed.shape
    o = mixed.permute(0, 2, 1, 3).reshape(b, lq, h * d)  # combine_heads
    scale = mech.norm_gain.detach().double().reshape(h * d)
    out = scale * o * torch.rsqrt(o.square().mean(-1, keepdim=True) + mech.cfg.norm_eps)
    if mech.gate is not None:
        out = out * torch.sigmoid(mech.gate.detach().double().reshape(h * d) * o)
    return out.reshape(b, lq, h, d).permute(0, 2, 1, 3), weights, allowed


def randomise(mech):
    with torch.no_grad():  # move the parameters off their init so they are really tested
        mech.norm_gain.uniform_(0.5, 1.5)
        if mech.gate is not None:
            mech.gate.normal_()
    return mech


@pytest.mark.parametrize("block_size", [0, 4, 256])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("lq,lk", [(9, 9), (5, 11), (11, 5)])
def test_matches_the_authors_formula(block_size, causal, lq, lk):
    """Fails on the per-head, query-gated norm: the norm and gate run over the joined heads."""
    mech = randomise(build("rela", heads=3, block_size=block_size))
    q, k, v = qkv(lq=lq, lk=lk, heads=3)
    kpm = padding_mask(2, lk, [lk, max(lk - 3, 1)])
    for mask in (None, kpm):
        out = call(mech, q, k, v, key_padding_mask=mask, causal=causal)
        ref, weights, allowed = authors_rela(q, k, v, mech, key_padding_mask=mask, causal=causal)
        torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=1e-5)
        share = ((weights == 0) & allowed).sum() / allowed.sum()
        assert mech.metrics()["sparsity"] == pytest.approx(float(share), abs=1e-6)
        assert 0.2 < float(share) < 0.95  # causal/padded zeros are not counted as sparsity


def test_heads_are_coupled_by_the_norm():
    """The norm over H·D couples the heads: changing head 1's values rescales head 0's output
    (and not with the per-head 'query_gate' variant)."""
    q, k, v = qkv(lq=8, heads=2)
    v2 = v.clone()
    v2[:, 1] *= 10
    coupled = build("rela", stabiliser="gate")
    out, out2 = call(coupled, q, k, v), call(coupled, q, k, v2)
    assert (out[:, 0] - out2[:, 0]).abs().max() > 1e-2
    per_head = build("rela", stabiliser="query_gate")
    torch.testing.assert_close(call(per_head, q, k, v)[:, 0], call(per_head, q, k, v2)[:, 0])


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("lq,lk", [(13, 13), (6, 13), (13, 6)])
def test_blocked_gradients_equal_the_plain_formula_in_float64(causal, lq, lk):
    q, k, v = qkv(lq=lq, lk=lk, dtype=torch.float64)
    kpm = padding_mask(2, lk, [lk, max(lk - 4, 1)])
    g = torch.randn(q.shape[:-1] + (v.shape[-1],), dtype=torch.float64)
    grads = []
    for fast in (False, True):
        x = [t.clone().requires_grad_() for t in (q, k, v)]
        if fast:
            out, _ = blocked_relu_attention(*x, key_padding_mask=kpm, causal=causal, block_size=4)
        else:
            out, _, _ = relu_attention(*x, key_padding_mask=kpm, causal=causal)
        (out * g).sum().backward()
        grads.append([t.grad for t in x] + [out.detach()])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-10)


def test_blocked_forward_keeps_nothing_quadratic_for_backward():
    """No (Lq, Lk) tensor is saved for backward: the saved tensors are q, k, v (and the mask)."""
    q, k, v = (t.requires_grad_() for t in qkv(batch=1, heads=1, lq=64, dim=4))
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
        blocked_relu_attention(q, k, v, block_size=16)
    assert max(saved) <= 64 * 4


def test_weights_are_not_normalised():
    q, k, v = qkv(lq=7)
    mixed, weights, allowed = relu_attention(q, k, v)
    expected = torch.relu(q @ k.transpose(-1, -2) / 8**0.5)
    assert allowed is None
    torch.testing.assert_close(weights, expected)
    torch.testing.assert_close(mixed, expected @ v)
    assert not torch.allclose(weights.sum(-1), torch.ones(()))
    mixed2, _ = blocked_relu_attention(2 * q, k, v, block_size=3)  # doubling the scores doubles the output
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


@pytest.mark.parametrize("stabiliser", ["init", "query_gate"])
def test_other_stabilisers(stabiliser):
    """'init': RMSNorm over H·D without a gate, gain starting at init_gain (so the output RMS
    over the joined heads is init_gain); 'query_gate': the earlier per-head variant."""
    mech = build("rela", stabiliser=stabiliser, init_gain=0.25)
    q, k, v = qkv(lq=10)
    out, out2 = call(mech, q, k, v), call(mech, q, k, 100 * v)  # the scale of v does not matter
    torch.testing.assert_close(out, out2, rtol=1e-4, atol=1e-4)
    if stabiliser == "init":
        assert mech.gate is None and mech.gate_weight is None
        rms = out.square().mean(dim=(1, 3)).sqrt()
        torch.testing.assert_close(rms, torch.full_like(rms, 0.25), rtol=1e-4, atol=0)
    else:
        assert mech.gate_weight.shape == (2, 8, 8)


def test_config_is_validated():
    with pytest.raises(ValueError, match="stabiliser"):
        build("rela", stabiliser="layernorm")
    with pytest.raises(ValueError, match="block_size"):
        build("rela", block_size=-1)


@pytest.mark.parametrize("causal", [False, True])
def test_masking(causal):
    mech = build("rela")
    assert_padding_invariant(mech, causal=causal)
    assert_padding_invariant(mech, lq=13, causal=causal)
    assert_fully_padded_row_finite(mech, causal=causal)
    q, k, v = qkv(lq=10)
    out = call(mech, q, k, v, key_padding_mask=padding_mask(2, 10, [10, 0]), causal=causal)
    assert out[1].abs().max() == 0


def test_causal_with_adversarial_magnitudes():
    assert_causal(build("rela", block_size=4))
    assert_causal(build("rela", block_size=5), length=13, t=3)
    mech = build("rela", block_size=4)
    q, k, v = qkv(lq=12)
    out = call(mech, q, k, v, causal=True)
    k2, v2 = k.clone(), v.clone()
    k2[:, :, 7:] *= 1e4  # huge future keys and values change nothing before them, in float32
    v2[:, :, 7:] *= 1e4
    torch.testing.assert_close(call(mech, q, k2, v2, causal=True)[:, :, :7], out[:, :, :7], rtol=0, atol=0)


@pytest.mark.parametrize("causal,key_padding", [(False, False), (True, True)])
def test_gradients_finite(causal, key_padding):
    mech = build("rela")
    assert_gradients_finite(mech, causal=causal, key_padding=key_padding)
    q, k, v = qkv(lq=9)
    mech(q, k, v).sum().backward()
    assert mech.gate.grad.abs().sum() > 0 and mech.norm_gain.grad.abs().sum() > 0


@pytest.mark.parametrize("length", [1, 5, 65, 100])
def test_any_length_fp32_and_bf16_autocast(length):
    mech = build("rela", block_size=32)
    q, k, v = qkv(lq=length)
    out = call(mech, q, k, v, causal=True)
    assert out.shape == q.shape and torch.isfinite(out).all()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = call(mech, q, k, v, causal=True)
    assert torch.isfinite(low).all()
    assert (low.float() - out).abs().max() < 0.1
