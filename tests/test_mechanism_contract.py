"""The mechanism contract, checked on every registered mechanism (those in mechanisms/,
the peer plugins, anything a researcher drops in): forward and backward at several
lengths (one not a multiple of 64, and length 1), float32 and bfloat16 autocast,
and the masking rules its capability flags promise."""

import pytest
import torch
from mechanism_checks import (
    assert_causal,
    assert_fully_padded_row_finite,
    assert_gradients_finite,
    assert_padding_invariant,
    build,
    call,
    padding_mask,
    qkv,
)

from harness.core.registry import discover, get_mechanism, list_mechanisms

discover()
MECHANISMS = list_mechanisms()
LENGTHS = [1, 17, 130]
MAX_LEN = 160


def caps(name):
    return get_mechanism(name).capabilities


def test_registry_has_the_research_mechanisms():
    expected = {
        "softmax",
        "performer",
        "nystrom",
        "rela",
        "rela_nystrom",
        "kernel_rpe",
        "persistent_memory",
        "gated",
        "bam",
        "babn",
        "relation_aware",
        "polynomial",
        "adaptive",
    }
    assert expected <= set(MECHANISMS), f"missing: {sorted(expected - set(MECHANISMS))}"


@pytest.mark.parametrize("length", LENGTHS)
@pytest.mark.parametrize("name", MECHANISMS)
def test_forward_backward_float32(name, length):
    mech = build(name, heads=2, dim_head=8, max_len=MAX_LEN).train()
    q, k, v = (x.requires_grad_() for x in qkv(lq=length, heads=2, dim=8))
    kpm = padding_mask(2, length, [length, max(1, length - 4)]) if caps(name).key_padding else None
    out = mech(q, k, v, key_padding_mask=kpm)
    assert out.shape == q.shape and out.dtype == q.dtype
    loss = out.float().square().mean()
    if mech.aux_loss is not None:
        assert mech.aux_loss.ndim == 0 and torch.isfinite(mech.aux_loss)
        loss = loss + mech.aux_loss
    loss.backward()
    ignored = get_mechanism(name).cls.ignored_inputs  # declared by mechanisms that mix v alone (fnet, s4d)
    for label, x in zip("qkv", (q, k, v)):
        if label in ignored:
            assert x.grad is None or not x.grad.any(), f"{label} is declared ignored but gets a gradient"
            continue
        assert x.grad is not None and torch.isfinite(x.grad).all()
    assert any(x.grad is not None and x.grad.abs().sum() > 0 for x in (q, k, v)), "no gradient reaches the inputs"
    for pname, p in mech.named_parameters():
        if p.grad is not None:
            assert torch.isfinite(p.grad).all(), f"non-finite gradient in {pname}"


@pytest.mark.parametrize("length", [17, 130])
@pytest.mark.parametrize("name", MECHANISMS)
def test_bfloat16_autocast_tracks_float32(name, length):
    """Under CPU bf16 autocast (inputs in bf16, as the backbone's projections give them)
    the output is finite and close to the float32 output in eval mode."""
    mech = build(name, heads=2, dim_head=8, max_len=MAX_LEN)
    q, k, v = qkv(lq=length, heads=2, dim=8)
    kpm = padding_mask(2, length, [length, length - 4]) if caps(name).key_padding else None
    ref = call(mech, q, k, v, key_padding_mask=kpm)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = call(mech, q.bfloat16(), k.bfloat16(), v.bfloat16(), key_padding_mask=kpm)
    assert torch.isfinite(out).all()
    rel = (out.float() - ref).abs().mean() / ref.abs().mean().clamp_min(1e-6)
    assert rel < 0.1, f"bf16 autocast output deviates by {rel:.3f} (relative L1) from float32"


@pytest.mark.parametrize("name", [n for n in MECHANISMS if caps(n).key_padding])
def test_padded_keys_have_no_influence(name):
    mech = build(name, heads=2, dim_head=8, max_len=MAX_LEN)
    assert_padding_invariant(mech, lq=17)
    if caps(name).causal:
        assert_padding_invariant(mech, lq=17, causal=True)


@pytest.mark.parametrize("name", [n for n in MECHANISMS if caps(n).key_padding])
def test_fully_padded_row_is_finite(name):
    mech = build(name, heads=2, dim_head=8, max_len=MAX_LEN)
    assert_fully_padded_row_finite(mech, length=17)
    if caps(name).causal:
        assert_fully_padded_row_finite(mech, length=17, causal=True)


@pytest.mark.parametrize("name", [n for n in MECHANISMS if caps(n).causal])
def test_causal_future_changes_nothing_before(name):
    mech = build(name, heads=2, dim_head=8, max_len=MAX_LEN)
    assert_causal(mech, length=17, t=9)


@pytest.mark.parametrize("name", [n for n in MECHANISMS if caps(n).causal])
def test_causal_gradients_finite(name):
    mech = build(name, heads=2, dim_head=8, max_len=MAX_LEN)
    assert_gradients_finite(mech, length=17, causal=True, key_padding=caps(name).key_padding)


@pytest.mark.parametrize("name", [n for n in MECHANISMS if caps(n).cross])
def test_cross_attention_shapes(name):
    mech = build(name, heads=2, dim_head=8, max_len=MAX_LEN)
    q, k, v = qkv(lq=5, lk=13, heads=2, dim=8)
    kpm = padding_mask(2, 13, [13, 7]) if caps(name).key_padding else None
    out = call(mech, q, k, v, key_padding_mask=kpm)
    assert out.shape == q.shape and torch.isfinite(out).all()


@pytest.mark.parametrize("name", [n for n in MECHANISMS if not caps(n).causal])
def test_missing_capability_is_refused(name):
    """A mechanism asked for what it cannot do raises, never silently ignores the request."""
    mech = build(name, heads=2, dim_head=8, max_len=MAX_LEN)
    q, k, v = qkv(lq=9, heads=2, dim=8)
    with pytest.raises(Exception, match="causal"):
        mech(q, k, v, causal=True)


@pytest.mark.parametrize("name", [n for n in MECHANISMS if not caps(n).key_padding])
def test_missing_key_padding_is_refused(name):
    mech = build(name, heads=2, dim_head=8, max_len=MAX_LEN)
    q, k, v = qkv(lq=9, heads=2, dim=8)
    with pytest.raises(Exception, match="key_padding|padding"):
        mech(q, k, v, key_padding_mask=padding_mask(2, 9, [9, 5]))


@pytest.mark.parametrize("name", [n for n in MECHANISMS if caps(n).causal and caps(n).cross])
@pytest.mark.parametrize("lq,lk", [(5, 13), (13, 5)])
def test_causal_cross_attention_is_bottom_right_aligned(name, lq, lk):
    """Causal with Lq != Lk: query i sees key j iff j <= i + (Lk - Lq). Changing the keys and
    values a query may not see changes nothing for it; the output has the contract's shape."""
    mech = build(name, heads=2, dim_head=8, max_len=MAX_LEN)
    q, k, v = qkv(lq=lq, lk=lk, heads=2, dim=8)
    out = call(mech, q, k, v, causal=True)
    assert out.shape == q.shape and torch.isfinite(out).all()
    offset = lk - lq
    for i in range(lq):
        first_unseen = i + offset + 1
        if first_unseen >= lk:
            continue
        k2, v2 = k.clone(), v.clone()
        k2[:, :, max(first_unseen, 0) :] = torch.randn_like(k2[:, :, max(first_unseen, 0) :]) * 3
        v2[:, :, max(first_unseen, 0) :] = torch.randn_like(v2[:, :, max(first_unseen, 0) :]) * 3
        out2 = call(mech, q, k2, v2, causal=True)
        torch.testing.assert_close(out[:, :, i], out2[:, :, i], atol=1e-5, rtol=1e-4)


def test_wrong_output_shape_is_a_contract_violation():
    """The base class checks every output against (B, H, Lq, D), whatever the mechanism."""
    from dataclasses import dataclass

    from harness.core.attention import Attention, ContractViolation

    @dataclass
    class NoConfig:
        pass

    class Pooled(Attention):
        name = "pooled_for_test"

        def forward(self, q, k, v, *, key_padding_mask=None, causal=False, context=None):
            return v.mean(-2, keepdim=True)

    mech = Pooled(NoConfig(), heads=2, dim_head=8, max_len=16)
    q, k, v = qkv(lq=9, heads=2, dim=8)
    with pytest.raises(ContractViolation, match=r"returned \(2, 2, 1, 8\)"):
        mech(q, k, v)


def test_a_mechanism_may_call_super_init_without_arguments():
    """The usual PyTorch way, super().__init__(), works through create_mechanism; outside it
    the error says what to write."""
    from dataclasses import dataclass

    from torch import nn

    from harness.core.attention import Attention
    from harness.core.registry import _MECHANISMS, create_mechanism, register_mechanism

    @dataclass
    class ScaledConfig:
        init: float = 0.5

    @register_mechanism("scaled_for_test", ScaledConfig, cross=True)
    class Scaled(Attention):
        def __init__(self, cfg, *, heads, dim_head, max_len):
            super().__init__()
            self.gain = nn.Parameter(torch.full((heads, 1, 1), cfg.init))

        def forward(self, q, k, v, *, key_padding_mask=None, causal=False, context=None):
            return self.gain * v.mean(-2, keepdim=True).expand(*q.shape[:-1], v.shape[-1])

    try:
        mech = create_mechanism("scaled_for_test", heads=3, dim_head=4, max_len=8, init=2.0)
        assert mech.heads == 3 and mech.cfg.init == 2.0 and mech.gain.shape == (3, 1, 1)
        with pytest.raises(TypeError, match="create_mechanism"):
            Scaled(ScaledConfig(), heads=3, dim_head=4, max_len=8)
    finally:
        _MECHANISMS.pop("scaled_for_test", None)
