import pytest
import torch
from mechanism_checks import (
    assert_causal,
    assert_padding_invariant,
    assert_subquadratic,
    build,
    call,
    dense_attention_oracle,
    padding_mask,
    qkv,
)

import mechanisms.local
from mechanisms._blocks import pattern_as_dense
from mechanisms.local import (
    LocalConfig,
    local_attention,
    local_attention_reference,
    local_pattern,
    local_pattern_reference,
)


def oracle_with_pattern(q, k, v, pattern, **kwargs):
    bias = torch.zeros(pattern.shape, dtype=torch.float64).masked_fill(~pattern, float("-inf"))
    return dense_attention_oracle(q, k, v, bias=bias, **kwargs)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("length", [1, 9, 16])
def test_window_covering_the_sequence_is_softmax(length, causal):
    mech = build("local", window=16)
    q, k, v = qkv(lq=length, dtype=torch.float64)
    kpm = padding_mask(2, length, [length, max(1, length - 3)])
    out = call(mech, q, k, v, key_padding_mask=kpm, causal=causal)
    torch.testing.assert_close(out, dense_attention_oracle(q, k, v, key_padding_mask=kpm, causal=causal))


@pytest.mark.parametrize("exact", [False, True])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("back,fwd", [(1, 1), (2, 0), (0, 1)])
def test_matches_dense_oracle_with_the_window_pattern(exact, causal, back, fwd):
    cfg = dict(window=5, look_backward=back, look_forward=fwd, exact_window=exact)
    mech = build("local", **cfg)
    q, k, v = qkv(lq=23, dtype=torch.float64)
    kpm = padding_mask(2, 23, [23, 15])
    pattern = local_pattern_reference(23, LocalConfig(**cfg), causal=causal)
    out = call(mech, q, k, v, key_padding_mask=kpm, causal=causal)
    torch.testing.assert_close(out, oracle_with_pattern(q, k, v, pattern, key_padding_mask=kpm, causal=causal))
    key_index, allowed = local_pattern(23, LocalConfig(**cfg), causal=causal)
    blocked = pattern_as_dense(key_index, allowed, block=5, query_len=23, key_len=23)[0]
    if causal:
        blocked = blocked & torch.ones(23, 23, dtype=torch.bool).tril()
    assert torch.equal(blocked, pattern)


def test_keys_outside_the_window_have_no_influence():
    mech = build("local", window=4, look_backward=1, look_forward=0)
    q, k, v = qkv(lq=16)
    out = call(mech, q, k, v)
    k2, v2 = k.clone(), v.clone()
    k2[:, :, 12:] *= 1e4  # block 3 is outside the window of blocks 0 and 1
    v2[:, :, 12:] *= 1e4
    out2 = call(mech, q, k2, v2)
    torch.testing.assert_close(out[:, :, :8], out2[:, :, :8], rtol=0, atol=0)
    assert not torch.allclose(out[:, :, 12:], out2[:, :, 12:])


def test_causal_with_adversarial_magnitudes_in_float32():
    mech = build("local", window=4)
    assert_causal(mech, length=17, t=6)
    q, k, v = qkv(lq=17)
    out = call(mech, q, k, v, causal=True)
    q2, k2, v2 = (x.clone() for x in (q, k, v))
    for x in (q2, k2, v2):
        x[:, :, 9:] = 1e4 * torch.randn_like(x[:, :, 9:])
    out2 = call(mech, q2, k2, v2, causal=True)
    torch.testing.assert_close(out[:, :, :9], out2[:, :, :9], rtol=0, atol=0)


def test_padding_invariance_with_several_blocks():
    mech = build("local", window=3)
    assert_padding_invariant(mech, lq=17)
    assert_padding_invariant(mech, lq=17, causal=True)


@pytest.mark.slow
def test_no_quadratic_tensor():
    assert_subquadratic(build("local", heads=1, dim_head=16, max_len=8192), length=8192, causal=True, key_padding=True)


def test_bad_config_is_refused():
    with pytest.raises(ValueError, match="window"):
        build("local", window=0)


@pytest.mark.parametrize("exact", [False, True])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("back,fwd", [(1, 1), (2, 0), (0, 1), (0, 0)])
def test_fused_form_matches_the_reference_and_the_oracle_in_float64(exact, causal, back, fwd, monkeypatch):
    """The form that runs (blocks as heads of one SDPA call) against the plain gathered form and
    the dense oracle: values and gradients, with padding (a fully padded row included)."""
    cfg = LocalConfig(window=4, look_backward=back, look_forward=fwd, exact_window=exact)
    length = 37  # not a multiple of the window, and 2·(back+fwd+1)·w < 37: the fused form runs
    q, k, v = (x.requires_grad_() for x in qkv(lq=length, dtype=torch.float64))
    pattern = local_pattern_reference(length, cfg, causal=causal)
    for kpm in (None, padding_mask(2, length, [length, 22]), padding_mask(2, length, [length, 0])):
        ref = local_attention_reference(q, k, v, cfg, key_padding_mask=kpm, causal=causal)
        with monkeypatch.context() as patch:  # the fused form must not hand over to the reference here
            patch.setattr(mechanisms.local, "local_attention_reference", None)
            fast = local_attention(q, k, v, cfg, key_padding_mask=kpm, causal=causal)
        torch.testing.assert_close(fast, ref, rtol=0, atol=1e-12)
        torch.testing.assert_close(fast, oracle_with_pattern(q, k, v, pattern, key_padding_mask=kpm, causal=causal))
        g = torch.randn_like(fast)
        for a, b in zip(torch.autograd.grad(fast, (q, k, v), g), torch.autograd.grad(ref, (q, k, v), g)):
            torch.testing.assert_close(a, b, rtol=0, atol=1e-12)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("exact", [False, True])
def test_fused_form_tracks_the_reference_in_float32_and_bfloat16(causal, exact):
    cfg = LocalConfig(window=16, exact_window=exact)
    q, k, v = qkv(lq=200, heads=2, dim=16)
    kpm = padding_mask(2, 200, [200, 150])
    for mask in (None, kpm):
        ref = local_attention_reference(q, k, v, cfg, key_padding_mask=mask, causal=causal)
        torch.testing.assert_close(
            local_attention(q, k, v, cfg, key_padding_mask=mask, causal=causal), ref, rtol=1e-5, atol=1e-5
        )
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = local_attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), cfg, key_padding_mask=mask, causal=causal)
        assert torch.isfinite(low).all()
        assert (low.float() - ref).abs().mean() / ref.abs().mean() < 0.02
