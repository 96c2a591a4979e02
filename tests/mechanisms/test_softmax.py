import pytest
import torch
from mechanism_checks import build, call, dense_attention_oracle, padding_mask, qkv


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("lq,lk", [(9, 9), (5, 11), (11, 5)])
def test_matches_oracle(causal, lq, lk):
    mech = build("softmax")
    q, k, v = qkv(lq=lq, lk=lk)
    kpm = padding_mask(2, lk, [lk, max(lk - 3, 1)])
    for mask in (None, kpm):
        out = call(mech, q, k, v, key_padding_mask=mask, causal=causal)
        ref = dense_attention_oracle(q, k, v, key_padding_mask=mask, causal=causal)
        torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=1e-5)


def test_cross_causal_is_bottom_right_aligned():
    """With Lq < Lk, the last query sees every key (as a decoder step with a cache does)."""
    mech = build("softmax")
    q, k, v = qkv(lq=3, lk=8)
    out = call(mech, q, k, v, causal=True)
    full = call(mech, q[:, :, -1:], k, v)
    torch.testing.assert_close(out[:, :, -1:], full)


def test_fully_padded_row_is_zero():
    mech = build("softmax")
    q, k, v = qkv(lq=6)
    kpm = padding_mask(2, 6, [6, 0])
    for causal in (False, True):
        out = call(mech, q, k, v, key_padding_mask=kpm, causal=causal)
        assert torch.isfinite(out).all()
        assert out[1].abs().max() == 0
