"""harness.core.attention.computes_softmax: a mechanism that is softmax in disguise at a length
(a window or blocks that cover the sequence) is detected, and only then."""

import pytest

from harness.core.attention import computes_softmax
from harness.core.registry import create_mechanism


def check(name, length, causal=False, **overrides):
    return computes_softmax(
        create_mechanism(name, heads=2, dim_head=16, max_len=length, **overrides), length, causal=causal
    )


@pytest.mark.parametrize("causal", [False, True])
def test_softmax_is_softmax(causal):
    assert check("softmax", 200, causal) is True


def test_local_window_covering_the_sequence_is_softmax_and_a_shorter_one_is_not():
    assert check("local", 256, window=128) is True  # two blocks, each sees one block either way
    assert check("local", 384, window=128) is False  # three: the first block cannot see the last
    assert check("local", 384, window=128, look_backward=2, look_forward=2) is True
    assert check("local", 384, causal=True, window=128, look_backward=2) is True


def test_bigbird_blocks_covering_the_sequence_is_softmax_and_not_beyond():
    assert check("bigbird", 192, block_size=64) is True  # 3 blocks: window 3 covers them all
    assert check("bigbird", 1024, block_size=64) is False


@pytest.mark.parametrize("name", ["performer", "linear", "nystrom", "linformer"])
def test_approximations_are_not_softmax(name):
    assert check(name, 256) is False


def test_above_the_oracle_limit_is_not_checked():
    assert computes_softmax(create_mechanism("local", heads=1, dim_head=4, max_len=8192), 8192) is None
