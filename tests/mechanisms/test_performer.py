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

from harness.core.attention import AttentionContext
from harness.core.registry import create_mechanism
from mechanisms.performer import (
    causal_linear_attention,
    gaussian_orthogonal_random_matrix,
    softmax_kernel_features,
)


def dense_kernel_attention(q_feats, k_feats, v, *, causal=False):
    """The same features written as an explicit (Lq, Lk) matrix A = φ(Q)φ(K)ᵀ, float64:
    out = A V / A 1, with A zeroed above the bottom-right aligned diagonal when causal."""
    a = torch.einsum("bhim,bhjm->bhij", q_feats.double(), k_feats.double())
    if causal:
        lq, lk = a.shape[-2:]
        a = a * (torch.arange(lk)[None, :] <= torch.arange(lq)[:, None] + (lk - lq))
    den = a.sum(-1, keepdim=True)
    return torch.where(den > 0, (a @ v.double()) / den.clamp_min(1e-300), torch.zeros(()))


def test_error_against_softmax_oracle_falls_as_num_features_grows():
    q, k, v = qkv(lq=16, dtype=torch.float64, scale=0.6)
    ref = dense_attention_oracle(q, k, v)
    mean_errors = []
    for num_features in (16, 128, 1024, 4096):
        errors = []
        for draw in range(3):
            torch.manual_seed(draw)
            mech = create_mechanism("performer", heads=2, dim_head=8, max_len=64, num_features=num_features).eval()
            errors.append(float((mech(q, k, v) - ref).norm() / ref.norm()))
        mean_errors.append(sum(errors) / len(errors))
    assert all(a > b for a, b in zip(mean_errors, mean_errors[1:])), mean_errors
    # Monte Carlo error ~ 1/√m: 256× the features, ≥ 4× less error (16× in expectation)
    assert mean_errors[-1] < mean_errors[0] / 4 and mean_errors[-1] < 0.1, mean_errors


def test_softmax_features_estimate_the_exponential_kernel():
    """E[φ(q)ᵀφ(k)] = exp(q·k/√d) up to the stabilisers, which cancel in the ratio: with many
    features the ratio kernel(q, k) / kernel(q, k₀) matches exp((q·k − q·k₀)/√d)."""
    torch.manual_seed(0)
    q, k, _ = qkv(batch=1, heads=1, lq=4, lk=6, dtype=torch.float64, scale=0.5)
    w = gaussian_orthogonal_random_matrix(200_000, 8).double()
    kernel = softmax_kernel_features(q, w, is_query=True, eps=0.0) @ softmax_kernel_features(
        k, w, is_query=False
    ).transpose(-1, -2)
    exact = torch.exp(q @ k.transpose(-1, -2) / math.sqrt(8))
    torch.testing.assert_close(kernel / kernel[..., :1], exact / exact[..., :1], rtol=0.04, atol=0)


def test_relu_kernel_is_generalised_attention():
    """kernel="relu": out = φ(Q)φ(K)ᵀV / φ(Q)φ(K)ᵀ1 with φ(x) = ReLU(W x d^(-1/4)) + ε."""
    mech = build("performer", kernel="relu", num_features=32, feature_eps=1e-3)
    q, k, v = qkv(lq=9, lk=11)
    kpm = padding_mask(2, 11, [11, 7])
    w = mech.projection.weight.double()

    def phi(x):
        return torch.relu(x.double() * 8**-0.25 @ w.t()) + 1e-3

    for causal in (False, True):
        out = call(mech, q, k, v, key_padding_mask=kpm, causal=causal)
        ref = dense_kernel_attention(phi(q), phi(k).masked_fill(kpm[:, None, :, None], 0.0), v, causal=causal)
        torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=1e-5)
    assert (phi(q) >= 1e-3).all()  # positive features: denominators never vanish


def test_relu_deterministic_kernel_is_lras_default_performer():
    """kernel="relu_deterministic" (LRA's default 'generalized' attention, features_type
    'deterministic'): φ(x) = ReLU(x) + ε, no projection, no rescaling; num_features unused."""
    mech = build("performer", kernel="relu_deterministic", num_features=2, feature_eps=1e-3)
    q, k, v = qkv(lq=9, lk=11)
    kpm = padding_mask(2, 11, [11, 7])

    def phi(x):
        return torch.relu(x.double()) + 1e-3

    for causal in (False, True):
        out = call(mech, q, k, v, key_padding_mask=kpm, causal=causal)
        ref = dense_kernel_attention(phi(q), phi(k).masked_fill(kpm[:, None, :, None], 0.0), v, causal=causal)
        torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=1e-5)
        assert_padding_invariant(mech, causal=causal)
    assert_fully_padded_row_finite(mech)


def test_orthogonal_features_are_orthogonal_within_blocks_with_chi_norms():
    torch.manual_seed(0)
    dim, num_features = 8, 20  # blocks of 8, 8 and 4 rows
    w = gaussian_orthogonal_random_matrix(num_features, dim)
    for start in range(0, num_features, dim):
        block = w[start : start + dim]
        gram = block @ block.t()
        off_diagonal = gram - torch.diag(torch.diagonal(gram))
        assert off_diagonal.abs().max() < 1e-4 * gram.diagonal().max()
    across = w[:dim] @ w[dim : 2 * dim].t()  # rows of different blocks are independent, not orthogonal
    assert across.abs().max() > 0.1
    norms = gaussian_orthogonal_random_matrix(20_000, dim).norm(dim=-1)  # chi(8): mean √2 Γ(4.5)/Γ(4)
    chi_mean = math.sqrt(2) * math.exp(math.lgamma(4.5) - math.lgamma(4.0))
    assert abs(float(norms.mean()) - chi_mean) < 0.02 and abs(float(norms.square().mean()) - dim) < 0.2
    iid = gaussian_orthogonal_random_matrix(num_features, dim, orthogonal=False)
    assert (iid[:dim] @ iid[:dim].t() - torch.diag((iid[:dim] ** 2).sum(-1))).abs().max() > 0.1


def test_features_are_redrawn_on_schedule_in_training_only():
    mech = build("performer", num_features=16, redraw_interval=3).train()
    q, k, v = qkv(lq=6)
    used = []  # the projection each training pass used
    for _ in range(7):
        mech(q, k, v)
        used.append(mech.projection.weight.clone())
    same = [torch.equal(a, b) for a, b in zip(used, used[1:])]
    # passes 0-2 use draw 0, passes 3-5 draw 1, pass 6 draw 2
    assert same == [True, True, False, True, True, False], same
    assert mech.metrics() == {"feature_redraws": 2.0}
    mech.eval()
    before = mech.projection.weight.clone()
    for _ in range(5):
        mech(q, k, v)
    assert torch.equal(before, mech.projection.weight)
    never = build("performer", num_features=16, redraw_interval=0).train()
    before = never.projection.weight.clone()
    for _ in range(5):
        never(q, k, v)
    assert torch.equal(before, never.projection.weight)


@pytest.mark.parametrize("chunk_size", [1, 3, 4, 128])
@pytest.mark.parametrize("lq,lk", [(10, 10), (4, 10), (10, 4)])
def test_chunked_causal_prefix_sum_equals_dense_causal_form(chunk_size, lq, lk):
    torch.manual_seed(0)
    q, k, v = qkv(lq=lq, lk=lk, dtype=torch.float64)
    w = gaussian_orthogonal_random_matrix(24, 8).double()
    kpm = padding_mask(2, lk, [lk, max(lk - 3, 1)])
    q_feats = softmax_kernel_features(q, w, is_query=True)
    k_feats = softmax_kernel_features(k, w, is_query=False, key_padding_mask=kpm)
    out = causal_linear_attention(q_feats, k_feats, v, chunk_size=chunk_size)
    torch.testing.assert_close(out, dense_kernel_attention(q_feats, k_feats, v, causal=True), atol=1e-12, rtol=1e-10)
    if lq > lk:  # the first Lq − Lk queries see no key
        assert out[:, :, : lq - lk].abs().max() == 0


def test_causal_module_matches_dense_form_for_every_chunk_size():
    q, k, v = qkv(lq=13)
    outs = [call(build("performer", num_features=32, causal_chunk_size=c), q, k, v, causal=True) for c in (1, 5, 64)]
    for out in outs[1:]:
        torch.testing.assert_close(out, outs[0], atol=1e-5, rtol=1e-5)
    assert_causal(build("performer", num_features=32, causal_chunk_size=4))
    assert_causal(build("performer", num_features=32, kernel="relu"), length=13, t=3)


def test_padded_keys_contribute_exactly_nothing():
    """With padding, the output equals the output over the valid keys alone: the padded
    feature rows are zero and the key stabiliser ignores them."""
    mech = build("performer", num_features=32)
    q, k, v = qkv(lq=10)
    kpm = padding_mask(2, 10, [10, 6])
    k_feats = softmax_kernel_features(k, mech.projection.weight, is_query=False, key_padding_mask=kpm)
    assert k_feats[1, :, 6:].abs().max() == 0 and k_feats[1, :, :6].min() > 0
    k[1, :, 6:] = 1e3  # huge padded keys would dominate the stabiliser if it saw them
    for causal in (False, True):
        out = call(mech, q, k, v, key_padding_mask=kpm, causal=causal)
        queries = 6 if causal else 10  # causal: queries 0..5 see exactly the valid keys 0..i
        alone = call(mech, q[1:, :, :queries], k[1:, :, :6], v[1:, :, :6], causal=causal)
        torch.testing.assert_close(out[1:, :, :queries], alone, atol=1e-6, rtol=1e-5)
    for kernel in ("softmax", "relu"):
        for causal in (False, True):
            assert_padding_invariant(build("performer", kernel=kernel, num_features=32), causal=causal)


@pytest.mark.parametrize("kernel", ["softmax", "relu"])
def test_fully_padded_rows_gradients_and_bf16(kernel):
    mech = build("performer", kernel=kernel, num_features=32)
    for causal in (False, True):
        assert_fully_padded_row_finite(mech, causal=causal)
        q, k, v = qkv(lq=10)
        assert call(mech, q, k, v, key_padding_mask=padding_mask(2, 10, [10, 0]), causal=causal)[1].abs().max() == 0
    assert_gradients_finite(mech)
    assert_gradients_finite(mech, causal=True, key_padding=True)
    q, k, v = qkv(lq=70)
    out = call(mech, q, k, v, causal=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = call(mech, q, k, v, causal=True)
    assert low.dtype == torch.bfloat16 and torch.isfinite(low).all()
    assert (low.float() - out).abs().max() < 0.1


def test_config_is_validated():
    for bad, says in (
        ({"kernel": "cosine"}, "kernel must be one of"),
        ({"num_features": 0}, "num_features must be >= 1"),
        ({"causal_chunk_size": 0}, "causal_chunk_size must be >= 1"),
        ({"redraw_interval": -1}, "redraw_interval must be >= 0"),
    ):
        with pytest.raises(ValueError, match=says):
            build("performer", **bad)


@pytest.mark.parametrize("is_query", [True, False])
def test_feature_eps_is_added_to_queries_and_keys_as_the_references_do(is_query):
    """φ(x) = (exp(w·x' − |x'|²/2 − max w·x') + eps)/√m for queries and keys alike (google-research
    softmax_kernel_transformation, performer-pytorch softmax_kernel); padded keys stay 0."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 2, 7, 8, generator=g, dtype=torch.float64)
    w = torch.randn(16, 8, generator=g, dtype=torch.float64)
    kpm = None if is_query else padding_mask(2, 7, [7, 4])
    feats = softmax_kernel_features(x, w, is_query=is_query, key_padding_mask=kpm, eps=0.01, eps_keys=True)
    xs = x * 8**-0.25
    dash = xs @ w.t()
    logits = dash - xs.square().sum(-1, keepdim=True) / 2
    if is_query:  # the stabiliser is a max of w·x' alone (both references)
        stab = dash.amax(-1, keepdim=True)
    else:
        stab = dash.masked_fill(kpm[:, None, :, None], -math.inf).amax(dim=(-2, -1), keepdim=True)
    expected = (torch.exp(logits - stab) + 0.01) / 16**0.5
    if not is_query:
        expected = expected.masked_fill(kpm[:, None, :, None], 0.0)
    torch.testing.assert_close(feats, expected, atol=1e-14, rtol=1e-12)


def test_features_are_redrawn_by_the_global_step_not_per_call():
    mech = build("performer", num_features=16, redraw_interval=3).train()
    q, k, v = qkv(lq=6)
    draws = []
    for step in [0, 0, 1, 2, 2, 2, 3, 3, 4, 5, 6, 6]:  # several passes per step share one draw
        mech(q, k, v, context=AttentionContext(step=step))
        draws.append((step, mech.projection.weight.clone()))
    distinct = [draws[0][1]]
    for _, w in draws[1:]:
        if not torch.equal(w, distinct[-1]):
            distinct.append(w)
    assert len(distinct) == 3 and mech.metrics() == {"feature_redraws": 2.0}
    assert [s for (s, w), (_, prev) in zip(draws[1:], draws) if not torch.equal(w, prev)] == [3, 6]
    assert int(mech.projection.drawn_at_step) == 6


def test_checkpoint_restores_the_projection_and_the_redraw_schedule():
    mech = build("performer", num_features=16, redraw_interval=3).train()
    q, k, v = qkv(lq=6)
    for step in range(5):  # redrawn at step 3
        mech(q, k, v, context=AttentionContext(step=step))
    state = {name: t.clone() for name, t in mech.state_dict().items()}
    assert {"projection.weight", "projection.drawn_at_step", "projection.redraws"} <= set(state)
    torch.manual_seed(99)
    restored = create_mechanism("performer", heads=2, dim_head=8, max_len=64, num_features=16, redraw_interval=3)
    assert not torch.equal(restored.projection.weight, mech.projection.weight)
    restored.load_state_dict(state)
    restored.train()
    ctx = AttentionContext(step=5)  # same draw interval as step 3: no redraw in either
    torch.testing.assert_close(restored(q, k, v, context=ctx), mech(q, k, v, context=ctx), atol=0, rtol=0)
    restored(q, k, v, context=AttentionContext(step=6))
    assert int(restored.projection.drawn_at_step) == 6 and int(restored.projection.redraws) == 2


def test_module_uses_key_eps_when_non_causal_and_not_when_causal():
    """Non-causal: the references' φ(k) with + eps; causal: keys without eps, so the all-keys
    stabiliser cancels and the future cannot leak (checked by the causality tests above)."""
    mech = build("performer", num_features=16, feature_eps=0.05)
    q, k, v = qkv(lq=9, dtype=torch.float64)
    w = mech.projection.weight.double()
    q_feats = softmax_kernel_features(q, w, is_query=True, eps=0.05)
    for causal in (False, True):
        k_feats = softmax_kernel_features(k, w, is_query=False, eps=0.05, eps_keys=not causal)
        ref = dense_kernel_attention(q_feats, k_feats, v, causal=causal)
        torch.testing.assert_close(call(mech, q, k, v, causal=causal), ref, atol=1e-12, rtol=1e-10)


@pytest.mark.parametrize("dtype,atol", [(torch.float32, 1e-5), (torch.bfloat16, 0.0)])
@pytest.mark.parametrize("large", ["past", "future"])
def test_causal_past_outputs_ignore_the_future_with_large_keys(dtype, atol, large):
    """The causal key stabiliser is a running max over keys ≤ j: large past keys (norm ~32 at
    d=16) with the future replaced, or large future keys, leave past outputs as they were
    (the old all-keys max underflowed the past and moved it by up to 3.1 in float32)."""
    torch.manual_seed(0)
    mech = create_mechanism("performer", heads=2, dim_head=16, max_len=256, causal_chunk_size=16).eval()
    b, h, length, t, d = 2, 2, 64, 40, 16
    q, k, v = (torch.randn(b, h, length, d) for _ in range(3))
    if large == "past":
        k[:, :, :t] = k[:, :, :t] / k[:, :, :t].norm(dim=-1, keepdim=True) * 32
    k2 = k.clone()
    if large == "past":
        k2[:, :, t:] = torch.randn(b, h, length - t, d)  # ordinary future keys
    else:
        k2[:, :, t:] = k2[:, :, t:] / k2[:, :, t:].norm(dim=-1, keepdim=True) * 32  # large future keys
    v2 = v.clone()
    v2[:, :, t:] = torch.randn(b, h, length - t, d)
    q, k, v, k2, v2 = (x.to(dtype) for x in (q, k, v, k2, v2))
    out = call(mech, q, k, v, causal=True).float()
    out2 = call(mech, q, k2, v2, causal=True).float()
    assert torch.isfinite(out).all() and torch.isfinite(out2).all()
    torch.testing.assert_close(out[:, :, :t], out2[:, :, :t], atol=atol, rtol=0)
    assert not torch.allclose(out[:, :, t:], out2[:, :, t:])


@pytest.mark.parametrize("scale", [1.0, 3.0])
def test_agrees_with_performer_pytorch_given_the_same_projection(scale):
    """The installed peer (performer-pytorch FastAttention, non-causal) with our projection
    matrix: the same outputs, eps placement included (the former stabiliser max(w·x' − |x'|²/2)
    differed from the peer by 0.48 at scale 1 and 2.4 at scale 3 here)."""
    pytest.importorskip("performer_pytorch")
    ours = build("performer", num_features=64, heads=2, dim_head=16).double()
    peer = build("performer_pytorch", num_features=64, heads=2, dim_head=16).double()
    peer.fast.projection_matrix = ours.projection.step(None).detach().clone()
    q, k, v = qkv(lq=40, dim=16, dtype=torch.float64, scale=scale)
    with torch.no_grad():
        diff = float((call(ours, q, k, v) - call(peer, q, k, v)).abs().max())
    assert diff < 1e-10, f"performer vs performer_pytorch: {diff:.3g}"
