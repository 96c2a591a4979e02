import pytest
import torch
from mechanism_checks import (
    assert_causal,
    assert_fully_padded_row_finite,
    assert_gradients_finite,
    assert_padding_invariant,
    assert_subquadratic,
    build,
    call,
    padding_mask,
    qkv,
)

import mechanisms.polynomial as polynomial


def rms(x):
    return x / torch.sqrt(x.square().mean(-1, keepdim=True) + 1e-6)


def ccp(x, factors, normalize):
    """Π-net CCP written out: x_1 = U_1ᵀz, x_n = (U_nᵀz)∘x_{n−1} + x_{n−1}."""
    z = rms(x) if normalize else x
    y = None
    for n in range(factors.shape[1]):
        u = torch.einsum("bhld,hdr->bhlr", z, factors[:, n])
        y = u if y is None else u * y + y
    return rms(y) if normalize else y


def explicit_weights(mech, q, k, key_padding_mask=None, causal=False):
    """(B, H, Lq, Lk) w_ij = κ(q_i, k_j)/|A(i)| over visible keys, in float64, from the documented formula."""
    q, k = q.double(), k.double()
    a, b = mech.query_factors.detach().double(), mech.key_factors.detach().double()
    normalize = mech.cfg.normalize
    phi_q, phi_k = ccp(q, a, normalize), ccp(k, b, normalize)
    kappa = 1 + torch.einsum("bhir,bhjr->bhij", phi_q, phi_k) / phi_q.shape[-1]
    lq, lk = q.shape[-2], k.shape[-2]
    see = torch.ones(q.shape[0], 1, lq, lk, dtype=torch.bool)
    if causal:
        see = see & (torch.arange(lk)[None, :] <= torch.arange(lq)[:, None] + lk - lq)
    if key_padding_mask is not None:
        see = see & ~key_padding_mask[:, None, None, :]
    return kappa * see / see.sum(-1, keepdim=True).clamp_min(1)


@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("lq,lk", [(9, 9), (5, 11), (11, 5)])
@pytest.mark.parametrize("chunk", [1, 4, 128])
def test_matches_explicit_formula(normalize, causal, lq, lk, chunk):
    mech = build("polynomial", degree=3, rank=6, normalize=normalize, causal_chunk_size=chunk)
    q, k, v = qkv(lq=lq, lk=lk)
    kpm = padding_mask(2, lk, [lk, max(lk - 3, 1)])
    for mask in (None, kpm):
        ref = explicit_weights(mech, q, k, mask, causal) @ v.double()
        out64 = call(mech.double(), q.double(), k.double(), v.double(), key_padding_mask=mask, causal=causal)
        torch.testing.assert_close(out64, ref, atol=1e-10, rtol=1e-9)
        module_ref = polynomial.polynomial_attention_reference(
            q.double(),
            k.double(),
            v.double(),
            mech.query_factors.detach(),
            mech.key_factors.detach(),
            key_padding_mask=mask,
            causal=causal,
            normalize=normalize,
        )
        torch.testing.assert_close(module_ref, ref, atol=1e-10, rtol=1e-9)
        mech.float()
        out32 = call(mech, q, k, v, key_padding_mask=mask, causal=causal)
        torch.testing.assert_close(out32.double(), ref, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("causal", [False, True])
def test_output_is_a_query_dependent_mixture_of_the_values(causal):
    """Content retrieval: out_i = Σ_j w_ij v_j (linear in v, one scalar weight per key) and the
    weights depend on the query's content: two queries mix the same keys/values differently,
    and with the key factors tied to the query factors a query equal to key j* weighs j*
    most (κ = 2 exactly there, the maximum). A shared gated mean (one mixture for every
    query) fails all three."""
    mech = build("polynomial", degree=3, rank=16).double()
    with torch.no_grad():
        mech.key_factors.copy_(mech.query_factors)
    length, d = 10, 8
    q, k, v = qkv(batch=1, lq=length, dim=d, dtype=torch.float64, seed=2)
    q[:, :, 9], q[:, :, 8] = k[:, :, 2], k[:, :, 6]  # query 9 looks for key 2, query 8 for key 6
    f = lambda values: mech(q, k, values, causal=causal)  # noqa: E731
    jac = torch.autograd.functional.jacobian(f, v)  # (1, H, Lq, D, 1, H, Lk, D)
    jac = jac[0, :, :, :, 0]  # (H, Lq, D, H', Lk, D)
    heads = torch.arange(2)
    blocks = jac[heads, :, :, heads]  # (H, Lq, D, Lk, D): each head mixes its own values only
    weights = blocks[..., 0, :, 0]  # (H, Lq, Lk)
    eye = torch.eye(d, dtype=torch.float64)
    torch.testing.assert_close(blocks, weights[:, :, None, :, None] * eye[None, None, :, None, :])  # w_ij · I
    other = jac[heads, :, :, 1 - heads]
    assert other.abs().max() == 0
    torch.testing.assert_close(f(v), torch.einsum("hij,bhjd->bhid", weights, v))
    for h in range(2):
        assert weights[h, 9].argmax() == 2 and weights[h, 8].argmax() == 6
        assert (weights[h, 9, :8] - weights[h, 8, :8]).abs().max() > 0.05  # same visible keys, different mixtures


@pytest.mark.parametrize("degree", [1, 2, 3, 5])
def test_unnormalised_kernel_is_a_degree_n_polynomial_of_the_query(degree):
    """Without normalisation κ − 1 = φ_Q(q)·φ_K(k)/r with φ_Q a degree-N polynomial of q with no
    constant term: out(t·q) − out(0) is a polynomial in t of degree exactly N."""
    mech = build("polynomial", degree=degree, rank=5, normalize=False).double()
    q, k, v = qkv(lq=7, dtype=torch.float64, seed=3)
    outs = torch.stack([mech(t * q, k, v, causal=True) for t in range(degree + 2)])
    diffs = [outs]
    for _ in range(degree + 1):
        diffs.append(diffs[-1][1:] - diffs[-1][:-1])
    scale = outs.abs().max()
    assert diffs[degree].abs().max() > 1e-3 * scale  # the degree-N term is present
    assert diffs[degree + 1].abs().max() < 1e-9 * scale  # and nothing above it


def test_normalised_kernel_is_bounded_for_any_degree_and_input_scale():
    """κ ∈ [0, 2] (‖φ‖ = √r, Cauchy–Schwarz): ‖out_i‖ ≤ 2·max_j ‖v_j‖ at any degree and scale."""
    q, k, v = qkv(lq=10, scale=300.0)
    for degree in (1, 4, 16):
        mech = build("polynomial", degree=degree, rank=8)
        for causal in (False, True):
            out = call(mech, q, k, v, causal=causal)
            assert torch.isfinite(out).all()
            assert out.norm(dim=-1).max() <= 2 * v.norm(dim=-1).max() * (1 + 1e-5)


def test_cross_causal_is_bottom_right_aligned():
    mech = build("polynomial")
    q, k, v = qkv(lq=3, lk=8)
    out = call(mech, q, k, v, causal=True)
    full = call(mech, q[:, :, -1:], k, v)
    torch.testing.assert_close(out[:, :, -1:], full)
    q, k, v = qkv(lq=8, lk=3)  # the first Lq - Lk queries see no key: zeros
    assert call(mech, q, k, v, causal=True)[:, :, :5].abs().max() == 0


@pytest.mark.parametrize("causal", [False, True])
def test_masking(causal):
    mech = build("polynomial", causal_chunk_size=4)
    assert_padding_invariant(mech, causal=causal)
    assert_padding_invariant(mech, lq=13, causal=causal)
    assert_fully_padded_row_finite(mech, causal=causal)
    q, k, v = qkv(lq=6)
    out = call(mech, q, k, v, key_padding_mask=padding_mask(2, 6, [6, 0]), causal=causal)
    assert out[1].abs().max() == 0 and out[0].abs().max() > 0
    if causal:
        assert_causal(mech)
        assert_causal(mech, length=13, t=5)


@pytest.mark.parametrize("causal", [False, True])
def test_linear_cost(causal):
    assert_subquadratic(build("polynomial", heads=1, dim_head=16, rank=16), causal=causal, key_padding=True)


def test_gradients_and_bf16_autocast():
    mech = build("polynomial")
    assert_gradients_finite(mech)
    assert_gradients_finite(mech, causal=True, key_padding=True)
    assert mech.aux_loss is None
    q, k, v = (x.requires_grad_() for x in qkv(lq=13))
    ref = call(mech, q, k, v, key_padding_mask=padding_mask(2, 13, [13, 9]), causal=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = call(mech, q, k, v, key_padding_mask=padding_mask(2, 13, [13, 9]), causal=True)
    assert out.dtype == torch.bfloat16
    out.float().square().mean().backward()
    assert torch.isfinite(out).all() and torch.isfinite(k.grad).all()
    assert mech.key_factors.grad is not None and torch.isfinite(mech.key_factors.grad).all()
    assert (out.float() - ref).abs().max() < 0.05


def test_bad_config_raises():
    for bad in ({"degree": 0}, {"rank": 0}, {"causal_chunk_size": 0}):
        with pytest.raises(ValueError, match="polynomial needs"):
            build("polynomial", **bad)
