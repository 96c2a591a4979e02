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
    dense_attention_oracle,
    padding_mask,
    qkv,
)

import mechanisms.kernel_rpe as kernel_rpe
from harness.core.registry import create_mechanism
from mechanisms.performer import softmax_kernel_features

MAX_LEN = 16


def relative_positions(lq, lk):
    """(Lq, Lk) p = j − i − (Lk − Lq): bottom-right aligned relative position."""
    return torch.arange(lk)[None, :] - torch.arange(lq)[:, None] - (lk - lq)


def toeplitz_matrix(rel_bias, lq, lk, *, causal):
    """The explicit (H, Lq, Lk) matrix C_ij = exp(b_{j−i}) (0 above the diagonal when causal), float64."""
    p = relative_positions(lq, lk)
    c = torch.exp(rel_bias.detach().double()[:, p + MAX_LEN - 1])
    return c * (p <= 0) if causal else c


def dense_kernel_rpe(mech, q, k, v, *, key_padding_mask=None, causal=False):
    """z_i = Σ_j φ(q_i)·φ(k_j) C_ij v_j / Σ_j φ(q_i)·φ(k_j) C_ij over valid keys, as dense (Lq, Lk) matrices."""
    w = mech.projection.weight.double()
    if mech.cfg.normalize_qk:  # §3.3: the kernel is exp(q̂·k̂)
        q = torch.nn.functional.normalize(q.double(), dim=-1) * q.shape[-1] ** 0.25
        k = torch.nn.functional.normalize(k.double(), dim=-1) * k.shape[-1] ** 0.25
    q_feats = softmax_kernel_features(q.double(), w, is_query=True, eps=mech.cfg.feature_eps)
    k_feats = softmax_kernel_features(k.double(), w, is_query=False, key_padding_mask=key_padding_mask)
    a = torch.einsum("bhim,bhjm->bhij", q_feats, k_feats) * toeplitz_matrix(
        mech.rel_bias, q.shape[-2], k.shape[-2], causal=causal
    )
    den = a.sum(-1, keepdim=True)
    return torch.where(den > 0, a @ v.double() / den.clamp_min(1e-300), torch.zeros(()))


def build_rpe(**overrides):
    """The FFT path unless a test asks for the dense one (every length here is below its default cutoff)."""
    mech = build("kernel_rpe", max_len=MAX_LEN, **{"dense_max_len": 0, **overrides})
    with torch.no_grad():  # a non-trivial bias (5 units of dynamic range) so C really matters
        mech.rel_bias.copy_(torch.linspace(-2.5, 2.5, 2 * MAX_LEN - 1).sin() * 2.5)
    return mech


@pytest.mark.parametrize("lq,lk", [(1, 1), (3, 8), (8, 8), (9, 9), (11, 5), (16, 16)])
def test_toeplitz_fft_product_equals_explicit_matrix(lq, lk):
    g = torch.Generator().manual_seed(0)
    rel_bias = torch.randn(2, 2 * MAX_LEN - 1, generator=g, dtype=torch.float64)
    x = torch.randn(3, 2, lk, 5, generator=g, dtype=torch.float64)
    for causal in (False, True):
        coeffs = kernel_rpe.relative_coefficients(rel_bias, lq, lk, causal=causal, dtype=torch.float64)
        c = toeplitz_matrix(rel_bias, lq, lk, causal=causal)
        c = c / c.amax(dim=(-2, -1), keepdim=True)  # the stabiliser: max(b) subtracted before exp
        expected = torch.einsum("hij,bhjf->bhif", c, x)
        torch.testing.assert_close(kernel_rpe.toeplitz_multiply(coeffs, x, lq), expected, atol=1e-12, rtol=1e-10)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("lq,lk", [(9, 9), (5, 11), (11, 5), (16, 16)])
def test_matches_dense_formula(causal, lq, lk):
    mech = build_rpe(num_features=24, fft_dtype="float64", fft_feature_block=7)
    q, k, v = qkv(lq=lq, lk=lk)
    kpm = padding_mask(2, lk, [lk, max(lk - 3, 1)])
    for mask in (None, kpm):
        ref = dense_kernel_rpe(mech, q, k, v, key_padding_mask=mask, causal=causal)
        out64 = call(mech, q.double(), k.double(), v.double(), key_padding_mask=mask, causal=causal)
        assert out64.dtype == torch.float64
        torch.testing.assert_close(out64, ref, atol=1e-10, rtol=1e-9)
        out32 = call(build_rpe(num_features=24), q, k, v, key_padding_mask=mask, causal=causal)
        assert out32.dtype == torch.float32
        torch.testing.assert_close(out32.double(), ref, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("lq,lk", [(1, 1), (9, 9), (5, 11), (11, 5), (16, 16)])
def test_short_sequences_take_the_exact_dense_product(lq, lk, monkeypatch):
    mech = build_rpe(num_features=24, fft_dtype="float64", dense_max_len=MAX_LEN)
    q, k, v = qkv(lq=lq, lk=lk)
    kpm = padding_mask(2, lk, [lk, max(lk - 3, 1)])
    monkeypatch.setattr(kernel_rpe, "kernelized_rpe_attention", None)  # the FFT path is not taken
    for mask in (None, kpm):
        ref = dense_kernel_rpe(mech, q, k, v, key_padding_mask=mask)
        out = call(mech, q.double(), k.double(), v.double(), key_padding_mask=mask)
        torch.testing.assert_close(out, ref, atol=1e-12, rtol=1e-10)
        out32 = call(build_rpe(num_features=24, dense_max_len=MAX_LEN), q, k, v, key_padding_mask=mask)
        torch.testing.assert_close(out32.double(), ref, atol=2e-6, rtol=1e-5)


@pytest.mark.parametrize("leaf", [1, 2, 4])
@pytest.mark.parametrize("lq,lk", [(16, 16), (13, 13), (5, 11), (11, 5)])
def test_blocked_causal_path_matches_dense_formula(leaf, lq, lk):
    """Leaves smaller than L: every recursive-doubling level (FFT between sibling blocks, running
    stabiliser) against the explicit lower-triangular formula, in float64 and in float32."""
    mech = build_rpe(num_features=24, fft_dtype="float64", fft_feature_block=7, causal_leaf=leaf)
    q, k, v = qkv(lq=lq, lk=lk, seed=leaf)
    kpm = padding_mask(2, lk, [lk, max(lk - 4, 1)])
    for mask in (None, kpm):
        ref = dense_kernel_rpe(mech, q, k, v, key_padding_mask=mask, causal=True)
        out64 = call(mech, q.double(), k.double(), v.double(), key_padding_mask=mask, causal=True)
        torch.testing.assert_close(out64, ref, atol=1e-10, rtol=1e-9)
        out32 = call(build_rpe(num_features=24, causal_leaf=leaf), q, k, v, key_padding_mask=mask, causal=True)
        torch.testing.assert_close(out32.double(), ref, atol=2e-5, rtol=1e-4)


def test_causal_path_equals_plain_reference_with_a_dominant_future_key():
    """The blocked path against the plain formula (global stabiliser, explicit matrices) in
    float64, with a key aligned with a random feature late in the sequence: every row, before
    and after it, matches, and the float32 blocked rows before it match too."""
    g = torch.Generator().manual_seed(7)
    b, h, length, d, m = 1, 2, 24, 8, 16
    w = torch.randn(m, d, generator=g, dtype=torch.float64)
    q, k, v = (torch.randn(b, h, length, d, generator=g, dtype=torch.float64) for _ in range(3))
    k[:, :, 20] = w[3] * d**0.25  # log-feature |w|²/2: the largest a positive feature can be
    v[:, :, 20] = 1e4
    q_feats = softmax_kernel_features(q, w, is_query=True)
    logits = kernel_rpe.key_log_features(k, w, None)
    decay = torch.rand(h, length, generator=g, dtype=torch.float64) + 0.01  # c_0..c_{L−1} > 0
    ref = kernel_rpe.causal_kernelized_rpe_reference(q_feats, logits, v, decay)
    for leaf in (1, 4, 32):
        out = kernel_rpe.causal_kernelized_rpe_attention(q_feats, logits, v, decay, leaf=leaf, block=5)
        torch.testing.assert_close(out, ref, atol=1e-9, rtol=1e-9)
        out32 = kernel_rpe.causal_kernelized_rpe_attention(
            q_feats.float(), logits.float(), v.float(), decay.float(), leaf=leaf, block=5
        )
        torch.testing.assert_close(out32[:, :, :20].double(), ref[:, :, :20], atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("causal", [False, True])
def test_normalised_qk_option(causal):
    """§3.3 recipe: with ℓ2-normalised q and k the output follows the formula on q̂, k̂ and is
    invariant to the norms of q and k (the features' variance no longer grows with them)."""
    mech = build_rpe(num_features=24, fft_dtype="float64", normalize_qk=True, causal_leaf=4)
    q, k, v = qkv(lq=13, dtype=torch.float64)
    out = call(mech, q, k, v, causal=causal)
    torch.testing.assert_close(out, dense_kernel_rpe(mech, q, k, v, causal=causal), atol=1e-10, rtol=1e-9)
    scale = torch.rand(2, 2, 13, 1, dtype=torch.float64) * 50 + 0.1
    torch.testing.assert_close(call(mech, q * scale, k / scale, v, causal=causal), out, atol=1e-10, rtol=1e-9)


def test_approaches_softmax_with_relative_bias_as_features_grow():
    """exp(q·k/√d + b_{j−i}) is what the features estimate: error vs the float64 oracle with
    the same bias falls as num_features grows."""
    q, k, v = qkv(lq=12, dtype=torch.float64, scale=0.6)
    errors = []
    for num_features in (16, 2048):
        per_draw = []
        for draw in range(3):
            torch.manual_seed(draw)
            mech = create_mechanism(
                "kernel_rpe", heads=2, dim_head=8, max_len=MAX_LEN, num_features=num_features, fft_feature_block=2048
            ).eval()
            with torch.no_grad():
                mech.rel_bias.normal_()
            bias = mech.rel_bias.detach()[:, relative_positions(12, 12) + MAX_LEN - 1][None]  # (1, H, L, L)
            ref = dense_attention_oracle(q, k, v, bias=bias)
            per_draw.append(float((mech(q, k, v).detach() - ref).norm() / ref.norm()))
        errors.append(sum(per_draw) / len(per_draw))
    assert errors[1] < errors[0] / 3 and errors[1] < 0.1, errors


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("fft_dtype,expected", [("float32", torch.float32), ("float64", torch.float64)])
def test_fft_runs_in_fft_dtype_under_bf16_autocast(monkeypatch, fft_dtype, expected, causal):
    seen = []
    original = torch.fft.rfft

    def spy(x, *args, **kwargs):
        seen.append((x.dtype, torch.is_autocast_enabled("cpu")))
        return original(x, *args, **kwargs)

    monkeypatch.setattr(torch.fft, "rfft", spy)
    mech = build_rpe(num_features=16, fft_dtype=fft_dtype, causal_leaf=4)  # causal: 2 FFT levels above the leaves
    q, k, v = qkv(lq=13)
    kpm = padding_mask(2, 13, [13, 9])
    ref = call(mech, q, k, v, key_padding_mask=kpm, causal=causal)
    seen.clear()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = call(mech, q, k, v, key_padding_mask=kpm, causal=causal)
    assert seen and all(s == (expected, False) for s in seen), seen
    assert low.dtype == torch.bfloat16 and torch.isfinite(low).all()
    assert (low.float() - ref).abs().max() < 0.05


@pytest.mark.parametrize("causal", [False, True])
def test_masking_and_causality(causal):
    mech = build_rpe(num_features=16)
    assert_padding_invariant(mech, causal=causal)
    assert_padding_invariant(mech, lq=13, causal=causal)
    assert_fully_padded_row_finite(mech, causal=causal)
    q, k, v = qkv(lq=10)
    assert call(mech, q, k, v, key_padding_mask=padding_mask(2, 10, [10, 0]), causal=causal)[1].abs().max() == 0
    if causal:
        assert_causal(mech)
        assert_causal(mech, length=13, t=3)


def test_gradients_reach_the_relative_bias():
    mech = build_rpe(num_features=16)
    assert_gradients_finite(mech)
    assert_gradients_finite(mech, causal=True, key_padding=True)
    mech.zero_grad()
    q, k, v = qkv(lq=9)
    mech(q, k, v, causal=True).square().mean().backward()
    grad = mech.rel_bias.grad
    assert grad[:, MAX_LEN - 9 : MAX_LEN].abs().sum() > 0  # p = −8..0 are used by a causal L = 9 pass
    assert grad[:, MAX_LEN:].abs().max() == 0 and grad[:, : MAX_LEN - 9].abs().max() == 0  # unused biases
    for leaf in (2, 256):  # FFT levels and the dense leaf, each with and without recomputation
        grads = []
        for ckpt in (False, True):
            mech = build_rpe(num_features=16, checkpoint_fft=ckpt, causal_leaf=leaf)
            mech(q, k, v, causal=True).square().mean().backward()
            grads.append(mech.rel_bias.grad)
        torch.testing.assert_close(grads[1], grads[0], atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(grads[0], grad, atol=1e-5, rtol=1e-4)


def test_lengths_beyond_max_len_and_bad_config_raise():
    mech = build_rpe()
    q, k, v = qkv(lq=MAX_LEN + 1)
    with pytest.raises(ValueError, match="max_len"):
        mech(q, k, v)
    for bad, says in (
        ({"fft_dtype": "float16"}, "fft_dtype must be one of"),
        ({"fft_feature_block": 0}, "fft_feature_block must be >= 1"),
        ({"num_features": 0}, "num_features must be >= 1"),
        ({"causal_leaf": 3}, "causal_leaf must be a power of two"),
    ):
        with pytest.raises(ValueError, match=says):
            build("kernel_rpe", **bad)


def test_features_are_redrawn_by_the_training_step_not_per_call():
    """Like performer: calls within one training step share a draw; the schedule follows
    context.step, and a checkpoint restores the drawn features."""
    from harness.core.attention import AttentionContext
    from harness.core.registry import create_mechanism

    torch.manual_seed(0)
    mech = create_mechanism("kernel_rpe", heads=2, dim_head=8, max_len=32, redraw_interval=3).train()
    q = torch.randn(1, 2, 16, 8)
    first = mech.projection.weight.clone()
    for _ in range(4):  # four calls (e.g. two towers, gradient accumulation) at step 1: no redraw
        mech(q, q, q, context=AttentionContext(step=1))
    assert torch.equal(mech.projection.weight, first)
    mech(q, q, q, context=AttentionContext(step=3))
    assert not torch.equal(mech.projection.weight, first)
    state = {k: v.clone() for k, v in mech.state_dict().items()}
    other = create_mechanism("kernel_rpe", heads=2, dim_head=8, max_len=32, redraw_interval=3)
    other.load_state_dict(state)
    assert torch.equal(other.projection.weight, mech.projection.weight)


def test_no_quadratic_tensor_above_the_dense_cutoff():
    """The dense short-sequence path must not leak past ``dense_max_len``: at 8K (default cutoff
    1024) no tensor of forward+backward reaches L²/16 elements, causal or not (the causal leaves
    hold L·causal_leaf elements: 256 keeps them at L²/32)."""
    for causal in (False, True):
        mech = build("kernel_rpe", heads=1, max_len=8192, num_features=8, causal_leaf=256)
        assert_subquadratic(mech, length=8192, heads=1, dim=8, causal=causal)
