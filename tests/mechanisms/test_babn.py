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
    largest_intermediate,
    padding_mask,
    qkv,
)
from torch.distributions import Gamma, Weibull

from harness.core.attention import allowed_mask
from mechanisms.babn import babn_attention, babn_reference, layer_noise
from mechanisms.bam import bam_reference, weibull_gamma_kl


def monte_carlo_kl(shape, scale, alpha, rate, samples, seed=0):
    """E_{x ~ Weibull}[log Weibull(x) − log Gamma(x)] per element, and its standard error."""
    torch.manual_seed(seed)
    post = Weibull(scale=scale, concentration=torch.full_like(scale, shape))
    prior = Gamma(concentration=alpha, rate=torch.full_like(alpha, rate))
    x = post.sample((samples,)).clamp_min(1e-300)
    log_ratio = post.log_prob(x) - prior.log_prob(x)
    return log_ratio.mean(0), log_ratio.std(0) / math.sqrt(samples)


@pytest.mark.parametrize("shape", [1.5, 10.0])
def test_weibull_gamma_kl_closed_form_matches_monte_carlo_float64(shape):
    scale = torch.tensor([0.02, 0.3, 1.0, 2.5], dtype=torch.float64)
    alpha = torch.tensor([0.05, 0.7, 1.0, 3.0], dtype=torch.float64)  # small α: the lower layers' shapes
    closed = weibull_gamma_kl(shape, scale.log(), alpha, 1.3)
    mc, stderr = monte_carlo_kl(shape, scale, alpha, 1.3, samples=100_000)
    assert (closed - mc).abs().max() < 5 * stderr.max() + 1e-3, (closed, mc, stderr)


def params(n_layers, heads, *, seed=0, identity=False, dtype=torch.float64):
    """Cumulative temperatures τ̄ (T, H) with τ̄_1 = 1, and gates ω (T−1, H)."""
    g = torch.Generator().manual_seed(seed)
    log_t = torch.zeros(n_layers, heads, dtype=dtype)
    if not identity:
        log_t[1:] = torch.randn(n_layers - 1, heads, generator=g, dtype=dtype) * 0.5
    gates = torch.rand(n_layers - 1, heads, generator=g, dtype=dtype) * 0.8 + 0.1
    return torch.exp(torch.cumsum(log_t, 0)), gates


def reference_noise(seed, b, h, lq, lk, block, n_layers, dtype=torch.float64):
    """The draws the fast path makes: a base seed from the global RNG, one generator per block."""
    torch.manual_seed(seed)
    base = int(torch.randint(0, 2**62, (1,)).item())
    blocks = [
        layer_noise(torch.empty(b, h, min(block, lq - s), lk, dtype=dtype), base + n, n_layers)
        for n, s in enumerate(range(0, lq, block))
    ]
    return [torch.cat([blk[layer] for blk in blocks], 2) for layer in range(n_layers)]


@pytest.mark.parametrize("sample", [False, True])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("lq,lk", [(10, 10), (6, 11), (11, 6)])
def test_blocked_fast_path_matches_the_plain_formula_float64(sample, causal, lq, lk):
    """Output, every layer's KL and every gradient (q, k, v, prior, temperatures, gates) of the
    blocked, checkpointed path equal the plain formula with the same draws."""
    b, h, d, block, n_layers = 2, 2, 8, 4, 3
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(b, h, n, d, generator=g, dtype=torch.float64) * 1.5 for n in (lq, lk, lk))
    prior = torch.randn(b, h, lk, generator=g, dtype=torch.float64)
    temps, gates = params(n_layers, h)
    kpm = padding_mask(b, lk, [lk, max(lk - 4, 1)])
    inputs = [x.clone().requires_grad_() for x in (q, k, v, prior, temps, gates)]
    torch.manual_seed(7)
    out, kl, n = babn_attention(
        *inputs, key_padding_mask=kpm, causal=causal, shape=3.0, rate=2.0, sample=sample, query_block=block
    )
    (out.square().sum() + (kl * torch.tensor([1.0, 0.5, 0.25], dtype=torch.float64)).sum()).backward()
    ref_inputs = [x.clone().requires_grad_() for x in (q, k, v, prior, temps, gates)]
    allowed = allowed_mask(lq, lk, key_padding_mask=kpm, causal=causal)
    noise = reference_noise(7, b, h, lq, lk, block, n_layers) if sample else None
    ref_out, ref_kl, ref_n = babn_reference(*ref_inputs, allowed=allowed, shape=3.0, rate=2.0, noise=noise)
    (ref_out.square().sum() + (ref_kl * torch.tensor([1.0, 0.5, 0.25], dtype=torch.float64)).sum()).backward()
    assert int(n) == int(ref_n)
    assert kl.shape == (n_layers,) and torch.isfinite(kl).all()
    torch.testing.assert_close(out, ref_out, atol=1e-10, rtol=1e-9)
    torch.testing.assert_close(kl, ref_kl, atol=1e-9, rtol=1e-9)
    for x, y in zip(inputs, ref_inputs):
        torch.testing.assert_close(x.grad, y.grad, atol=1e-9, rtol=1e-8)


@pytest.mark.parametrize("sample", [False, True])
def test_one_layer_is_bam(sample):
    """With T = 1 the network is BAM: same output and KL as bam_reference, same draws."""
    q, k, v = qkv(lq=9, dtype=torch.float64)
    prior = torch.randn(2, 2, 9, dtype=torch.float64)
    allowed = allowed_mask(9, 9, key_padding_mask=padding_mask(2, 9, [9, 5]), causal=True)
    noise = torch.log(-torch.log(torch.rand(2, 2, 9, 9, dtype=torch.float64))) if sample else None
    temps, gates = params(1, 2)
    out, kl, n = babn_reference(
        q, k, v, prior, temps, gates, allowed=allowed, shape=4.0, rate=3.0, noise=None if noise is None else [noise]
    )
    bam_out, bam_kl, bam_n = bam_reference(q, k, v, prior, allowed=allowed, shape=4.0, rate=3.0, noise=noise)
    torch.testing.assert_close(out, bam_out, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(kl[0], bam_kl, atol=1e-10, rtol=1e-10)
    assert int(n) == int(bam_n)


def test_the_layer_kl_is_the_weibull_gamma_kl_given_the_layer_above():
    """Layer l's KL is KL(Weibull(k, λ_l) ‖ Gamma(β W_{l+1}, β)) with W_{l+1} the draw of the
    layer above, λ_l = p_l^{1−ω} W_{l+1}^ω / Γ(1 + 1/k): checked by Monte Carlo for T = 2."""
    q, k, v = qkv(batch=1, heads=1, lq=3, lk=4, dtype=torch.float64)
    prior = torch.zeros(1, 1, 4, dtype=torch.float64)
    temps, gates = params(2, 1, seed=2)
    shape, rate = 2.0, 1.5
    noise = [torch.log(-torch.log(torch.rand(1, 1, 3, 4, dtype=torch.float64))) for _ in range(2)]
    allowed = torch.ones(1, 1, 3, 4, dtype=torch.bool)
    _, kl, _ = babn_reference(q, k, v, prior, temps, gates, allowed=allowed, shape=shape, rate=rate, noise=noise)
    s = torch.einsum("bhid,bhjd->bhij", q, k) / math.sqrt(8)
    g1 = math.gamma(1 + 1 / shape)
    lam2 = torch.softmax(temps[1, 0] * s, -1) / g1
    w2 = lam2 * torch.exp(noise[1] / shape)  # the top layer's draw
    lam1 = torch.softmax(s, -1) ** (1 - gates[0, 0]) * w2 ** gates[0, 0] / g1
    mc1, err1 = monte_carlo_kl(shape, lam1.flatten(), (rate * w2).flatten(), rate, samples=200_000)
    mc2, err2 = monte_carlo_kl(shape, lam2.flatten(), torch.full((12,), rate / 4, dtype=torch.float64), rate, 200_000)
    assert abs(float(kl[0]) - float(mc1.sum())) < 5 * float(err1.norm()) + 1e-3
    assert abs(float(kl[1]) - float(mc2.sum())) < 5 * float(err2.norm()) + 1e-3


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("lq,lk", [(9, 9), (5, 11), (11, 5)])
def test_eval_is_deterministic_and_softmax_at_unit_temperatures(causal, lq, lk):
    """Evaluation propagates the posterior means downward (no draws): two calls are equal, and
    with every upward temperature 1 (the init) the output is softmax attention at any depth."""
    mech = build("babn", num_layers=3)
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


def test_eval_uses_the_upper_layers_when_they_are_trained():
    """Away from unit temperatures the evaluation output is the plain formula's mean-field pass,
    and no longer softmax: the upper layers shape the deterministic attention too."""
    mech = build("babn", num_layers=3)
    with torch.no_grad():
        mech.log_temperature.copy_(torch.tensor([[0.7, -0.5], [-0.6, 0.4]]))
        mech.gate_logit.copy_(torch.tensor([[0.3, -1.0], [1.2, 0.1]]))
    q, k, v = qkv(lq=8)
    kpm = padding_mask(2, 8, [8, 5])
    out = call(mech, q, k, v, key_padding_mask=kpm, causal=True)
    with torch.no_grad():
        ref, _, _ = babn_reference(
            q.double(),
            k.double(),
            v.double(),
            mech.prior_logits(k).double(),
            mech.temperatures().double(),
            mech.gates().double(),
            allowed=allowed_mask(8, 8, key_padding_mask=kpm, causal=True),
            shape=10.0,
            rate=1.0,
            noise=None,
        )
    torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=1e-5)
    softmax = dense_attention_oracle(q, k, v, key_padding_mask=kpm, causal=True)
    assert (out.double() - softmax).abs().max() > 1e-2


def test_training_depends_on_every_layer_and_every_layer_kl_enters_aux_loss():
    mech = build("babn", num_layers=3, kl_weight=0.3).train()
    q, k, v = qkv(lq=10)
    kpm = padding_mask(2, 10, [10, 7])
    base = call(mech, q, k, v, key_padding_mask=kpm)
    layer_kl = mech._last_kl
    assert layer_kl.shape == (3,) and torch.isfinite(layer_kl).all() and (layer_kl > 0).all()
    torch.testing.assert_close(mech.aux_loss, 0.3 * layer_kl.sum())
    assert set(mech.metrics()) == {"kl", "kl_layer1", "kl_layer2", "kl_layer3"}
    # the top layer's upward temperature, and each downward gate, move the sampled output
    for param, index in [
        (mech.log_temperature, (1, 0)),
        (mech.log_temperature, (0, 1)),
        (mech.gate_logit, (1, 0)),
        (mech.gate_logit, (0, 1)),
    ]:
        with torch.no_grad():
            param[index] += 0.5
        moved = call(mech, q, k, v, key_padding_mask=kpm)
        with torch.no_grad():
            param[index] -= 0.5
        assert (moved - base).abs().max() > 1e-4, f"{index} of {param.shape} does not reach the output"
    # the aux loss trains every layer's parameters and the top layer's contextual prior
    mech.zero_grad()
    call(mech, q, k, v, key_padding_mask=kpm)
    mech.aux_loss.backward()
    for name in ("log_temperature", "gate_logit"):
        grad = getattr(mech, name).grad
        assert (grad.abs().sum(1) > 0).all(), f"a layer of {name} gets no KL gradient: {grad}"
    assert mech.prior_in.weight.grad.abs().sum() > 0


def test_training_samples_normalised_weights_that_concentrate_as_shape_grows():
    q, k, v = qkv(lq=10)
    kpm = padding_mask(2, 10, [10, 6])
    ref = dense_attention_oracle(q, k, v, key_padding_mask=kpm)
    errors = []
    for shape in (2.0, 20.0, 200.0, 2000.0):
        mech = build("babn", num_layers=3, weibull_shape=shape).train()
        torch.manual_seed(1)
        a = mech(q, k, v, key_padding_mask=kpm)
        torch.manual_seed(2)
        b = mech(q, k, v, key_padding_mask=kpm)
        assert not torch.allclose(a, b), "training should sample attention weights"
        ones = mech(q, k, torch.ones_like(v), key_padding_mask=kpm)  # weights sum to 1
        torch.testing.assert_close(ones, torch.ones_like(ones))
        errors.append(float((a.detach().double() - ref).abs().max()))
    assert all(e2 < e1 for e1, e2 in zip(errors, errors[1:])), errors
    assert errors[-1] < 5e-3, errors


@pytest.mark.parametrize("training", [False, True])
@pytest.mark.parametrize("causal", [False, True])
def test_masking(training, causal):
    mech = build("babn", num_layers=3).train(training)
    with torch.no_grad():
        mech.log_temperature.add_(0.3)
    assert_padding_invariant(mech, causal=causal)
    assert_fully_padded_row_finite(mech, causal=causal)
    q, k, v = qkv(lq=6)
    out = call(mech, q, k, v, key_padding_mask=padding_mask(2, 6, [6, 0]), causal=causal)
    assert out[1].abs().max() == 0
    if training:
        assert torch.isfinite(mech.aux_loss)
    if causal:
        assert_causal(mech)


@pytest.mark.parametrize("training", [False, True])
@pytest.mark.parametrize("variant", ["scaled", "huge_norm"])
def test_causal_with_adversarial_magnitudes_float32(training, variant):
    mech = build("babn", num_layers=3).train(training)
    with torch.no_grad():
        mech.log_temperature.add_(0.5)
    q, k, v = qkv(lq=12, scale=30.0 if variant == "scaled" else 1.0)
    out = call(mech, q, k, v, causal=True)
    q2, k2, v2 = q.clone(), k.clone(), v.clone()
    big = 300.0 if variant == "scaled" else 1e3
    for x in (q2, k2):
        x[:, :, 7:] = torch.randn_like(x[:, :, 7:]) * big
    v2[:, :, 7:] = torch.randn_like(v2[:, :, 7:]) * 1e4
    out2 = call(mech, q2, k2, v2, causal=True)
    assert torch.isfinite(out).all() and torch.isfinite(out2).all()
    torch.testing.assert_close(out[:, :, :7], out2[:, :, :7], atol=1e-5, rtol=1e-4)
    assert not torch.allclose(out[:, :, 7:], out2[:, :, 7:])


def test_gradients_finite():
    for n_layers in (1, 3):
        mech = build("babn", num_layers=n_layers)
        assert_gradients_finite(mech)
        assert_gradients_finite(mech, causal=True, key_padding=True)


def test_no_tensor_beyond_one_score_matrix():
    """Three layers cost no (T, L, L) stack: forward+backward never builds a tensor larger than
    one query block of scores, and with small blocks stays far below L² (softmax's (L, L))."""
    length = 1024
    mech = build("babn", heads=1, dim_head=16, num_layers=3, query_block=128).train()
    largest, op = largest_intermediate(mech, length=length, causal=True, key_padding=True)
    assert largest <= 128 * length, (largest, op)
    mech = build("babn", heads=1, dim_head=16, num_layers=3).train()  # auto block
    largest, op = largest_intermediate(mech, length=length, causal=True, key_padding=True)
    assert largest <= length * length, (largest, op)


def test_bf16_autocast_training():
    mech = build("babn", num_layers=2).train()
    q, k, v = (x.requires_grad_() for x in qkv(lq=13))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = mech(q, k, v, key_padding_mask=padding_mask(2, 13, [13, 9]), causal=True)
        loss = out.float().square().mean() + mech.aux_loss
    loss.backward()
    assert torch.isfinite(out.float()).all() and torch.isfinite(q.grad).all()


def test_bad_config_names_the_fields():
    with pytest.raises(ValueError, match="num_layers >= 1"):
        build("babn", num_layers=0)


def test_registered_with_its_paper():
    from harness.core.registry import get_mechanism

    spec = get_mechanism("babn")
    assert "Bayesian attention belief networks" in spec.doc
    assert spec.capabilities.causal and spec.capabilities.cross and spec.capabilities.key_padding
