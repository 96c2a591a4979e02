import pytest
import torch
from mechanism_checks import (
    assert_causal,
    assert_padding_invariant,
    build,
    call,
    dense_attention_oracle,
    padding_mask,
    qkv,
)


def oracle_with_logits(v, logits, **kwargs):
    """softmax(logits) v through the float64 oracle: zero queries, the logits as the bias."""
    b, h, l, d = v.shape  # noqa: E741
    zeros = torch.zeros(b, h, logits.shape[-2], d, dtype=torch.float64)
    return dense_attention_oracle(zeros, torch.zeros_like(v), v, bias=logits, **kwargs)


@pytest.mark.parametrize("causal", [False, True])
def test_random_mode_is_softmax_of_the_learned_matrix(causal):
    mech = build("synthesizer", mode="random", max_len=20).double()
    q, k, v = qkv(lq=13, dtype=torch.float64)
    kpm = padding_mask(2, 13, [13, 8])
    out = call(mech, q, k, v, key_padding_mask=kpm, causal=causal)
    ref = oracle_with_logits(v, mech.random[None, :, :13, :13].detach(), key_padding_mask=kpm, causal=causal)
    torch.testing.assert_close(out, ref)


@pytest.mark.parametrize("causal", [False, True])
def test_dense_mode_is_softmax_of_the_mlp_logits(causal):
    mech = build("synthesizer", mode="dense", max_len=20, hidden=5).double()
    q, k, v = qkv(lq=13, dtype=torch.float64)
    kpm = padding_mask(2, 13, [13, 8])
    out = call(mech, q, k, v, key_padding_mask=kpm, causal=causal)
    w1, b1, w2, b2 = (p.detach() for p in (mech.w1, mech.b1, mech.w2, mech.b2))
    hidden = torch.relu(torch.einsum("bhid,hde->bhie", q, w1) + b1[:, None, :])
    logits = (hidden @ w2 + b2)[..., :13]
    torch.testing.assert_close(out, oracle_with_logits(v, logits, key_padding_mask=kpm, causal=causal))


def test_add_dot_product_mixes_in_softmax_scores():
    mech = build("synthesizer", mode="random", max_len=16, add_dot_product=True).double()
    q, k, v = qkv(lq=11, dtype=torch.float64)
    out = call(mech, q, k, v, causal=True)
    torch.testing.assert_close(
        out, dense_attention_oracle(q, k, v, causal=True, bias=mech.random[None, :, :11, :11].detach())
    )


@pytest.mark.parametrize("mode", ["dense", "random"])
def test_ignored_inputs_have_no_influence_and_zero_gradient(mode):
    """Synthesized weights never look at keys (random: nor at queries)."""
    mech = build("synthesizer", mode=mode).train()
    q, k, v = (x.requires_grad_() for x in qkv(lq=10))
    out = mech(q, k, v)
    out.square().mean().backward()
    assert torch.equal(k.grad, torch.zeros_like(k))
    assert v.grad.abs().sum() > 0
    if mode == "random":
        assert torch.equal(q.grad, torch.zeros_like(q))
        torch.testing.assert_close(call(mech, q.detach() * 5, k.detach(), v.detach()), out.detach(), rtol=0, atol=0)
    else:
        assert q.grad.abs().sum() > 0


def test_fixed_random_is_not_trained():
    assert not build("synthesizer", mode="random", trainable_random=False).random.requires_grad


@pytest.mark.parametrize("mode", ["dense", "random"])
def test_causal_and_padding(mode):
    mech = build("synthesizer", mode=mode)
    assert_causal(mech, length=17, t=9)
    assert_padding_invariant(mech, lq=17, causal=True)


def test_errors_name_the_fix():
    with pytest.raises(ValueError, match="valid: dense, random"):
        build("synthesizer", mode="factorized")
    q, k, v = qkv(lq=70)
    with pytest.raises(ValueError, match="max_len >= 70"):
        build("synthesizer", max_len=64)(q, k, v)
