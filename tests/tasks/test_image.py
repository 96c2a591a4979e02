"""Image: the Fashion-MNIST builder (sizes, balance, padding, an exact train/validation
partition), the CIFAR-10 loaders on fixtures in the released layouts, malformed files,
and one tiny cell end to end."""

import gzip
import pickle
from collections import Counter

import numpy as np
import pytest

from harness.core.registry import create_task
from harness.data.debian import debian_path
from harness.data.task import DataSourceError, MalformedRecord
from harness.train.config import compose
from harness.train.run import run_cell
from tasks import image

# Pure colours and their grayscale as TF computes it: floor(255.5 * (0.2989 R + 0.5870 G + 0.1140 B) / 255).
COLOURS = {(255, 255, 255): 255, (255, 0, 0): 76, (0, 255, 0): 149, (0, 0, 255): 29, (0, 0, 0): 0}


def rows_as_bytes(dataset) -> list[bytes]:
    return [np.asarray(ids, dtype=np.int16).tobytes() for ids in dataset["input_ids"]]


def test_fashion_mnist_subsample_is_stratified_padded_and_tokenised(tmp_path):
    task = create_task("image", resolution=32, max_len=1024, num_train=200, num_val=50, num_test=100)
    dsd, info = task.load(tmp_path)
    assert info.source == "fashion_mnist" and info.sizes == {"train": 200, "validation": 50, "test": 100}
    assert info.num_classes == 10 and info.majority_accuracy == pytest.approx(0.1)  # 10 per class in test
    assert Counter(dsd["train"]["label"]) == {c: 20 for c in range(10)}
    assert Counter(dsd["validation"]["label"]) == {c: 5 for c in range(10)}
    pixels = np.asarray(dsd["train"]["input_ids"]).reshape(-1, 32, 32)
    assert pixels.min() >= 1 and pixels.max() <= 256  # intensity + 1; 0 stays padding
    border = np.ones((32, 32), dtype=bool)
    border[2:30, 2:30] = False
    assert (pixels[:, border] == 1).all()  # 28x28 padded with 2 black pixels a side
    assert (pixels[:, ~border] > 1).mean() > 0.3  # and real content inside
    assert len(set(rows_as_bytes(dsd["train"]))) == 200


@pytest.mark.slow
def test_fashion_mnist_validation_is_a_tenth_of_train_and_a_partition_of_it(tmp_path):
    task = create_task("image", resolution=8, max_len=64, num_train=0, num_val=0, num_test=0)
    dsd, info = task.load(tmp_path)
    assert info.sizes == {"train": 54000, "validation": 6000, "test": 10000}  # LRA: 10% of train held out
    raw = image.load_fashion_mnist(debian_path(image.FASHION_PACKAGE, image.FASHION_DIR))
    expected = sorted(row.tobytes() for row in image.to_tokens(image.downsample(raw["train"][0], 8)).astype(np.int16))
    got = sorted(rows_as_bytes(dsd["train"]) + rows_as_bytes(dsd["validation"]))
    assert got == expected  # every training image exactly once: no loss, no leakage


def test_downsample_averages_blocks():
    images = np.arange(16, dtype=np.uint8).reshape(1, 4, 4)
    assert image.downsample(images, 2).tolist() == [[[2, 4], [10, 12]]]  # rint of 2.5, 4.5, 10.5, 12.5 (to even)


# ----------------------------------------------------------------------------- CIFAR-10 fixtures


def cifar_images(count: int, seed: int) -> tuple[np.ndarray, list[int]]:
    """(N, 32, 32, 3) images: distinct noise, with the top row painted in the pure COLOURS."""
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, size=(count, 32, 32, 3), dtype=np.uint8)
    for j, colour in enumerate(COLOURS):
        images[:, 0, 6 * j : 6 * j + 6] = colour
    return images, [int(v) for v in rng.permutation(np.arange(count) % 10)]


def write_cifar_batch(path, images: np.ndarray, labels: list[int]) -> None:
    """A batch as the python release pickles it: bytes keys, data N x 3072 channel-major."""
    batch = {
        b"batch_label": path.name.encode(),
        b"labels": labels,
        b"data": np.ascontiguousarray(images.transpose(0, 3, 1, 2).reshape(len(images), -1)),
        b"filenames": [f"img_{i}.png".encode() for i in range(len(images))],
    }
    with open(path, "wb") as f:
        pickle.dump(batch, f, protocol=2)


@pytest.fixture()
def cifar_dir(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    data = {}
    for k, name in enumerate([*image.CIFAR_TRAIN_BATCHES, image.CIFAR_TEST_BATCH]):
        data[name] = cifar_images(20, seed=k)
        write_cifar_batch(folder / name, *data[name])
    return folder, data


def test_cifar_loader_reads_python_batches_grayscale_with_a_tenth_held_out(tmp_path, cifar_dir):
    folder, data = cifar_dir
    task = create_task("image", source="cifar10", data_dir=str(tmp_path))  # the folder above also works
    dsd, info = task.load(tmp_path / "cache")
    assert info.source == "cifar10" and info.sizes == {"train": 90, "validation": 10, "test": 20}
    assert Counter(dsd["validation"]["label"]) == {c: 1 for c in range(10)}  # stratified 10%
    train = set(rows_as_bytes(dsd["train"]))
    assert not train & set(rows_as_bytes(dsd["validation"]))
    test = np.asarray(dsd["test"]["input_ids"]).reshape(-1, 32, 32)
    for j, gray in enumerate(COLOURS.values()):
        assert (test[:, 0, 6 * j : 6 * j + 6] == gray + 1).all()
    images, labels = data[image.CIFAR_TEST_BATCH]  # labels follow their images
    expected = image.rgb_to_gray(images.transpose(0, 3, 1, 2).reshape(20, -1))
    for ids, label in zip(test, dsd["test"]["label"]):
        assert labels[int(np.flatnonzero((expected == ids - 1).all(axis=(1, 2)))[0])] == label


def test_cifar_hf_parquet_layout_gives_the_same_tokens(tmp_path, cifar_dir):
    import datasets
    from PIL import Image

    folder, data = cifar_dir
    features = datasets.Features({"img": datasets.Image(), "label": datasets.ClassLabel(num_classes=10)})
    for split, names in (("train", image.CIFAR_TRAIN_BATCHES), ("test", [image.CIFAR_TEST_BATCH])):
        images = np.concatenate([data[n][0] for n in names])
        labels = [y for n in names for y in data[n][1]]
        ds = datasets.Dataset.from_dict(
            {"img": [Image.fromarray(x) for x in images], "label": labels}, features=features
        )
        (tmp_path / "hf" / "plain_text").mkdir(parents=True, exist_ok=True)
        ds.to_parquet(str(tmp_path / "hf" / "plain_text" / f"{split}-00000-of-00001.parquet"))
    from_pickles, _ = create_task("image", source="cifar10", data_dir=str(folder)).load(tmp_path / "c1")
    from_parquet, info = create_task("image", source="cifar10_hf", data_dir=str(tmp_path / "hf")).load(tmp_path / "c2")
    assert info.source == "cifar10_hf"
    for split in ("train", "validation", "test"):
        assert from_parquet[split]["input_ids"] == from_pickles[split]["input_ids"]
        assert from_parquet[split]["label"] == from_pickles[split]["label"]


def test_malformed_cifar_batches_name_file_and_record(tmp_path, cifar_dir):
    folder, data = cifar_dir
    images, labels = data["data_batch_2"]
    write_cifar_batch(folder / "data_batch_2", images, labels[:3] + [10] + labels[4:])
    with pytest.raises(MalformedRecord, match=r"data_batch_2, record 3: label 10 is not a class 0-9"):
        create_task("image", source="cifar10", data_dir=str(folder)).load(tmp_path / "cache")
    write_cifar_batch(folder / "data_batch_2", images, labels)
    blob = (folder / "data_batch_4").read_bytes()
    (folder / "data_batch_4").write_bytes(blob[: len(blob) // 2])
    with pytest.raises(MalformedRecord, match=r"data_batch_4, file: not a CIFAR-10 python batch"):
        create_task("image", source="cifar10", data_dir=str(folder)).load(tmp_path / "cache")


def test_truncated_idx_file_names_the_record(tmp_path):
    header = (0x803).to_bytes(4, "big") + b"".join(n.to_bytes(4, "big") for n in (5, 28, 28))
    path = tmp_path / "train-images-idx3-ubyte.gz"
    path.write_bytes(gzip.compress(header + bytes(28 * 28 * 3 + 100)))
    with pytest.raises(MalformedRecord, match=r"train-images-idx3-ubyte\.gz, record 3: file ends inside record 3 of 5"):
        image.read_idx(path, images=True)
    path.write_bytes(gzip.compress((0x801).to_bytes(4, "big") + bytes(12)))  # a labels file named as images
    with pytest.raises(MalformedRecord, match=r"header: magic number 0x00000801, expected 0x00000803"):
        image.read_idx(path, images=True)


def test_missing_cifar_says_what_to_download(tmp_path):
    with pytest.raises(DataSourceError, match="cifar-10-python.tar.gz"):
        create_task("image", source="cifar10", data_dir=str(tmp_path)).load(tmp_path / "cache")
    with pytest.raises(ValueError, match="must be task.resolution"):
        create_task("image", resolution=16, max_len=1024)


def test_tiny_image_cell_end_to_end(tmp_path):
    cfg = compose(
        [
            "task=image",
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
    assert result["data"]["source"] == "fashion_mnist" and result["config"]["task"]["resolution"] == 16
    assert result["data"]["sizes"] == {"train": 640, "validation": 128, "test": 256}
    assert 0 <= result["metrics"]["test"]["accuracy"] <= 1 and result["params"] > 0
