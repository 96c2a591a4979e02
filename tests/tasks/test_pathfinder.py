"""Pathfinder: the generator's labels against an independent connectivity check of the
rendered images, bounded turns, balance and split hygiene; LRA's release layout on a
fixture, malformed records and images; one tiny cell end to end."""

import hashlib
import logging

import numpy as np
import pytest
from PIL import Image

from harness.cli import main
from harness.core.registry import create_task
from harness.data.task import DataSourceError, MalformedRecord
from harness.train.config import compose
from harness.train.run import run_cell
from tasks import pathfinder


def linked_components(mask: np.ndarray, reach: int) -> np.ndarray:
    """Component ids (-1 off the mask) of (N, H, W) masks, pixels joined when their
    Chebyshev distance is at most ``reach``: min-label propagation, no generator code."""
    n, h, w = mask.shape
    big = np.iinfo(np.int64).max
    labels = np.where(mask, np.arange(n * h * w).reshape(n, h, w), big)
    while True:
        padded = np.pad(labels, ((0, 0), (reach, reach), (reach, reach)), constant_values=big)
        best = labels.copy()
        for dy in range(2 * reach + 1):
            for dx in range(2 * reach + 1):
                best = np.minimum(best, padded[:, dy : dy + h, dx : dx + w])
        best = np.where(mask, best, big)
        if (best == labels).all():
            return np.where(mask, labels, -1)
        labels = best


def dots_connected(images: np.ndarray, reach: int) -> np.ndarray:
    """(N,) whether the two brightest blobs lie in one component of the drawn pixels."""
    dots = linked_components(images == pathfinder.DOT_INTENSITY, 1)
    drawn = linked_components(images > 0, reach)
    out = []
    for dot, comp in zip(dots, drawn):
        ids = np.unique(dot[dot >= 0])
        assert len(ids) == 2, f"expected two dots, found {len(ids)}"
        out.append(comp[dot == ids[0]][0] == comp[dot == ids[1]][0])
    return np.array(out)


@pytest.mark.parametrize("resolution,contour_length,distractors", [(32, 6, -1), (16, 3, 2), (32, 14, -1)])
def test_labels_match_the_connectivity_of_the_rendered_image(resolution, contour_length, distractors):
    cfg = pathfinder.PathfinderConfig(
        resolution=resolution, max_len=resolution**2, contour_length=contour_length, num_distractors=distractors
    )
    generator = pathfinder.generator_for(cfg)
    images, labels = generator.images(40, seed=resolution + contour_length)
    geo = generator.geo
    assert geo.link < geo.clearance
    assert (dots_connected(images, geo.link) == labels.astype(bool)).all()
    # the contours are dashed: at distance 1 they fall apart into more pieces
    pieces = [len(np.unique(c[c >= 0])) for c in linked_components(images > 0, 1)]
    joined = [len(np.unique(c[c >= 0])) for c in linked_components(images > 0, geo.link)]
    assert all(p > j for p, j in zip(pieces, joined))
    assert labels.sum() == 20  # exactly balanced


@pytest.mark.parametrize("resolution,contour_length,distractors", [(16, 3, 0), (32, 6, -1)])
def test_matched_dot_distances_pair_every_positive_with_an_equally_distant_negative(
    resolution, contour_length, distractors
):
    """Measured as the dot-distance baseline measures them (centroids of the two brightest
    blobs of the rendered image), the positives' and negatives' dot distances are one multiset."""
    from harness.report.baselines import dot_distances

    cfg = pathfinder.PathfinderConfig(
        resolution=resolution,
        max_len=resolution**2,
        contour_length=contour_length,
        distractor_length=1,
        num_distractors=distractors,
    )
    assert cfg.dot_distance == "matched"  # the default
    generator = pathfinder.generator_for(cfg)
    images, labels = generator.images(100, seed=7)
    assert labels.sum() == 50 and (dots_connected(images, generator.geo.link) == labels.astype(bool)).all()
    distance = dot_distances(images)
    assert np.allclose(np.sort(distance[labels == 1]), np.sort(distance[labels == 0]), atol=0.011)
    assert generator.unmatched > 0  # draws without a partner were discarded: the classes do differ
    odd, odd_labels = generator.images(7, seed=8)
    assert odd_labels.sum() == 3 and len(odd) == 7


def test_the_dot_distance_shortcut_of_lras_generator_is_gone_when_matched():
    """The small preset's settings: LRA's generator (free) lets a threshold on the dot distance
    classify well above chance; with matched distances it is at chance."""
    import datasets

    from harness.report.baselines import compute_baselines

    accuracy = {}
    for mode in ("free", "matched"):
        cfg = pathfinder.PathfinderConfig(
            resolution=16,
            max_len=256,
            difficulty="easy",
            contour_length=3,
            distractor_length=1,
            num_distractors=0,
            dot_distance=mode,
        )
        generator = pathfinder.generator_for(cfg)
        dsd = datasets.DatasetDict(
            {
                split: pathfinder.to_dataset(*generator.images(n, seed=seed))
                for split, n, seed in (("train", 2, 0), ("validation", 300, 1), ("test", 400, 2))
            }
        )
        accuracy[mode] = compute_baselines(dsd, "pathfinder")[1]["value"]
    assert accuracy["free"] >= 0.62 and accuracy["matched"] <= 0.58, accuracy


def test_turns_are_bounded_by_the_continuity():
    for continuity, bound in ((1.0, 90), (1.8, 50)):
        generator = pathfinder.SnakesGenerator(
            pathfinder.make_geometry(64),
            contour_length=8,
            distractor_length=3,
            num_distractors=0,
            continuity=continuity,
        )
        rng = np.random.default_rng(0)
        turns = []
        for _ in range(20):
            zone = np.where(generator.stencils.inside, 0, generator.WALL).astype(np.int32)
            try:
                targets, _ = generator._targets(rng, zone, 1)
            except pathfinder.PlacementFailed:
                continue
            for contour in targets:
                steps = np.diff(contour.directions) % pathfinder.NUM_DIRECTIONS
                turns.extend(np.minimum(steps, pathfinder.NUM_DIRECTIONS - steps) * 360 // pathfinder.NUM_DIRECTIONS)
        assert turns and max(turns) < bound and np.mean(turns) < bound / 2


def test_generated_splits_are_balanced_distinct_and_seeded(tmp_path):
    args = dict(
        resolution=16,
        max_len=256,
        difficulty="easy",
        contour_length=3,
        num_distractors=2,
        num_train=120,
        num_val=41,
        num_test=40,
    )
    dsd, info = create_task("pathfinder", **args).load(tmp_path)
    assert info.source == "generated" and info.sizes == {"train": 120, "validation": 41, "test": 40}
    assert info.majority_accuracy == 0.5
    assert sum(dsd["train"]["label"]) == 60 and sum(dsd["validation"]["label"]) == 20  # an odd one out is a 0
    ids = np.asarray(dsd["train"]["input_ids"])
    assert ids.shape == (120, 256) and set(np.unique(ids)) == {1, 192, 256}  # background, paddles, dots (+1)
    hashes = {
        s: {hashlib.sha1(np.asarray(x, np.int16).tobytes()).hexdigest() for x in dsd[s]["input_ids"]} for s in dsd
    }
    assert len(hashes["train"]) == 120  # no duplicates, no leakage between splits
    assert not hashes["train"] & hashes["validation"] and not hashes["train"] & hashes["test"]
    assert not hashes["validation"] & hashes["test"]
    again = create_task("pathfinder", **args).load(tmp_path / "again")[1]
    other = create_task("pathfinder", **args, data_seed=1).load(tmp_path)[1]
    assert again.fingerprint == info.fingerprint != other.fingerprint


# ----------------------------------------------------------------------------- LRA's release


def write_release(root, rows_by_batch, *, resolution=32, folder="curv_baseline"):
    """Metadata text rows ``imgs/<b> sample_<k>.png <k> <label> ...`` and grayscale PNGs,
    as in lra_release/pathfinder32. ``rows_by_batch``: {batch: [(pixels or bytes, label)]}."""
    base = root / f"pathfinder{resolution}" / folder
    (base / "metadata").mkdir(parents=True)
    for batch, rows in rows_by_batch.items():
        (base / "imgs" / str(batch)).mkdir(parents=True)
        lines = []
        for k, (content, label) in enumerate(rows):
            path = base / "imgs" / str(batch) / f"sample_{k}.png"
            if isinstance(content, bytes):
                path.write_bytes(content)
            else:
                Image.fromarray(content, mode="L").save(path)
            lines.append(f"imgs/{batch} sample_{k}.png {k} {label} 1.0 6 2 2 0.5 1 1")
        (base / "metadata" / f"{batch}.npy").write_text("\n".join(lines) + "\n")
    return base


def random_rows(count, seed, resolution=32):
    rng = np.random.default_rng(seed)
    return [
        (rng.integers(0, 256, (resolution, resolution), dtype=np.uint8), int(rng.integers(2))) for _ in range(count)
    ]


def test_release_loader_reads_metadata_and_pngs_and_skips_empty_files(tmp_path, caplog):
    rows = {0: random_rows(10, 0), 1: random_rows(10, 1)}
    rows[0][4] = (b"", 1)  # the release has an empty file; LRA's pipeline filters it
    write_release(tmp_path / "lra_release", rows)
    task = create_task(
        "pathfinder", source="lra", difficulty="easy", data_dir=str(tmp_path / "lra_release" / "pathfinder32")
    )
    with caplog.at_level(logging.WARNING, logger="tasks.pathfinder"):
        dsd, info = task.load(tmp_path / "cache")
    assert "skipped 1 empty image files" in caplog.text
    assert info.source == "lra" and info.sizes == {
        "train": 15,
        "validation": 2,
        "test": 2,
    }  # 19 rows, 80/10/10 in order
    kept = [r for r in rows[0] + rows[1] if not isinstance(r[0], bytes)]
    for split, (lo, hi) in {"train": (0, 15), "validation": (15, 17), "test": (17, 19)}.items():
        assert list(dsd[split]["label"]) == [label for _, label in kept[lo:hi]]
        assert [list(ids) for ids in dsd[split]["input_ids"]] == [
            (p.astype(np.int64).ravel() + 1).tolist() for p, _ in kept[lo:hi]
        ]
    # the release root (holding pathfinder32/) works as data_dir too
    _, again = create_task("pathfinder", source="lra", difficulty="easy", data_dir=str(tmp_path / "lra_release")).load(
        tmp_path / "c2"
    )
    assert again.fingerprint == info.fingerprint


def test_metadata_saved_as_a_numpy_array_is_read_too(tmp_path):
    base = write_release(tmp_path, {0: random_rows(10, 2)}, folder="curv_contour_length_14")
    text = (base / "metadata" / "0.npy").read_text().splitlines()
    np.save(base / "metadata" / "0.npy", np.array([line.split() for line in text]))  # as snakes2.py saves it
    dsd, info = create_task("pathfinder", source="lra", data_dir=str(tmp_path)).load(
        tmp_path / "cache"
    )  # difficulty hard
    assert sum(info.sizes.values()) == 10 and list(dsd["train"]["label"]) == [int(line.split()[3]) for line in text[:8]]


def test_generated_images_round_trip_through_the_release_layout(tmp_path):
    args = ["count=24", "resolution=16", "contour_length=3", "num_distractors=1", "seed=4", "difficulty=easy"]
    assert main(["tool", "pathfinder-generate", f"data_dir={tmp_path / 'pf'}", *args]) == 0
    cfg = pathfinder.PathfinderConfig(
        resolution=16, max_len=256, difficulty="easy", contour_length=3, num_distractors=1
    )
    images, labels = pathfinder.generator_for(cfg).images(24, 4)
    dsd, _ = create_task(
        "pathfinder", source="lra", difficulty="easy", resolution=16, max_len=256, data_dir=str(tmp_path / "pf")
    ).load(tmp_path / "cache")
    splits = ("train", "validation", "test")
    assert [list(ids) for s in splits for ids in dsd[s]["input_ids"]] == (
        images.reshape(24, -1).astype(np.int64) + 1
    ).tolist()
    assert [y for s in splits for y in dsd[s]["label"]] == labels.tolist()


def test_corrupt_image_and_malformed_rows_name_file_and_record(tmp_path):
    rows = {0: random_rows(6, 3)}
    rows[0][3] = (b"\x89PNG\r\n\x1a\n" + bytes(40), 0)  # a PNG signature, then garbage
    base = write_release(tmp_path, rows)
    task = create_task("pathfinder", source="lra", difficulty="easy", data_dir=str(tmp_path))
    with pytest.raises(
        MalformedRecord, match=r"imgs/0/sample_3\.png, listed in metadata/0\.npy line 4: not a readable image"
    ):
        task.load(tmp_path / "cache")
    Image.fromarray(np.zeros((30, 32), np.uint8), mode="L").save(base / "imgs/0/sample_3.png")
    with pytest.raises(
        MalformedRecord, match=r"sample_3\.png, listed in metadata/0\.npy line 4: image is 32x30, expected 32x32"
    ):
        task.load(tmp_path / "cache")
    lines = (base / "metadata/0.npy").read_text().splitlines()
    lines[3] = "imgs/0 sample_3.png 3 2 1.0 6 2 2 0.5 1 1"
    (base / "metadata/0.npy").write_text("\n".join(lines) + "\n")
    with pytest.raises(MalformedRecord, match=r"metadata/0\.npy, line 4: label '2' is not 0 or 1"):
        task.load(tmp_path / "cache")
    lines[3] = "imgs/0 sample_3.png"
    (base / "metadata/0.npy").write_text("\n".join(lines) + "\n")
    with pytest.raises(MalformedRecord, match=r"metadata/0\.npy, line 4: expected >= 4 space-separated fields"):
        task.load(tmp_path / "cache")
    lines[3] = "imgs/0 sample_9.png 3 0"
    (base / "metadata/0.npy").write_text("\n".join(lines) + "\n")
    with pytest.raises(MalformedRecord, match=r"sample_9\.png, listed in metadata/0\.npy line 4: cannot be read"):
        task.load(tmp_path / "cache")


def test_missing_release_and_bad_settings_say_what_is_right(tmp_path):
    with pytest.raises(DataSourceError, match="lra_release"):
        create_task("pathfinder", source="lra", data_dir=str(tmp_path)).load(tmp_path / "cache")
    with pytest.raises(ValueError, match="valid: easy, intermediate, hard"):
        create_task("pathfinder", difficulty="medium")
    with pytest.raises(ValueError, match="must be task.resolution"):
        create_task("pathfinder", resolution=16)
    with pytest.raises(ValueError, match="task.dot_distance='near'; valid: matched, free"):
        create_task("pathfinder", dot_distance="near")


def test_tiny_pathfinder_cell_end_to_end(tmp_path):
    cfg = compose(
        [
            "task=pathfinder",
            "scale=tiny",
            "trainer.progress_bar=false",
            "train.max_steps=12",
            "train.eval_every=6",
            f"results_dir={tmp_path / 'results'}",
            f"cache_dir={tmp_path / 'cache'}",
        ]
    )
    result = run_cell(cfg)
    assert result["status"] == "ok", result["error"]
    assert result["data"]["source"] == "generated" and result["data"]["majority_accuracy"] == 0.5
    assert result["data"]["sizes"] == {"train": 640, "validation": 128, "test": 256}
    assert 0 <= result["metrics"]["test"]["accuracy"] <= 1 and result["params"] > 0
