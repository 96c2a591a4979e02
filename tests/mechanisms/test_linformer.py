import math
import warnings

import pytest
import torch
from mechanism_checks import (
    assert_padding_invariant,
    assert_subquadratic,
    build,
    call,
    dense_attention_oracle,
    padding_mask,
    qkv,
)


def test_identity_projections_give_softmax():
    """E = F = I (k = L = max_len): Eᵀ K = K, Fᵀ V = V, so Linformer is softmax attention."""
    mech = build("linformer", max_len=11, k=11).double()
    with torch.no_grad():
        mech.proj_k.copy_(torch.eye(11))
        mech.proj_v.copy_(torch.eye(11))
    q, k, v = qkv(lq=11, dtype=torch.float64)
    torch.testing.assert_close(call(mech, q, k, v), dense_attention_oracle(q, k, v))


def test_shorter_inputs_use_the_leading_rows_of_the_projections():
    mech = build("linformer", max_len=32, k=6).double()
    q, k, v = qkv(lq=5, lk=20, dtype=torch.float64)
    kpm = padding_mask(2, 20, [20, 14])
    out = call(mech, q, k, v, key_padding_mask=kpm)
    keep = (~kpm).double()[:, None, :, None]
    e, f = mech.proj_k[:20].detach(), mech.proj_v[:20].detach()
    k_low = torch.einsum("bhjd,jr->bhrd", k * keep, e)
    v_low = torch.einsum("bhjd,jr->bhrd", v * keep, f)
    ref = torch.softmax(q @ k_low.transpose(-1, -2) / math.sqrt(8), -1) @ v_low
    torch.testing.assert_close(out, ref)


def test_padded_keys_have_no_influence_and_empty_rows_are_zero():
    mech = build("linformer", k=8)
    assert_padding_invariant(mech, lq=17)
    q, k, v = qkv(lq=9)
    out = call(mech, q, k, v, key_padding_mask=padding_mask(2, 9, [9, 0]))
    assert torch.equal(out[1], torch.zeros_like(out[1]))


def test_share_kv_uses_one_projection():
    shared, separate = build("linformer", share_kv=True, k=8), build("linformer", k=8)
    assert shared.proj_v is None
    assert sum(p.numel() for p in separate.parameters()) == 2 * sum(p.numel() for p in shared.parameters())


def test_projections_are_learned():
    mech = build("linformer", k=8).train()
    q, k, v = qkv(lq=12)
    call(mech, q, k, v).square().mean().backward()
    assert mech.proj_k.grad.abs().sum() > 0 and mech.proj_v.grad.abs().sum() > 0
    assert mech.proj_k.grad[12:].abs().sum() == 0, "rows past the input length are not used"


def test_too_long_input_is_refused_with_the_fix():
    mech = build("linformer", max_len=16, k=4)
    q, k, v = qkv(lq=20)
    with pytest.raises(ValueError, match="max_len >= 20"):
        mech(q, k, v)


def test_causal_is_refused():
    q, k, v = qkv(lq=8)
    with pytest.raises(Exception, match="causal"):
        build("linformer")(q, k, v, causal=True)


@pytest.mark.slow
def test_no_quadratic_tensor():
    assert_subquadratic(build("linformer", heads=1, dim_head=16, max_len=8192), length=8192, key_padding=True)


def test_k_at_least_the_length_warns_once_and_is_recorded():
    mech = build("linformer", k=32)
    q, k, v = qkv(lq=20)
    with pytest.warns(UserWarning, match="k=32 >= 20 keys"):
        call(mech, q, k, v)
    assert mech.metrics()["k_over_length"] == pytest.approx(32 / 20)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        call(mech, q, k, v)  # once per instance
        q, k, v = qkv(lq=40)
        call(build("linformer", k=32), q, k, v)  # compressing: no warning
    assert build("linformer", k=32).metrics()["k_over_length"] == 0.0


def test_lra_preset_is_lra_linformer_k16_shared():
    """google-research/long-range-arena linformer_attention.py: low_rank_features=16, one lr_kernel."""
    from harness.train.config import compose

    cfg = compose(["+preset=lra_linformer"])
    assert (cfg.mechanism.name, cfg.mechanism.k, cfg.mechanism.share_kv) == ("linformer", 16, True)
    assert compose(["+preset=lra_synthesizer"]).mechanism.mode == "random"
    assert compose(["+preset=lra_synthesizer"]).mechanism.add_dot_product


def test_outputs_and_gradients_equal_the_written_out_formula():
    """softmax(Q (EᵀK)ᵀ/√d) (FᵀV) written out in float64: the mechanism's outputs and the gradients
    of q, k, v, E and F agree (the fused kernel computes the same function), padding included."""
    from mechanisms.linformer import linformer_attention

    q, k, v = qkv(lq=9, lk=20, dtype=torch.float64)
    kpm = padding_mask(2, 20, [20, 13])
    e, f = torch.randn(24, 6, dtype=torch.float64), torch.randn(24, 6, dtype=torch.float64)
    grad = torch.randn_like(q)

    def written_out(q, k, v, e, f, key_padding_mask):
        keep = ~key_padding_mask[:, None, :, None]
        k_low = torch.einsum("bhjd,jr->bhrd", k * keep, e[:20])
        v_low = torch.einsum("bhjd,jr->bhrd", v * keep, f[:20])
        return torch.softmax(q @ k_low.transpose(-1, -2) / math.sqrt(q.shape[-1]), -1) @ v_low

    results = []
    for fn in (lambda *a: linformer_attention(*a[:5], key_padding_mask=a[5]), written_out):
        inputs = [x.detach().clone().requires_grad_() for x in (q, k, v, e, f)]
        out = fn(*inputs, kpm)
        (out * grad).sum().backward()
        results.append((out, *(x.grad for x in inputs)))
    torch.testing.assert_close(results[0], results[1], atol=1e-10, rtol=1e-10)
