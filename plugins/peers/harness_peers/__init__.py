"""Peer implementations wrapped as harness mechanisms (an external plugin).

Importing this package registers ``performer_pytorch`` and ``nystrom_attention`` through
``harness.registry.register_mechanism``; the harness imports it through the entry-point
group ``harness.mechanisms`` (see this package's pyproject.toml).
"""

from harness_peers.nystrom import NystromAttentionPeer
from harness_peers.performer import PerformerPeer

__all__ = ["NystromAttentionPeer", "PerformerPeer"]
