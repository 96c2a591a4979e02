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

from harness.registry import create_mechanism


def extended_oracle(mech, q, k, v, *, key_padding_mask=None, causal=False):
    """Softmax over [memory ; sequence] keys in float64; memory never masked (mask built by hand)."""
    b, lq, lk = q.shape[0], q.shape[-2], k.shape[-2]
    mk = mech.memory_keys.detach()[None].expand(b, -1, -1, -1)
    mv = mech.memory_values.detach()[None].expand(b, -1, -1, -1)
    n = mk.shape[-2]
    k_ext, v_ext = torch.cat([mk, k], 2), torch.cat([mv, v], 2)
    allowed = torch.ones(b, 1, lq, n + lk, dtype=torch.bool)
    if key_padding_mask is not None:
        allowed[:, :, :, n:] &= ~key_padding_mask[:, None, None, :]
    if causal:
        for i in range(lq):
            for j in range(lk):
                if j > i + (lk - lq):
                    allowed[:, :, i, n + j] = False
    bias = torch.zeros(allowed.shape, dtype=torch.float64).masked_fill(~allowed, float("-inf"))
    return dense_attention_oracle(q, k_ext, v_ext, bias=bias)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("lq,lk", [(9, 9), (5, 11), (11, 5)])
def test_matches_softmax_over_extended_keys(causal, lq, lk):
    mech = build("persistent_memory", num_slots=4)
    q, k, v = qkv(lq=lq, lk=lk)
    kpm = padding_mask(2, lk, [lk, max(lk - 3, 1)])
    for mask in (None, kpm):
        out = call(mech, q, k, v, key_padding_mask=mask, causal=causal)
        ref = extended_oracle(mech, q, k, v, key_padding_mask=mask, causal=causal)
        torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=1e-5)


def test_non_causal_oracle_via_extended_padding_mask():
    """The brief's recipe: extend key_padding_mask with False for the memory columns."""
    mech = build("persistent_memory", num_slots=3)
    q, k, v = qkv(lq=7)
    kpm = padding_mask(2, 7, [7, 4])
    b = q.shape[0]
    k_ext = torch.cat([mech.memory_keys.detach()[None].expand(b, -1, -1, -1), k], 2)
    v_ext = torch.cat([mech.memory_values.detach()[None].expand(b, -1, -1, -1), v], 2)
    kpm_ext = torch.cat([torch.zeros(b, 3, dtype=torch.bool), kpm], 1)
    ref = dense_attention_oracle(q, k_ext, v_ext, key_padding_mask=kpm_ext)
    torch.testing.assert_close(call(mech, q, k, v, key_padding_mask=kpm).double(), ref, atol=1e-5, rtol=1e-5)


def test_memory_changes_the_output():
    """The memory slots are really attended to: the result differs from plain softmax."""
    mech = build("persistent_memory")
    q, k, v = qkv(lq=8)
    out = call(mech, q, k, v)
    assert (out.double() - dense_attention_oracle(q, k, v)).abs().max() > 1e-2


def test_fully_padded_row_attends_to_memory_only():
    mech = build("persistent_memory", num_slots=5)
    q, k, v = qkv(lq=6)
    kpm = padding_mask(2, 6, [6, 0])
    for causal in (False, True):
        out = call(mech, q, k, v, key_padding_mask=kpm, causal=causal)
        assert torch.isfinite(out).all()
        mk = mech.memory_keys.detach()[None]
        mv = mech.memory_values.detach()[None]
        ref = dense_attention_oracle(q[1:], mk, mv)
        torch.testing.assert_close(out[1:].double(), ref, atol=1e-5, rtol=1e-5)


def test_slots_are_per_head_parameters_with_gradients():
    mech = create_mechanism("persistent_memory", heads=3, dim_head=8, max_len=32, num_slots=7)
    assert tuple(mech.memory_keys.shape) == (3, 7, 8) and tuple(mech.memory_values.shape) == (3, 7, 8)
    q, k, v = qkv(heads=3, lq=5)
    mech(q, k, v, key_padding_mask=padding_mask(2, 5, [5, 0])).square().sum().backward()
    assert mech.memory_keys.grad.abs().sum() > 0 and mech.memory_values.grad.abs().sum() > 0


def test_invalid_num_slots_is_rejected():
    with pytest.raises(ValueError, match="num_slots"):
        create_mechanism("persistent_memory", heads=2, dim_head=8, max_len=16, num_slots=0)


def test_bf16_autocast_close_to_fp32():
    mech = build("persistent_memory")
    q, k, v = qkv(lq=13)
    ref = call(mech, q, k, v, causal=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = call(mech, q, k, v, causal=True)
    torch.testing.assert_close(out.float(), ref, atol=5e-2, rtol=5e-2)


def test_contract_checks():
    mech = build("persistent_memory")
    for causal in (False, True):
        assert_padding_invariant(mech, causal=causal)
        assert_fully_padded_row_finite(mech, causal=causal)
        assert_gradients_finite(mech, causal=causal, key_padding=True)
    assert_causal(mech)
    assert_causal(mech, length=13, t=12)
