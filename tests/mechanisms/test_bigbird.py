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

from harness.core.registry import create_mechanism
from mechanisms.bigbird import BigBirdConfig, bigbird_pattern_reference, random_blocks

SMALL = dict(block_size=3, window_blocks=3, global_blocks=1, random_blocks=2)


def oracle_with_pattern(q, k, v, pattern, **kwargs):
    bias = torch.zeros(pattern.shape, dtype=torch.float64).masked_fill(~pattern, float("-inf"))
    return dense_attention_oracle(q, k, v, bias=bias[None], **kwargs)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("length", [1, 7, 38])
def test_matches_dense_oracle_with_the_same_pattern(causal, length):
    """Each example follows the pattern of its own real length (as if alone), padded or not."""
    cfg = BigBirdConfig(**SMALL, seed=5)
    mech = build("bigbird", **SMALL, seed=5)
    q, k, v = qkv(lq=length, dtype=torch.float64)
    reals = [length, max(1, length - 5)]
    for kpm in (None, padding_mask(2, length, reals)):
        out = call(mech, q, k, v, key_padding_mask=kpm, causal=causal)
        for i, real in enumerate(reals if kpm is not None else [length, length]):
            _, rand = mech.pattern(real, causal=causal)
            pattern = bigbird_pattern_reference(real, cfg, rand)  # (H, ℓ, ℓ)
            one = (x[i : i + 1, :, :real] for x in (q, k, v))
            torch.testing.assert_close(out[i : i + 1, :, :real], oracle_with_pattern(*one, pattern, causal=causal))


@pytest.mark.parametrize("causal", [False, True])
def test_gathered_path_matches_the_oracle_per_example(causal):
    """Beyond the dense fallback (2·S < L: S = 8 blocks of 4 = 32 keys, L = 80), padded batch."""
    cfg = BigBirdConfig(block_size=4, window_blocks=3, global_blocks=1, random_blocks=3, seed=7)
    mech = build("bigbird", block_size=4, window_blocks=3, global_blocks=1, random_blocks=3, seed=7, max_len=96)
    q, k, v = qkv(lq=80, dtype=torch.float64)
    reals = [80, 57]
    out = call(mech, q, k, v, key_padding_mask=padding_mask(2, 80, reals), causal=causal)
    for i, real in enumerate(reals):
        _, rand = mech.pattern(real, causal=causal)
        pattern = bigbird_pattern_reference(real, cfg, rand)
        one = (x[i : i + 1, :, :real] for x in (q, k, v))
        torch.testing.assert_close(out[i : i + 1, :, :real], oracle_with_pattern(*one, pattern, causal=causal))


def test_each_layer_draws_its_own_random_blocks():
    """The authors seed each layer (its index): by default each instance draws its own seed;
    an explicit seed is shared."""
    torch.manual_seed(0)  # as a model is built: one seed, then the layers one after another
    layers = [create_mechanism("bigbird", heads=2, dim_head=8, max_len=64, **SMALL) for _ in range(3)]
    tables = [layer.pattern(60)[1] for layer in layers]
    assert not torch.equal(tables[0], tables[1]) and not torch.equal(tables[1], tables[2])
    fixed = [build("bigbird", **SMALL, seed=4).pattern(60)[1] for _ in range(2)]
    assert torch.equal(fixed[0], fixed[1])


def test_random_blocks_are_deterministic_per_seed_outside_window_and_globals():
    cfg = BigBirdConfig(block_size=4, random_blocks=3, seed=1)
    a, b = random_blocks(20, 4, cfg, causal=False), random_blocks(20, 4, cfg, causal=False)
    assert torch.equal(a, b)
    assert not torch.equal(a, random_blocks(20, 4, BigBirdConfig(block_size=4, random_blocks=3, seed=2), causal=False))
    assert not torch.equal(a[0], a[1]), "heads draw their own random blocks"
    qb = torch.arange(20)[None, :, None]
    chosen = a >= 0
    assert chosen[:, 2:-2].all(), "middle blocks have enough candidates"
    assert ((a - qb).abs() > 1)[chosen].all() and ((a > 0) & (a < 19))[chosen].all()
    causal = random_blocks(20, 4, cfg, causal=True)
    assert (causal < qb)[causal >= 0].all()


def test_outputs_are_deterministic_across_instances():
    q, k, v = qkv(lq=40)
    one = call(build("bigbird", **SMALL, seed=3), q, k, v)
    two = call(build("bigbird", **SMALL, seed=3), q, k, v)
    torch.testing.assert_close(one, two, rtol=0, atol=0)


def test_all_blocks_global_is_softmax():
    mech = build("bigbird", block_size=4, global_blocks=3, random_blocks=1)
    q, k, v = qkv(lq=21, dtype=torch.float64)
    kpm = padding_mask(2, 21, [21, 13])
    torch.testing.assert_close(
        call(mech, q, k, v, key_padding_mask=kpm), dense_attention_oracle(q, k, v, key_padding_mask=kpm)
    )


def test_causal_and_padding():
    mech = build("bigbird", **SMALL)
    assert_causal(mech, length=17, t=9)
    assert_padding_invariant(mech, lq=17)
    assert_padding_invariant(mech, lq=17, causal=True)
    q, k, v = qkv(lq=30)
    out = call(mech, q, k, v, causal=True)
    q2, k2, v2 = (x.clone() for x in (q, k, v))
    for x in (q2, k2, v2):
        x[:, :, 14:] = 1e4 * torch.randn_like(x[:, :, 14:])
    torch.testing.assert_close(out[:, :, :14], call(mech, q2, k2, v2, causal=True)[:, :, :14], rtol=0, atol=0)


@pytest.mark.slow
def test_no_quadratic_tensor():
    """Blocks of 32: (2g + 3 + r)·b = 256 keys per query, 1/32 of L = 8192."""
    mech = build("bigbird", heads=1, dim_head=16, max_len=8192, block_size=32)
    assert_subquadratic(mech, length=8192, key_padding=True)


def test_bad_config_is_refused():
    with pytest.raises(ValueError, match="odd window_blocks"):
        build("bigbird", window_blocks=2)
