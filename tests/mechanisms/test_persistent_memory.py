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

from harness.core.registry import create_mechanism


def reference_slots(mech):
    """The slots as the authors' code uses them (adaptive-span persistent_memory.py): stored
    key · √d_head and stored value · √N, in float64."""
    d, n = mech.memory_keys.shape[-1], mech.memory_keys.shape[-2]
    return mech.memory_keys.detach().double() * d**0.5, mech.memory_values.detach().double() * n**0.5


def extended_oracle(mech, q, k, v, *, key_padding_mask=None, causal=False):
    """Softmax over [memory ; sequence] keys in float64; memory never masked (mask built by hand)."""
    b, lq, lk = q.shape[0], q.shape[-2], k.shape[-2]
    mk, mv = reference_slots(mech)
    mk, mv = mk[None].expand(b, -1, -1, -1), mv[None].expand(b, -1, -1, -1)
    n = mk.shape[-2]
    k_ext, v_ext = torch.cat([mk, k.double()], 2), torch.cat([mv, v.double()], 2)
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
    mk, mv = reference_slots(mech)
    k_ext = torch.cat([mk[None].expand(b, -1, -1, -1), k.double()], 2)
    v_ext = torch.cat([mv[None].expand(b, -1, -1, -1), v.double()], 2)
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
        mk, mv = reference_slots(mech)
        ref = dense_attention_oracle(q[1:], mk[None], mv[None])
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


def test_slot_parametrisation_follows_the_reference():
    """Stored P_k ~ N(0, 1/d), P_v ~ N(0, 1/N); used as √d·P_k and √N·P_v: unit-scale slots,
    and a gradient on the stored parameter is √d (√N) times the one on the used slot."""
    d, n = 64, 256
    mech = create_mechanism("persistent_memory", heads=4, dim_head=d, max_len=32, num_slots=n)
    assert abs(float(mech.memory_keys.detach().std()) - d**-0.5) < 0.05 * d**-0.5
    assert abs(float(mech.memory_values.detach().std()) - n**-0.5) < 0.05 * n**-0.5
    keys, values = mech.memory()
    assert abs(float(keys.detach().std()) - 1.0) < 0.05 and abs(float(values.detach().std()) - 1.0) < 0.05
    q, k, v = qkv(batch=1, heads=4, lq=6, dim=d)
    mech(q, k, v).sum().backward()
    # the same loss through the used slots directly
    used_k = (mech.memory_keys.detach() * d**0.5).requires_grad_()
    used_v = (mech.memory_values.detach() * n**0.5).requires_grad_()
    from mechanisms.persistent_memory import persistent_memory_attention

    persistent_memory_attention(q, k, v, used_k, used_v).sum().backward()
    torch.testing.assert_close(mech.memory_keys.grad, used_k.grad * d**0.5)
    torch.testing.assert_close(mech.memory_values.grad, used_v.grad * n**0.5)


def test_output_matches_the_reference_formula_float64():
    """softmax([q·(√d P_k)ᵀ, q·Kᵀ] / √d) [√N P_v ; V], the reference's persistent_memory.forward."""
    mech = build("persistent_memory", num_slots=6)
    q, k, v = qkv(lq=9)
    mk, mv = reference_slots(mech)
    qd = q.double()
    scores = torch.cat([qd @ mk[None].transpose(-1, -2), qd @ k.double().transpose(-1, -2)], -1) / 8**0.5
    ref = torch.softmax(scores, -1) @ torch.cat([mv[None].expand(2, -1, -1, -1), v.double()], 2)
    torch.testing.assert_close(call(mech, q, k, v).double(), ref, atol=1e-5, rtol=1e-5)


def test_all_attention_preset_builds_the_papers_network():
    """+preset=all_attention: persistent memory (N = 1024, the paper's small model) replaces
    the feed-forward sublayer in every block."""
    from omegaconf import OmegaConf

    from harness.train.config import compose
    from harness.train.model import Encoder, ModelConfig

    cfg = compose(["+preset=all_attention", "task=listops", "scale=tiny"])
    assert cfg.mechanism.name == "persistent_memory" and cfg.mechanism.num_slots == 1024
    assert cfg.model.feedforward == "none"
    mech_cfg = {k: v for k, v in OmegaConf.to_container(cfg.mechanism).items() if k != "name"}
    encoder = Encoder(
        ModelConfig(**OmegaConf.to_container(cfg.model)),
        vocab_size=20,
        max_len=16,
        mechanism=cfg.mechanism.name,
        mechanism_cfg=mech_cfg,
    )
    assert all(block.mlp is None for block in encoder.blocks)
    assert all(m.memory_keys.shape[1] == 1024 for m in encoder.mechanisms)
