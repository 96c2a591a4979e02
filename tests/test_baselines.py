"""The report's non-attention baselines on tiny DatasetDicts with known answers."""

import math

import datasets
import numpy as np
import pytest

from harness.report import baselines


def classification(rng, n, length=20, vocab=30):
    """Label 1 iff token 7 occurs: a bag of tokens solves it exactly."""
    ids, labels = [], []
    for i in range(n):
        seq = rng.integers(8, vocab, size=length)
        label = i % 2
        if label:
            seq[rng.integers(length)] = 7
        ids.append(seq.tolist())
        labels.append(label)
    return datasets.Dataset.from_dict({"input_ids": ids, "label": labels})


def test_bag_of_ngrams_solves_a_bag_of_tokens_task_and_majority_is_the_train_mode():
    rng = np.random.default_rng(0)
    dsd = datasets.DatasetDict(
        {"train": classification(rng, 200), "validation": classification(rng, 60), "test": classification(rng, 60)}
    )
    majority, lr = baselines.compute_baselines(dsd, "text")
    assert majority["name"] == "majority" and majority["value"] == pytest.approx(0.5)
    assert lr["name"] == "bag-of-n-grams LR" and lr["value"] >= 0.9 and lr["n_test"] == 60


def pairs(rng, n, length=60):
    """Label 1: the second document repeats the first with a few bytes changed."""
    first, second, labels = [], [], []
    for i in range(n):
        a = rng.integers(1, 257, size=length)
        b = a.copy() if i % 2 else rng.integers(1, 257, size=length)
        b[rng.integers(length, size=3)] = 5
        first.append(a.tolist()), second.append(b.tolist()), labels.append(i % 2)
    return datasets.Dataset.from_dict({"input_ids_1": first, "input_ids_2": second, "label": labels})


def test_trigram_cosine_separates_copies_with_a_validation_threshold():
    rng = np.random.default_rng(1)
    dsd = datasets.DatasetDict({"train": pairs(rng, 10), "validation": pairs(rng, 40), "test": pairs(rng, 40)})
    names = [b["name"] for b in baselines.compute_baselines(dsd, "retrieval")]
    assert names == ["majority", "byte-trigram cosine"]
    cosine = baselines.trigram_cosine_baseline(dsd)
    assert cosine["value"] == 1.0 and 0.0 < cosine["choice"] < 1.0


def test_best_threshold_finds_the_direction():
    scores = np.array([1.0, 2.0, 3.0, 4.0])
    assert baselines.best_threshold(scores, np.array([1, 1, 0, 0])) == (2.5, False)
    threshold, greater = baselines.best_threshold(scores, np.array([0, 0, 1, 1]))
    assert greater and 2.0 < threshold < 3.0


def test_dot_distance_finds_the_generators_dots():
    """On images from the real snakes generator, tokenised as the task does, both dots are found."""
    from tasks.pathfinder import PathfinderConfig, generator_for, to_dataset

    cfg = PathfinderConfig(
        resolution=16, max_len=256, difficulty="easy", contour_length=3, distractor_length=1, num_distractors=0
    )
    generator = generator_for(cfg)
    splits = {}
    for split, seed in (("train", 0), ("validation", 1), ("test", 2)):
        splits[split] = to_dataset(*generator.images(24, seed))
    dsd = datasets.DatasetDict(splits)
    tokens = np.asarray(dsd["test"]["input_ids"]).reshape(-1, 16, 16)
    distances = baselines.dot_distances(tokens)
    assert np.isfinite(distances).all() and (distances > 0).all()
    result = baselines.compute_baselines(dsd, "pathfinder")[1]
    assert result["name"] == "dot distance" and 0.0 <= result["value"] <= 1.0


def test_dot_distance_thresholds_synthetic_dots():
    def images(n):
        out, labels = np.ones((n, 16, 16), np.int64), []
        for i in range(n):
            out[i, 2, 2] = 256
            near = i % 2
            out[i, (4 if near else 13), (4 if near else 13)] = 256
            labels.append(near)
        return datasets.Dataset.from_dict({"input_ids": out.reshape(n, -1).tolist(), "label": labels})

    dsd = datasets.DatasetDict({"train": images(4), "validation": images(10), "test": images(10)})
    result = baselines.dot_distance_baseline(dsd)
    assert result["value"] == 1.0


def lm_split(rng, n, length=40, k=8):
    """A deterministic chain x_{t+1} = x_t % k + 1 from a random start: bigram ≈ 0 bits."""
    seqs = []
    for _ in range(n):
        x = [int(rng.integers(1, k + 1))]
        for _ in range(length - 1):
            x.append(x[-1] % k + 1)
        seqs.append([k + 1] + x)  # start token first
    return datasets.Dataset.from_dict({"input_ids": seqs})


def test_bigram_beats_unigram_on_a_chain_with_an_interval():
    rng = np.random.default_rng(2)
    dsd = datasets.DatasetDict({"train": lm_split(rng, 50), "validation": lm_split(rng, 20), "test": lm_split(rng, 20)})
    unigram, bigram = baselines.compute_baselines(dsd, "protein_lm")
    assert unigram["metric"] == bigram["metric"] == "bits_per_token"
    assert unigram["value"] == pytest.approx(math.log2(8), abs=0.05)  # uniform over 8 residues
    assert bigram["value"] < 0.2 and bigram["value"] < unigram["value"]
    assert unigram["half_width"] == pytest.approx(0.0, abs=1e-9)  # every test sequence costs the same bits
    assert unigram["n_test"] == 20


def test_bits_interval_is_over_sequences():
    # two sequences: 2 tokens at 1 bit each, 2 tokens at 3 bits each -> mean 2 bits/token
    mean, half = baselines._lm_bits(-np.array([1.0, 1.0, 3.0, 3.0]), np.array([2, 2]))
    assert mean == pytest.approx(2.0)
    # residuals (2 - 4)/2 = -1 and (6 - 4)/2 = 1: SE = sqrt(2 / (2 * 1)) = 1
    assert half == pytest.approx(baselines.Z95 * 1.0)


def test_baselines_are_cached_per_fingerprint(tmp_path):
    rng = np.random.default_rng(3)
    dsd = datasets.DatasetDict(
        {"train": classification(rng, 40), "validation": classification(rng, 20), "test": classification(rng, 20)}
    )
    dsd.save_to_disk(str(tmp_path / "cache" / "data"))
    store = tmp_path / "store"
    first = baselines.baselines_for("text", "abc", str(tmp_path / "cache"), store)
    assert [b["name"] for b in first["baselines"]] == ["majority", "bag-of-n-grams LR"]
    assert (store / f"text-abc-v{baselines.VERSION}.json").exists()
    import shutil

    shutil.rmtree(tmp_path / "cache")  # the cache is gone: the stored result still answers
    assert baselines.baselines_for("text", "abc", str(tmp_path / "cache"), store)["baselines"] == first["baselines"]
    missing = baselines.baselines_for("text", "other", str(tmp_path / "cache"), store)
    assert missing["baselines"] == [] and "not found" in missing["error"]


def test_pixel_and_kmer_lr_see_what_a_bag_of_tokens_cannot():
    """A class given by *where* bright pixels are (same pixel histogram, so a bag of tokens sees
    nothing) is solved by pixel LR, and a class given by a 3-token motif by the 3-mer LR."""
    import datasets
    import numpy as np

    from harness.report.baselines import kmer_lr_baseline, pixel_lr_baseline

    rng = np.random.default_rng(0)

    def images(n):
        y = rng.integers(0, 2, n)
        x = np.ones((n, 16), dtype=np.int64)
        for i, label in enumerate(y):
            x[i, [0, 1] if label else [14, 15]] = 256  # same histogram, different place
        return {"input_ids": x.tolist(), "label": y.tolist()}

    dsd = datasets.DatasetDict(
        {s: datasets.Dataset.from_dict(images(n)) for s, n in (("train", 200), ("validation", 50), ("test", 50))}
    )
    assert pixel_lr_baseline(dsd)["value"] == 1.0

    def motifs(n):
        y = rng.integers(0, 2, n)
        rows = []
        for label in y:
            a = list(rng.integers(5, 9, 30))
            a[10:13] = [1, 2, 3] if label else [3, 2, 1]
            rows.append(a)
        return {"input_ids": rows, "label": y.tolist()}

    dsd = datasets.DatasetDict(
        {s: datasets.Dataset.from_dict(motifs(n)) for s, n in (("train", 300), ("validation", 60), ("test", 60))}
    )
    assert kmer_lr_baseline(dsd)["value"] > 0.95


def test_every_accuracy_baseline_records_its_outcome_per_test_item():
    """The paired tests of the report need each baseline's outcome on every test item, in test
    order: they sum to the baseline's accuracy; per-position tasks count queries per sequence."""
    rng = np.random.default_rng(0)
    dsd = datasets.DatasetDict(
        {"train": classification(rng, 200), "validation": classification(rng, 60), "test": classification(rng, 60)}
    )
    for b in baselines.compute_baselines(dsd, "text"):
        items = b["items"]
        assert len(items["correct"]) == 60 == len(items["count"])
        assert sum(items["correct"]) / sum(items["count"]) == pytest.approx(b["value"])
    labels = np.asarray(dsd["test"]["label"])
    majority = baselines.compute_baselines(dsd, "text")[0]
    assert majority["items"]["correct"] == (labels == majority["choice"]).astype(int).tolist()
    from tasks.mqar import MQARConfig, generate_splits

    cfg = MQARConfig(max_len=64, num_pairs=4, num_keys=8, num_values=4, num_train=200, num_val=40, num_test=30)
    mq = datasets.DatasetDict(
        {
            s: datasets.Dataset.from_dict({"input_ids": x.tolist(), "targets": y.tolist()})
            for s, (x, y) in generate_splits(cfg).items()
        }
    )
    for b in baselines.compute_baselines(mq, "mqar"):
        items = b["items"]
        assert items["count"] == [4] * 30  # four queries in each of the 30 test sequences
        assert sum(items["correct"]) / 120 == pytest.approx(b["value"])
