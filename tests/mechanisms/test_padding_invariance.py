"""Padding-amount invariance, registry-wide: an example alone at its length and the same
example padded by 150 keys (mask set) give the same outputs on its real tokens.

The length (1100) is beyond the dense fallbacks (1024) so the efficient paths run. A
mechanism whose method depends on the padded length is listed in ``NOT_PADDING_INVARIANT``
with the reason; the test checks that the listed ones really differ, so a fix has to remove
its entry."""

import pytest
import torch

from harness.core.registry import create_mechanism, get_mechanism, list_mechanisms

LENGTH, PAD = 1100, 150

NOT_PADDING_INVARIANT = {
    "nystrom_attention": "peer (nystrom-attention library): segment-mean landmarks over the padded length",
}

MECHANISMS = [n for n in list_mechanisms() if get_mechanism(n).capabilities.key_padding]


def alone_vs_padded(name: str) -> float:
    torch.manual_seed(0)
    mech = create_mechanism(name, heads=1, dim_head=8, max_len=LENGTH + PAD).eval()
    q, k, v = (torch.randn(1, 1, LENGTH, 8) for _ in range(3))
    kpm = torch.zeros(1, LENGTH + PAD, dtype=torch.bool)
    kpm[:, LENGTH:] = True

    def pad(x):
        return torch.cat([x, torch.randn(1, 1, PAD, 8)], 2)

    qp, kp, vp = pad(q), pad(k), pad(v)  # drawn before the seed below, so random methods draw alike
    with torch.no_grad():
        torch.manual_seed(1)
        alone = mech(q, k, v)
        torch.manual_seed(1)
        padded = mech(qp, kp, vp, key_padding_mask=kpm)
    assert torch.isfinite(alone).all() and torch.isfinite(padded).all()
    return float((alone - padded[:, :, :LENGTH]).abs().max())


@pytest.mark.parametrize("name", MECHANISMS)
def test_padding_amount_does_not_change_real_outputs(name):
    diff = alone_vs_padded(name)
    if name in NOT_PADDING_INVARIANT:
        assert diff > 1e-3, f"{name} is now padding-invariant ({diff:.2g}): remove it from NOT_PADDING_INVARIANT"
    else:
        assert diff < 1e-4, f"{name}: real outputs move by {diff:.3g} with {PAD} padded keys"


# Mechanisms made padding-invariant per example (segment means, block and bucket counts from
# each example's real length): checked in float64 in a batch that mixes an example padded by
# 150, a full one and a short one (shorter than the landmarks / one block), against each alone
# (each in the first row, with the same random state: random draws are per row).
PER_EXAMPLE = ["nystrom", "rela_nystrom", "sinkhorn", "skyformer", "reformer", "bigbird"]
BATCH_LENGTHS = (LENGTH, LENGTH + PAD, 40)


def alone_vs_batched(name: str) -> float:
    torch.manual_seed(0)
    total = max(BATCH_LENGTHS)
    mech = create_mechanism(name, heads=2, dim_head=8, max_len=total).double().eval()
    for p in mech.parameters():  # non-trivial learned parts (gates, sort nets, convs)
        torch.nn.init.normal_(p, std=0.3)
    q, k, v = (torch.randn(len(BATCH_LENGTHS), 2, total, 8, dtype=torch.float64) for _ in range(3))
    kpm = torch.arange(total)[None, :] >= torch.tensor(BATCH_LENGTHS)[:, None]
    worst = 0.0
    with torch.no_grad():
        for i, n in enumerate(BATCH_LENGTHS):  # example i in the first row (a random draw is per row)
            order = [i] + [j for j in range(len(BATCH_LENGTHS)) if j != i]
            torch.manual_seed(1)
            batched = mech(q[order], k[order], v[order], key_padding_mask=kpm[order])
            torch.manual_seed(1)
            alone = mech(q[i : i + 1, :, :n], k[i : i + 1, :, :n], v[i : i + 1, :, :n])
            worst = max(worst, float((alone[0] - batched[0, :, :n]).abs().max()))
    return worst


@pytest.mark.parametrize("name", PER_EXAMPLE)
def test_each_example_in_a_mixed_batch_matches_itself_alone(name):
    assert name not in NOT_PADDING_INVARIANT
    diff = alone_vs_batched(name)
    assert diff < 1e-10, f"{name}: real outputs in a mixed-length batch differ from the example alone by {diff:.3g}"
