"""The block engine's two forms agree: gathered keys per query block (long sequences) and
the dense pattern matrix (short sequences, where each block gathers about every key)."""

import pytest
import torch

from mechanisms._blocks import dedup_keep_first, dense_pattern_attention, gathered_block_attention


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("per_head", [False, True])
def test_gathered_and_dense_forms_agree_in_float64(causal, per_head):
    g = torch.Generator().manual_seed(0)
    b, h, length, d, block, s = 2, 3, 64, 8, 8, 12  # 2·S < L: the gathered form runs
    q, k, v = (torch.randn(b, h, length, d, generator=g, dtype=torch.float64) for _ in range(3))
    p, n = (h if per_head else 1), length // block
    key_index = dedup_keep_first(torch.randint(-1, length, (p, n, s), generator=g))
    allowed = torch.rand(p, n, block, s, generator=g) > 0.3
    kpm = torch.zeros(b, length, dtype=torch.bool)
    kpm[1, 50:] = True
    gathered = gathered_block_attention(q, k, v, key_index, allowed, block=block, key_padding_mask=kpm, causal=causal)
    dense = dense_pattern_attention(q, k, v, key_index, allowed, block=block, key_padding_mask=kpm, causal=causal)
    torch.testing.assert_close(gathered, dense, atol=1e-12, rtol=1e-10)
    assert torch.isfinite(dense).all()
