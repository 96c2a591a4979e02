"""Causality under adversarial magnitudes, at float32.

``assert_causal`` perturbs the future with ordinary random numbers. A mechanism whose
causal path mixes the whole sequence numerically (a global FFT, a stabiliser or a
denominator floor taken over every key) passes that and still leaks: its round-off is
relative to the *whole* sequence's mass, so one huge future token moves earlier outputs.
Here the future holds a key aligned with a random feature (the largest feature value a
positive random feature map can produce), keys of huge norm, and values of 1e4, and the
outputs before it must not move beyond the contract tolerance.
"""

import pytest
import torch
from mechanism_checks import build, call, qkv

from harness.core.registry import discover, get_mechanism, list_mechanisms

discover()
ADVERSARIAL = [n for n in list_mechanisms() if get_mechanism(n).capabilities.causal]  # every causal mechanism


def adversarial_future(mech, q, k, v, t, variant):
    """Copies of q, k, v whose tokens t.. are adversarial (the past is untouched)."""
    q2, k2, v2 = q.clone(), k.clone(), v.clone()
    d = q.shape[-1]
    if variant == "aligned":  # key = the feature direction that maximises w·k − |k|²/2
        w = mech.projection.weight if hasattr(mech, "projection") else torch.randn(4, d)
        k2[:, :, t] = w[0] * d**0.25  # after the d^(-1/4) scaling: logit |w|²/2, the largest possible
        q2[:, :, t] = w[0] * d**0.25
    elif variant == "huge_norm":
        k2[:, :, t:] = torch.randn_like(k2[:, :, t:]) * 1e3
        q2[:, :, t:] = torch.randn_like(q2[:, :, t:]) * 1e3
    v2[:, :, t:] = torch.randn_like(v2[:, :, t:]) * 1e4
    return q2, k2, v2


@pytest.mark.parametrize("variant", ["aligned", "huge_norm"])
@pytest.mark.parametrize("name", ADVERSARIAL)
def test_future_with_adversarial_magnitudes_changes_nothing_before(name, variant):
    mech = build(name, heads=2, dim_head=8, max_len=64)
    length, t = 40, 29
    q, k, v = qkv(lq=length, heads=2, dim=8, seed=5)
    out = call(mech, q, k, v, causal=True)
    q2, k2, v2 = adversarial_future(mech, q, k, v, t, variant)
    out2 = call(mech, q2, k2, v2, causal=True)
    assert torch.isfinite(out2).all()
    torch.testing.assert_close(out2[:, :, :t], out[:, :, :t], atol=1e-5, rtol=1e-4)
    assert not torch.allclose(out2[:, :, t:], out[:, :, t:])
