"""Our reformer and sinkhorn against the peers a researcher would otherwise use
(reformer-pytorch, sinkhorn-transformer), wrapped in plugins/peers: where the math is
deterministic and the settings equal, the outputs agree; where a convention differs, the
test pins the difference down."""

import pytest
import torch
from mechanism_checks import build, call, qkv
from torch import nn

from harness.core.registry import discover, get_mechanism

discover()
pytest.importorskip("reformer_pytorch")
pytest.importorskip("sinkhorn_transformer")


def test_peers_are_registered_as_peers_with_equal_setting_names():
    for peer, ours in (("reformer_peer", "reformer"), ("sinkhorn_peer", "sinkhorn")):
        spec = get_mechanism(peer)
        assert spec.cls.peer_of == ours
        shared = set(spec.config_class.__dataclass_fields__) & set(
            get_mechanism(ours).config_class.__dataclass_fields__
        )
        assert shared == set(spec.config_class.__dataclass_fields__), shared


@pytest.mark.parametrize("n_hashes,bucket_size,length", [(1, 4, 16), (2, 4, 16), (4, 8, 48)])
def test_reformer_agrees_with_reformer_pytorch(n_hashes, bucket_size, length):
    """Same seed -> the same random rotations in both (ours draws from its layer seed, the peer
    from torch's RNG seeded with it); L a multiple of 2·bucket_size, no padding, non-causal: the
    same hashing, sort, chunks, self mask and round weights."""
    ours = build("reformer", bucket_size=bucket_size, n_hashes=n_hashes)
    peer = build("reformer_peer", bucket_size=bucket_size, n_hashes=n_hashes)
    q, k, v = qkv(lq=length)
    out = call(ours, q, k, v)
    torch.manual_seed(ours.draw_seed(0))  # the generator seed of our rotations (no context: step 0)
    ref = peer(q, k, v)
    diff = float((out - ref).abs().max())
    print(f"reformer vs reformer_peer, n_hashes={n_hashes}, L={length}: max abs difference {diff:.2e}")
    assert diff < 1e-5, f"max abs difference {diff}"
    assert not torch.allclose(out, call(ours, q * -1.0, k, v))  # it does depend on the hashed q


class _FixedSort(nn.Module):
    """Stands in for the library's sort net: returns a given sort matrix, slot × source."""

    def __init__(self, matrix):
        super().__init__()
        self.matrix = matrix

    def forward(self, q, k, topk=1):
        return self.matrix


def test_sinkhorn_agrees_with_sinkhorn_transformer_given_the_same_sort_matrix():
    """With our learned sort matrix put into the library, and v = k (see below), the block
    attention agrees exactly; with v ≠ k it does not, because the library's sorted values are
    its sorted keys (b_v_r = b_k_r in SinkhornAttention.forward, 0.11.4)."""
    block, length = 4, 16
    ours = build("sinkhorn", block_size=block, max_len=length, combine="joint")  # the library's one softmax
    peer = build("sinkhorn_peer", block_size=block, max_len=length)
    q, k, v = qkv(lq=length, dtype=torch.float64)
    ours.double()
    with torch.no_grad():
        perm = ours.sort_matrix(k, length // block, block)  # (B, H, N, N): source × slot
    peer.peer.sort_net = _FixedSort(perm.transpose(-1, -2).reshape(-1, length // block, length // block))
    with torch.no_grad():
        same = float((call(ours, q, k, k) - call(peer, q, k, k)).abs().max())
    assert same < 1e-12, f"max abs difference {same}"
    with torch.no_grad():
        differ = float((call(ours, q, k, v) - call(peer, q, k, v)).abs().max())
    print(f"sinkhorn vs sinkhorn_peer: max abs difference {same:.2e} (v = k), {differ:.2e} (v != k)")
    assert differ > 1e-2, f"the library's value convention changed? max abs difference {differ}"
