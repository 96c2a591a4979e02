"""Selective copying: the generator's answers are recoverable from the tokens alone, seeded, no
leak between splits, bad settings are one clear error, the per-query bag of tokens sits at
chance, and a tiny cell runs end to end (with and without a warm start)."""

import numpy as np
import pytest

from tasks.selective_copy import IGNORE, SelectiveCopyConfig, generate_splits, solve, token_ranges

SMALL = dict(max_len=96, num_tokens=8, num_values=8, num_noise=1, num_train=300, num_val=40, num_test=40)


@pytest.mark.parametrize("numbered", [True, False])
def test_an_independent_solver_recovers_every_target(numbered):
    cfg = SelectiveCopyConfig(**SMALL, numbered_markers=numbered)
    for x, y in generate_splits(cfg).values():
        for tokens, targets in zip(x, y):
            assert solve(tokens, cfg) == targets.tolist()


@pytest.mark.parametrize("numbered", [True, False])
def test_layout_data_tokens_first_markers_last(numbered):
    cfg = SelectiveCopyConfig(**{**SMALL, "num_noise": 3, "numbered_markers": numbered})
    value0, noise0, marker0 = token_ranges(cfg)
    x, y = generate_splits(cfg)["test"]
    m, slots = cfg.num_tokens, cfg.max_len - cfg.num_tokens
    assert (y[:, :slots] == IGNORE).all() and (y[:, slots:] != IGNORE).all()  # scored: the markers, all of them
    is_value = (x >= value0) & (x < noise0)
    assert (is_value[:, :slots].sum(1) == m).all() and not is_value[:, slots:].any()
    markers = x[:, slots:] - marker0
    assert (markers == (np.arange(m) if numbered else 0)).all()
    # the k-th marker's target is the k-th data token; values are distinct within a sequence
    for tokens, targets in zip(x, y):
        head = tokens[:slots]
        data = head[(head >= value0) & (head < noise0)] - value0
        assert data.tolist() == targets[slots:].tolist() and len(set(data.tolist())) == m
    noise = x[:, :slots][~is_value[:, :slots]]
    assert noise.min() >= noise0 and noise.max() < marker0 and len(np.unique(noise)) == cfg.num_noise
    # the data tokens are spread over the whole data part, not packed at its start
    positions = np.argwhere(is_value)[:, 1]
    assert positions.max() > 0.8 * slots and positions.min() < 0.2 * slots


def test_seeded_and_no_held_out_sequence_is_a_train_sequence():
    a, b = generate_splits(SelectiveCopyConfig(**SMALL)), generate_splits(SelectiveCopyConfig(**SMALL))
    for split in a:
        assert np.array_equal(a[split][0], b[split][0]) and np.array_equal(a[split][1], b[split][1])
    other = generate_splits(SelectiveCopyConfig(**{**SMALL, "data_seed": 1}))
    assert not np.array_equal(a["train"][0], other["train"][0])
    # 90 possible sequences (15 placements x 6 ordered value pairs): repeats are likely; they are
    # redrawn, never shared across splits
    tight = dict(max_len=8, num_tokens=2, num_values=3, num_noise=1, num_train=40, num_val=10, num_test=10)
    splits = generate_splits(SelectiveCopyConfig(**tight))
    train = {row.tobytes() for row in splits["train"][0]}
    assert len(train) < 40  # the train split itself has repeats: the check below is not vacuous
    for split in ("validation", "test"):
        assert not any(row.tobytes() in train for row in splits[split][0])
    with pytest.raises(RuntimeError, match="could not draw held-out sequences"):
        generate_splits(SelectiveCopyConfig(max_len=4, num_tokens=2, num_values=2, num_train=20, num_val=5, num_test=5))


@pytest.mark.parametrize(
    "bad, message",
    [
        (dict(num_tokens=50, num_values=50), r"task.max_len=96 cannot hold 50 data tokens and 50 markers"),
        (dict(num_values=4), r"task.num_values=4 < task.num_tokens=8"),
        (dict(num_noise=0), r"task.num_noise must be >= 1"),
        (dict(num_tokens=0), r"task.num_tokens must be >= 1"),
        (dict(num_test=0), r"task.num_test must be >= 1"),
    ],
)
def test_bad_settings_are_one_clear_error(bad, message):
    with pytest.raises(ValueError, match=message):
        SelectiveCopyConfig(**{**SMALL, **bad})


@pytest.mark.parametrize("numbered", [True, False])
def test_bag_of_ngrams_per_marker_sits_near_chance(numbered):
    """The generator must not leak a marker's value into the bag of tokens (with values drawn with
    replacement, as in the reference, the most frequent value would beat chance)."""
    import datasets

    from harness.report.baselines import compute_baselines

    cfg = SelectiveCopyConfig(
        **{**SMALL, "num_noise": 4, "numbered_markers": numbered, "num_train": 600, "num_val": 100, "num_test": 100}
    )
    dsd = datasets.DatasetDict(
        {
            s: datasets.Dataset.from_dict({"input_ids": x.tolist(), "targets": y.tolist()})
            for s, (x, y) in generate_splits(cfg).items()
        }
    )
    rows = {b["name"]: b for b in compute_baselines(dsd, "selective_copy")}
    chance = 1 / cfg.num_values
    assert rows["majority"]["n_test"] == 100 * cfg.num_tokens
    assert rows["bag-of-n-grams LR"]["items"]["count"] == [cfg.num_tokens] * 100
    assert abs(rows["bag-of-n-grams LR"]["value"] - chance) < 0.05  # 800 markers: ±0.023 at 95%
    assert abs(rows["majority"]["value"] - chance) < 0.05


@pytest.mark.slow
@pytest.mark.parametrize(
    "extra", [[], ["train.warmup_length=32", "train.warmup_length_steps=10"]], ids=["plain", "warm-start"]
)
def test_a_tiny_cell_runs_end_to_end(tmp_path, extra):
    from harness.train.config import compose
    from harness.train.run import run_cell

    cfg = compose(
        [
            "task=selective_copy",
            "mechanism=softmax",
            "scale=tiny",
            "trainer.progress_bar=false",
            f"results_dir={tmp_path / 'results'}",
            f"cache_dir={tmp_path / 'cache'}",
            *extra,
        ]
    )
    result = run_cell(cfg)
    assert result["status"] == "ok", result["error"]
    assert result["task"] == "selective_copy" and result["data"]["source"] == "generated"
    items = result["test_items"]  # every marker of every test sequence is scored
    assert items["count"] == [cfg.task.num_tokens] * cfg.task.num_test and len(items["correct"]) == cfg.task.num_test
    assert 0 <= result["metrics"]["test"]["accuracy"] <= 1
    if extra:
        assert result["data"]["warmup"]["max_len"] == 32
