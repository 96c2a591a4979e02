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

from mechanisms._blocks import pattern_as_dense
from mechanisms.longformer import LongformerConfig, longformer_pattern, longformer_pattern_reference


def oracle_with_pattern(q, k, v, pattern, **kwargs):
    bias = torch.zeros(pattern.shape, dtype=torch.float64).masked_fill(~pattern, float("-inf"))
    return dense_attention_oracle(q, k, v, bias=bias, **kwargs)


@pytest.mark.parametrize("global_tokens", [0, 1, 3])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("length", [1, 2, 29])
def test_matches_dense_oracle_with_window_and_globals(global_tokens, causal, length):
    cfg = LongformerConfig(window=6, global_tokens=global_tokens)
    mech = build("longformer", window=6, global_tokens=global_tokens)
    q, k, v = qkv(lq=length, dtype=torch.float64)
    kpm = padding_mask(2, length, [length, max(1, length - 6)])
    pattern = longformer_pattern_reference(length, cfg)
    out = call(mech, q, k, v, key_padding_mask=kpm, causal=causal)
    torch.testing.assert_close(out, oracle_with_pattern(q, k, v, pattern, key_padding_mask=kpm, causal=causal))


def test_block_pattern_is_the_band_plus_global_keys():
    """The gathered blocks give the band |i − j| ≤ w/2 and the global columns; global rows
    are computed densely apart."""
    cfg = LongformerConfig(window=4, global_tokens=2)
    key_index, allowed = longformer_pattern(19, cfg, causal=False)
    blocked = pattern_as_dense(key_index, allowed, block=2, query_len=19, key_len=19)[0]
    i, j = torch.arange(19)[:, None], torch.arange(19)[None, :]
    assert torch.equal(blocked, ((i - j).abs() <= 2) | (j < 2))


def test_window_covering_the_sequence_is_softmax():
    mech = build("longformer", window=40, global_tokens=0)
    q, k, v = qkv(lq=17, dtype=torch.float64)
    kpm = padding_mask(2, 17, [17, 11])
    torch.testing.assert_close(
        call(mech, q, k, v, key_padding_mask=kpm), dense_attention_oracle(q, k, v, key_padding_mask=kpm)
    )


def test_global_token_carries_information_across_the_sequence():
    """A far key reaches a local query only through the global token: with it, changing the
    last key changes the global row; without global tokens, the first rows stay put."""
    q, k, v = qkv(lq=20)
    k2, v2 = k.clone(), v.clone()
    k2[:, :, -1] += 3.0
    v2[:, :, -1] += 3.0
    local = build("longformer", window=4, global_tokens=0)
    torch.testing.assert_close(call(local, q, k, v)[:, :, :5], call(local, q, k2, v2)[:, :, :5], rtol=0, atol=0)
    glob = build("longformer", window=4, global_tokens=1)
    assert not torch.allclose(call(glob, q, k, v)[:, :, 0], call(glob, q, k2, v2)[:, :, 0])


def test_causal_and_padding():
    mech = build("longformer", window=4, global_tokens=2)
    assert_causal(mech, length=17, t=9)
    assert_padding_invariant(mech, lq=17)
    assert_padding_invariant(mech, lq=17, causal=True)
    q, k, v = qkv(lq=17)
    out = call(mech, q, k, v, causal=True)
    q2, k2, v2 = (x.clone() for x in (q, k, v))
    for x in (q2, k2, v2):
        x[:, :, 8:] = 1e4 * torch.randn_like(x[:, :, 8:])
    torch.testing.assert_close(out[:, :, :8], call(mech, q2, k2, v2, causal=True)[:, :, :8], rtol=0, atol=0)


@pytest.mark.slow
def test_no_quadratic_tensor():
    mech = build("longformer", heads=1, dim_head=16, max_len=8192)
    assert_subquadratic(mech, length=8192, causal=True, key_padding=True)


def test_bad_config_is_refused():
    with pytest.raises(ValueError, match="even window"):
        build("longformer", window=5)
