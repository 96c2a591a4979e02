"""MQAR: the generator's answers are recoverable from the sequence alone, seeded, no leak
between splits; the tagger head scores query positions only; the warm start's batches."""

import numpy as np
import pytest
import torch

from harness.train.training import ResumableBatches
from tasks.mqar import IGNORE, MQARConfig, generate_splits, solve, token_ranges

SMALL = dict(max_len=96, num_pairs=8, num_keys=16, num_values=8, num_noise=4, num_train=300, num_val=40, num_test=40)


def test_an_independent_solver_recovers_every_target():
    cfg = MQARConfig(**SMALL)
    for x, y in generate_splits(cfg).values():
        for tokens, targets in zip(x, y):
            assert solve(tokens, cfg) == targets.tolist()
            assert (targets != IGNORE).sum() == cfg.num_pairs  # one query per pair


def test_layout_pairs_in_the_context_queries_after_it():
    cfg = MQARConfig(**SMALL)
    key0, value0, noise0 = token_ranges(cfg)
    x, y = generate_splits(cfg)["test"]
    context = int(cfg.max_len * cfg.context_fraction)
    queries = np.argwhere(y != IGNORE)
    assert (queries[:, 1] >= context).all()
    is_key = (x >= key0) & (x < value0)
    assert (is_key[:, :context].sum(1) == cfg.num_pairs).all()  # every key once in the context ...
    assert (is_key[:, context:].sum(1) == cfg.num_pairs).all()  # ... and once as a query
    assert y[y != IGNORE].min() >= 0 and y.max() < cfg.num_values


def test_seeded_and_no_held_out_sequence_is_a_train_sequence():
    a, b = generate_splits(MQARConfig(**SMALL)), generate_splits(MQARConfig(**SMALL))
    for split in a:
        assert np.array_equal(a[split][0], b[split][0]) and np.array_equal(a[split][1], b[split][1])
    other = generate_splits(MQARConfig(**{**SMALL, "data_seed": 1}))
    assert not np.array_equal(a["train"][0], other["train"][0])
    # a tiny vocabulary makes repeats likely: they are redrawn, never shared across splits
    tight = dict(max_len=8, num_pairs=2, num_keys=2, num_values=2, num_noise=1, num_train=40, num_val=10, num_test=10)
    splits = generate_splits(MQARConfig(**tight))
    train = {row.tobytes() for row in splits["train"][0]}
    for split in ("validation", "test"):
        assert not any(row.tobytes() in train for row in splits[split][0])


@pytest.mark.parametrize(
    "bad, message",
    [
        (dict(num_pairs=40, num_keys=64, num_values=64), "cannot hold 40 pairs"),
        (dict(num_keys=4), "keys must be distinct"),
        (dict(num_values=4), "values must be distinct"),
        (dict(num_noise=0), "task.num_noise must be >= 1"),
        (dict(num_train_short=-1), "task.num_train_short must be >= 0"),
    ],
)
def test_bad_settings_are_one_clear_error(bad, message):
    with pytest.raises(ValueError, match=message):
        MQARConfig(**{**SMALL, **bad})


def test_the_warm_starts_short_split_has_its_own_size():
    """A 16K column trains on few long sequences (task.num_train) after a warm start on many short
    ones (task.num_train_short); unset, the short split is as large as the long one."""
    from tasks.mqar import MQAR

    long = MQAR(MQARConfig(**{**SMALL, "num_train": 20, "num_train_short": 300}))
    short = MQARConfig(**long.at_length(48))
    assert (short.max_len, short.num_train, short.num_train_short) == (48, 300, 0)
    assert len(generate_splits(short)["train"][0]) == 300 and len(generate_splits(long.cfg)["train"][0]) == 20
    plain = MQARConfig(**MQAR(MQARConfig(**SMALL)).at_length(48))
    assert plain.num_train == SMALL["num_train"]


def test_tagger_head_counts_query_positions_only():
    from harness.train.model import Encoder, ModelConfig, TaggerHead

    enc = Encoder(ModelConfig(dim=8, depth=1, heads=2, mlp_dim=8), vocab_size=10, max_len=6, mechanism="softmax")
    head = TaggerHead(enc, 3)
    targets = torch.tensor([[IGNORE, 2, IGNORE, 0, IGNORE, IGNORE], [1, IGNORE, IGNORE, IGNORE, IGNORE, 2]])
    logits = torch.full((2, 6, 3), -5.0)
    logits[0, 1, 2] = logits[0, 3, 1] = logits[1, 0, 1] = logits[1, 5, 2] = 5.0  # 3 of 4 queries right
    logits[0, 0, 0] = 9.0  # a non-query position: never counted
    loss, stats = head.loss(logits, {"targets": targets})
    assert int(stats["correct"]) == 3 and int(stats["count"]) == 4
    assert stats["item_correct"].tolist() == [1, 2] and stats["item_count"].tolist() == [2, 2]
    assert torch.isfinite(loss)


def test_warm_start_batches_short_first_then_long_and_seeded():
    s = ResumableBatches(5, 7, steps=4, short_batch=3, batch=2, seed=0)
    batches = list(s)
    assert len(batches) == 4 + 4
    assert all(i < 5 for b in batches[:4] for i in b) and all(len(b) == 3 for b in batches[:4])
    long = [i for b in batches[4:] for i in b]
    assert sorted(long) == list(range(5, 12))  # the long split once, after the warm-up
    assert batches == list(ResumableBatches(5, 7, steps=4, short_batch=3, batch=2, seed=0))
    second = list(s)  # the next iterator: the next epoch (no warm-up again), in its own order
    assert len(s) == 4 and len(second) == 4 and all(i >= 5 for b in second for i in b)
    assert sorted(i for b in second for i in b) == list(range(5, 12)) and second != batches[4:]


def test_warm_start_settings_are_checked_and_in_the_identity():
    from harness.train.cells import cell_identity
    from harness.train.config import TrainConfig, compose

    with pytest.raises(ValueError, match="needs both"):
        TrainConfig(warmup_length=128)
    with pytest.raises(ValueError, match="leaves no step"):
        TrainConfig(max_steps=10, warmup_length=128, warmup_length_steps=10)
    base = cell_identity(compose(["task=mqar", "scale=tiny"]))
    warm = cell_identity(compose(["task=mqar", "scale=tiny", "train.warmup_length=64", "train.warmup_length_steps=5"]))
    assert base != warm and warm["train"]["warmup_length"] == 64


def test_bag_of_ngrams_on_mqar_sits_near_chance():
    """The generator must not leak a query's value into the bag of tokens."""
    import datasets

    from harness.report.baselines import compute_baselines

    cfg = MQARConfig(**{**SMALL, "num_train": 600, "num_val": 100, "num_test": 100})
    dsd = datasets.DatasetDict(
        {
            s: datasets.Dataset.from_dict({"input_ids": x.tolist(), "targets": y.tolist()})
            for s, (x, y) in generate_splits(cfg).items()
        }
    )
    rows = {b["name"]: b for b in compute_baselines(dsd, "mqar")}
    chance = 1 / cfg.num_values
    assert rows["majority"]["n_test"] == 100 * cfg.num_pairs
    assert abs(rows["bag-of-n-grams LR"]["value"] - chance) < 0.05  # 800 queries: ±0.025 at 95%
    assert abs(rows["majority"]["value"] - chance) < 0.05


def test_a_resumed_warm_start_continues_where_it_stopped():
    """Each iterator starts where the trainer's step says the run stands (Lightning restarts a
    resumed epoch's iterator and never calls set_epoch on a batch sampler), so a killed and
    resumed cell sees the batches of an uninterrupted one, warm-up never repeated."""
    uninterrupted = ResumableBatches(5, 7, steps=4, short_batch=3, batch=2, seed=3)
    whole = list(uninterrupted) + list(uninterrupted) + list(uninterrupted)  # three epochs: 8 + 4 + 4
    assert len(whole) == 16
    for done in (0, 2, 4, 6, 8, 9, 12, 13):
        s = ResumableBatches(5, 7, steps=4, short_batch=3, batch=2, seed=3, batches_done=lambda done=done: done)
        epoch_end = 8 if done < 8 else 12 if done < 12 else 16
        assert list(s) == whole[done:epoch_end]  # the rest of the epoch the run stands in
        assert s.short_drawn == max(0, 4 - done)
    plain = ResumableBatches(0, 10, steps=0, short_batch=1, batch=4, seed=1)  # no warm start: plain batches
    first, second = list(plain), list(plain)
    assert sorted(i for b in first for i in b) == list(range(10)) and [len(b) for b in first] == [4, 4, 2]
    assert first != second and sorted(i for b in second for i in b) == list(range(10))


def test_under_ddp_each_rank_takes_its_share_of_every_epoch():
    """Two ranks: rank r takes batches r, r + 2, ... of the epoch, as many on each rank (the odd
    batch dropped), disjoint, and a resumed rank continues at its own next batch."""
    whole = list(ResumableBatches(5, 7, steps=4, short_batch=3, batch=2, seed=3))  # 8 batches in epoch 0
    ranks = [list(ResumableBatches(5, 7, steps=4, short_batch=3, batch=2, seed=3, rank=r, world=2)) for r in (0, 1)]
    assert ranks == [whole[0::2], whole[1::2]]
    third = ResumableBatches(0, 10, steps=0, short_batch=1, batch=4, seed=1, rank=1, world=2)  # 3 batches: 1 each
    assert len(list(third)) == 1
    resumed = ResumableBatches(5, 7, steps=4, short_batch=3, batch=2, seed=3, rank=1, world=2, batches_done=lambda: 2)
    assert list(resumed) == whole[1::2][2:]
