import math

import pytest
import torch
from mechanism_checks import (
    assert_causal,
    assert_padding_invariant,
    build,
    call,
    dense_attention_oracle,
    largest_intermediate,
    padding_mask,
    qkv,
)

from mechanisms._blocks import pattern_as_dense
from mechanisms.sparse import SparseConfig, sparse_pattern, sparse_pattern_reference


def oracle_with_pattern(q, k, v, pattern, **kwargs):
    bias = torch.zeros(pattern.shape, dtype=torch.float64).masked_fill(~pattern, float("-inf"))
    return dense_attention_oracle(q, k, v, bias=bias, **kwargs)


def test_pattern_is_own_block_plus_summary_columns():
    pattern = sparse_pattern_reference(8, SparseConfig(stride=4, summary=1))
    expected = torch.tensor([[1, 1, 1, 1, 0, 0, 0, 1]] * 4 + [[0, 0, 0, 1, 1, 1, 1, 1]] * 4, dtype=torch.bool)
    assert torch.equal(pattern, expected)


@pytest.mark.parametrize("length", [1, 20, 37])
@pytest.mark.parametrize("causal", [False, True])
def test_matches_dense_oracle_with_the_fixed_pattern(length, causal):
    cfg = SparseConfig(stride=6, summary=2)
    mech = build("sparse", stride=6, summary=2)
    q, k, v = qkv(lq=length, dtype=torch.float64)
    kpm = padding_mask(2, length, [length, max(1, length - 7)])
    pattern = sparse_pattern_reference(length, cfg)
    out = call(mech, q, k, v, key_padding_mask=kpm, causal=causal)
    torch.testing.assert_close(out, oracle_with_pattern(q, k, v, pattern, key_padding_mask=kpm, causal=causal))
    blocked = pattern_as_dense(sparse_pattern(length, cfg), None, block=6, query_len=length, key_len=length)[0]
    assert torch.equal(blocked, pattern)


def test_summary_equal_to_stride_is_softmax():
    mech = build("sparse", stride=4, summary=4)
    q, k, v = qkv(lq=13, dtype=torch.float64)
    torch.testing.assert_close(call(mech, q, k, v, causal=True), dense_attention_oracle(q, k, v, causal=True))


def test_causal_and_padding():
    mech = build("sparse", stride=4, summary=1)
    assert_causal(mech, length=17, t=9)
    assert_padding_invariant(mech, lq=17)
    assert_padding_invariant(mech, lq=17, causal=True)
    q, k, v = qkv(lq=17)
    out = call(mech, q, k, v, causal=True)
    q2, k2, v2 = (x.clone() for x in (q, k, v))
    for x in (q2, k2, v2):
        x[:, :, 10:] = 1e4 * torch.randn_like(x[:, :, 10:])
    torch.testing.assert_close(out[:, :, :10], call(mech, q2, k2, v2, causal=True)[:, :, :10], rtol=0, atol=0)


@pytest.mark.slow
def test_cost_is_the_claimed_L_times_l_plus_cL_over_l():
    """The largest tensor is the (L, l + c·⌈L/l⌉) score block, far below L²."""
    length, stride, summary = 8192, 128, 8
    mech = build("sparse", heads=1, dim_head=16, max_len=length, stride=stride, summary=summary)
    largest, op = largest_intermediate(mech, length=length, causal=True)
    claimed = length * (stride + summary * math.ceil(length / stride))
    assert largest <= claimed, f"{op} built {largest} elements, claim {claimed}"
    assert largest < length**2 / 8


def test_bad_config_is_refused():
    with pytest.raises(ValueError, match="summary"):
        build("sparse", stride=4, summary=5)
