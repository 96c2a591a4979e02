"""Registry-wide: an example's outputs do not depend on its row in the batch, on the other
rows, on how much padding the batch has, or on torch's global random state.

Each mechanism of this project (``mechanisms/``; the peers in plugins/ reproduce other
libraries as they are) is built once, in float64 and eval mode, and one example (length 200)
is run alone and then as row 0, 1 and 2 of a batch of 3 whose other rows are different
examples (one of the batch's full length, one short), with the batch padded by 0, 37 and 150
keys beyond the example (mechanisms without ``key_padding``: no padding, all rows full). The
global random state is moved between the calls, so a mechanism that draws at random (Reformer's
rotations, Skyformer's landmarks) must draw from its own layer seed, not from torch's RNG, and
the same numbers for every row.
"""

import pytest
import torch
import torch.nn.functional as F

from harness.core.registry import create_mechanism, get_mechanism, list_mechanisms

LENGTH, PADS, SHORT = 200, (0, 37, 150), 50

MECHANISMS = [n for n in list_mechanisms() if get_mechanism(n).module.startswith("mechanisms.")]


def batch_row_differences(name: str) -> dict[tuple[int, int], float]:
    """{(padding, row): max |alone − batched|} over the example's real tokens."""
    padded = get_mechanism(name).capabilities.key_padding
    total = LENGTH + max(PADS)
    torch.manual_seed(0)
    mech = create_mechanism(name, heads=2, dim_head=8, max_len=total).double().eval()
    for p in mech.parameters():  # non-trivial learned parts (gates, sort nets, convs, slots)
        torch.nn.init.normal_(p, std=0.3)
    gen = torch.Generator().manual_seed(1)
    example = [torch.randn(1, 2, LENGTH, 8, generator=gen, dtype=torch.float64) for _ in range(3)]
    others = [torch.randn(2, 2, total, 8, generator=gen, dtype=torch.float64) for _ in range(3)]
    with torch.no_grad():
        torch.rand(13)  # the global state moves between calls: draws must not come from it
        alone = mech(*example)
        diffs = {}
        for pad in PADS if padded else (0,):
            width = LENGTH + pad
            rows_len = [width, SHORT] if padded else [LENGTH, LENGTH]
            for row in range(3):
                q, k, v = (
                    torch.cat([o[:row, :, :width], F.pad(e, (0, 0, 0, width - LENGTH)), o[row:, :, :width]], 0)
                    for o, e in zip(others, example)
                )  # the example at `row`, the two others around it
                lengths = rows_len[:row] + [LENGTH] + rows_len[row:]
                kpm = torch.arange(width)[None, :] >= torch.tensor(lengths)[:, None] if padded else None
                torch.rand(7 + row + pad)
                out = mech(q, k, v, key_padding_mask=kpm) if padded else mech(q, k, v)
                assert torch.isfinite(out[row, :, :LENGTH]).all()
                diffs[(pad, row)] = float((out[row, :, :LENGTH] - alone[0]).abs().max())
    return diffs


def test_the_project_mechanisms_are_all_checked():
    assert {"reformer", "skyformer", "softmax", "nystrom"} <= set(MECHANISMS)


@pytest.mark.parametrize("name", MECHANISMS)
def test_an_example_gives_the_same_output_alone_and_at_any_row_of_a_batch(name):
    diffs = batch_row_differences(name)
    bad = {k: f"{v:.3g}" for k, v in diffs.items() if not v < 1e-9}
    assert not bad, f"{name}: (padding, row) -> max difference from the example alone: {bad}"
