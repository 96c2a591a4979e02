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
    dense_attention_oracle,
    padding_mask,
    qkv,
)
from torch.distributions import Gamma, Weibull

from harness.core.attention import allowed_mask
from mechanisms.bam import _block_noise, bam_attention, bam_reference, weibull_gamma_kl


def monte_carlo_kl(shape, scale, alpha, rate, samples, seed=0):
    """E_{x ~ Weibull}[log Weibull(x) − log Gamma(x)] per element, and its standard error."""
    torch.manual_seed(seed)
    post = Weibull(scale=scale, concentration=torch.full_like(scale, shape))
    prior = Gamma(concentration=alpha, rate=torch.full_like(alpha, rate))
    x = post.sample((samples,)).clamp_min(1e-300)
    log_ratio = post.log_prob(x) - prior.log_prob(x)
    return log_ratio.mean(0), log_ratio.std(0) / math.sqrt(samples)


@pytest.mark.parametrize("shape", [1.0, 3.0, 10.0])
def test_kl_closed_form_matches_monte_carlo(shape):
    scale = torch.tensor([0.05, 0.3, 1.0, 2.5], dtype=torch.float64)
    alpha = torch.tensor([0.1, 0.7, 1.0, 3.0], dtype=torch.float64)
    rate = 1.7
    closed = weibull_gamma_kl(shape, scale.log(), alpha, rate)
    mc, stderr = monte_carlo_kl(shape, scale, alpha, rate, samples=200_000)
    assert (closed - mc).abs().max() < 5 * stderr.max() + 1e-3, (closed, mc, stderr)


def test_registered_as_bam_not_as_belief_network():
    from harness.core.registry import get_mechanism, list_mechanisms

    assert "bam" in list_mechanisms() and "bayesian" not in list_mechanisms()
    assert "Bayesian attention modules" in get_mechanism("bam").doc


def reference_noise(seed, b, h, lq, lk, block, dtype=torch.float64):
    """The ε the fast path draws: a base seed from the global RNG, one generator per block."""
    torch.manual_seed(seed)
    base = int(torch.randint(0, 2**62, (1,)).item())
    blocks = [
        _block_noise(torch.empty(b, h, min(block, lq - s), lk, dtype=dtype), base + n)
        for n, s in enumerate(range(0, lq, block))
    ]
    return torch.cat(blocks, 2)


@pytest.mark.parametrize("sample", [False, True])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("lq,lk", [(10, 10), (6, 11), (11, 6)])
def test_blocked_fast_path_matches_the_plain_formula_float64(sample, causal, lq, lk):
    """Output, KL and every gradient of the blocked path equal the plain formula (same ε)."""
    b, h, d, block = 2, 2, 8, 4
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(b, h, n, d, generator=g, dtype=torch.float64) * 1.5 for n in (lq, lk, lk))
    prior = torch.randn(b, h, lk, generator=g, dtype=torch.float64)
    kpm = padding_mask(b, lk, [lk, max(lk - 4, 1)])
    inputs = [x.clone().requires_grad_() for x in (q, k, v, prior)]
    torch.manual_seed(7)
    out, kl, n = bam_attention(
        *inputs, key_padding_mask=kpm, causal=causal, shape=3.0, rate=2.0, sample=sample, query_block=block
    )
    (out.square().sum() + kl).backward()
    ref_inputs = [x.clone().requires_grad_() for x in (q, k, v, prior)]
    allowed = allowed_mask(lq, lk, key_padding_mask=kpm, causal=causal)
    noise = reference_noise(7, b, h, lq, lk, block) if sample else None
    ref_out, ref_kl, ref_n = bam_reference(*ref_inputs, allowed=allowed, shape=3.0, rate=2.0, noise=noise)
    (ref_out.square().sum() + ref_kl).backward()
    assert int(n) == int(ref_n)
    torch.testing.assert_close(out, ref_out, atol=1e-10, rtol=1e-9)
    torch.testing.assert_close(kl, ref_kl, atol=1e-9, rtol=1e-9)
    for x, y in zip(inputs, ref_inputs):
        torch.testing.assert_close(x.grad, y.grad, atol=1e-9, rtol=1e-8)


def reference_kl(mech, q, k, kpm, causal, samples):
    """Mean KL over allowed pairs, by Monte Carlo, from the model's definition: posterior mean
    p = softmax(qk/√d), prior mean π = softmax(g(k)) over allowed keys, α = β·π."""
    cfg = mech.cfg
    q, k = q.double(), k.double()
    allowed = allowed_mask(q.shape[-2], k.shape[-2], key_padding_mask=kpm, causal=causal)
    scores = torch.einsum("bhid,bhjd->bhij", q, k) / math.sqrt(q.shape[-1])
    allowed = (torch.ones_like(scores, dtype=torch.bool) if allowed is None else allowed).expand_as(scores)
    p = torch.softmax(scores.masked_fill(~allowed, -math.inf), -1)
    with torch.no_grad():
        prior_logits = mech.prior_logits(k.float()).double()[:, :, None, :]
    pi = torch.softmax(prior_logits.expand_as(scores).masked_fill(~allowed, -math.inf), -1)
    scale = p[allowed] / math.gamma(1 + 1 / cfg.weibull_shape)
    alpha = cfg.prior_rate * pi[allowed]
    mc, _ = monte_carlo_kl(cfg.weibull_shape, scale, alpha, cfg.prior_rate, samples)
    return cfg.kl_weight * mc.mean()


@pytest.mark.parametrize("causal", [False, True])
def test_aux_loss_matches_monte_carlo_kl(causal):
    mech = build("bam", weibull_shape=4.0, prior_rate=8.0, kl_weight=0.5)
    q, k, v = qkv(lq=7)
    kpm = padding_mask(2, 7, [7, 4])
    mech.train()
    call(mech, q, k, v, key_padding_mask=kpm, causal=causal)
    ref = reference_kl(mech, q, k, kpm, causal, samples=40_000)
    assert mech.aux_loss.dim() == 0
    torch.testing.assert_close(mech.aux_loss.double(), ref, rtol=0, atol=1e-3)  # MC error ~2e-4
    assert mech.metrics()["kl"] == pytest.approx(float(mech.aux_loss.detach()) / 0.5, rel=1e-5)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("lq,lk", [(9, 9), (5, 11), (11, 5)])
def test_eval_is_deterministic_softmax(causal, lq, lk):
    mech = build("bam")
    q, k, v = qkv(lq=lq, lk=lk)
    kpm = padding_mask(2, lk, [lk, max(lk - 3, 1)])
    for mask in (None, kpm):
        torch.manual_seed(1)
        out1 = mech(q, k, v, key_padding_mask=mask, causal=causal)
        torch.manual_seed(2)
        out2 = mech(q, k, v, key_padding_mask=mask, causal=causal)
        assert torch.equal(out1, out2)
        ref = dense_attention_oracle(q, k, v, key_padding_mask=mask, causal=causal)
        torch.testing.assert_close(out1.double(), ref, atol=1e-5, rtol=1e-5)


def test_training_samples_normalised_weights_that_concentrate_as_shape_grows():
    q, k, v = qkv(lq=10)
    kpm = padding_mask(2, 10, [10, 6])
    ref = dense_attention_oracle(q, k, v, key_padding_mask=kpm)
    errors = []
    for shape in (2.0, 20.0, 200.0, 2000.0):
        mech = build("bam", weibull_shape=shape).train()
        torch.manual_seed(1)
        a = mech(q, k, v, key_padding_mask=kpm)
        torch.manual_seed(2)
        b = mech(q, k, v, key_padding_mask=kpm)
        assert not torch.allclose(a, b), "training should sample attention weights"
        ones = mech(q, k, torch.ones_like(v), key_padding_mask=kpm)  # weights sum to 1
        torch.testing.assert_close(ones, torch.ones_like(ones))
        errors.append(float((a.double() - ref).abs().max()))
    assert all(e2 < e1 for e1, e2 in zip(errors, errors[1:])), errors
    assert errors[-1] < 5e-3, errors


@pytest.mark.parametrize("training", [False, True])
@pytest.mark.parametrize("causal", [False, True])
def test_masking(training, causal):
    mech = build("bam").train(training)
    assert_padding_invariant(mech, causal=causal)
    assert_fully_padded_row_finite(mech, causal=causal)
    q, k, v = qkv(lq=6)
    out = call(mech, q, k, v, key_padding_mask=padding_mask(2, 6, [6, 0]), causal=causal)
    assert out[1].abs().max() == 0
    if causal:
        assert_causal(mech)


def test_causal_with_adversarial_magnitudes_float32():
    mech = build("bam").train()
    q, k, v = qkv(lq=12, scale=30.0)
    out = call(mech, q, k, v, causal=True)
    q2, k2, v2 = q.clone(), k.clone(), v.clone()
    for x in (q2, k2, v2):
        x[:, :, 7:] = torch.randn_like(x[:, :, 7:]) * 300
    out2 = call(mech, q2, k2, v2, causal=True)
    assert torch.isfinite(out).all() and torch.isfinite(out2).all()
    torch.testing.assert_close(out[:, :, :7], out2[:, :, :7], atol=1e-5, rtol=1e-4)


def test_gradients_reach_inputs_and_prior():
    mech = build("bam")
    assert_gradients_finite(mech)
    assert_gradients_finite(mech, causal=True, key_padding=True)
    mech.train()
    q, k, v = qkv(lq=8)
    call(mech, q, k, v, key_padding_mask=padding_mask(2, 8, [8, 5]))
    mech.aux_loss.backward()
    assert mech.prior_in.weight.grad.abs().sum() > 0, "the KL should train the contextual prior"


def test_bf16_autocast():
    mech = build("bam").train()
    q, k, v = (x.requires_grad_() for x in qkv(lq=13))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = mech(q, k, v, key_padding_mask=padding_mask(2, 13, [13, 9]), causal=True)
        loss = out.float().square().mean() + mech.aux_loss
    loss.backward()
    assert torch.isfinite(out.float()).all() and torch.isfinite(q.grad).all()
