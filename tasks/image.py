"""Image: classify a grayscale image from its pixels read as a sequence (LRA "Image",
Tay et al. 2021, arXiv:2011.04006, section 3.4).

The image is flattened row-major into one token per pixel: token = intensity + 1
(0..255 -> 1..256; 0 is padding), so a 32x32 image is 1024 tokens, ten classes. No 2D
inductive bias is given to the model. Sources:

* ``fashion_mnist`` (offline default): Debian's ``dataset-fashion-mnist`` (Xiao et al.
  2017; 60,000 + 10,000 grayscale 28x28 images of clothing, 10 classes), read from its IDX
  files with NumPy and padded to 32x32 with 2 black pixels on each side.
* ``cifar10``: CIFAR-10's python release (``cifar-10-batches-py``: ``data_batch_1..5``,
  ``test_batch``; each a pickled dict with ``data`` N x 3072 uint8, channel-major, and
  ``labels``), turned grayscale as LRA does with ``tf.image.rgb_to_grayscale``:
  ``Y = 0.2989 R + 0.5870 G + 0.1140 B`` on [0, 1] floats, back to uint8 as TF's
  ``convert_image_dtype`` does (x 255.5, truncated).
* ``cifar10_hf``: the Hugging Face dataset ``uoft-cs/cifar10`` (columns ``img``,
  ``label``; splits train/test) saved locally, either with ``save_to_disk`` or as the
  hub's parquet files; same grayscale conversion.

As in LRA's input pipeline, 10% of the training set is held out for validation (here
seeded and stratified); the official test set is the test split. ``resolution`` below
32 average-pools the 32x32 image (16: 2x2 blocks), for CI and CPU scales; it is part of
the cache key and recorded with the task config.
"""

from __future__ import annotations

import gzip
import logging
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import numpy as np

from harness.core import register_task
from harness.data.task import DataSourceError, MalformedRecord, Task, files_under, stratified_split

log = logging.getLogger(__name__)

NUM_CLASSES = 10
NATIVE = 32  # LRA's image side: CIFAR-10 as is, Fashion-MNIST padded 28 -> 32
VOCAB_SIZE = 257  # 256 intensities shifted by one + padding
FASHION_PACKAGE = "dataset-fashion-mnist"
FASHION_DIR = "usr/share/datasets/fashion-mnist"
FASHION_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
CIFAR_TRAIN_BATCHES = tuple(f"data_batch_{i}" for i in range(1, 6))
CIFAR_TEST_BATCH = "test_batch"
GRAY_WEIGHTS = (0.2989, 0.5870, 0.1140)  # tf.image.rgb_to_grayscale
IDX_IMAGES_MAGIC, IDX_LABELS_MAGIC = 0x00000803, 0x00000801  # uint8 data, 3 / 1 dimensions


@dataclass
class ImageConfig:
    source: str = "fashion_mnist"  # fashion_mnist | cifar10 | cifar10_hf
    data_dir: str = ""  # cifar10: folder with data_batch_1..5 + test_batch; cifar10_hf: the saved dataset
    max_len: int = 1024  # must be resolution ** 2
    resolution: int = 32  # side of the image the model sees: 32 (LRA), or 16/8 (average-pooled)
    val_fraction: float = 0.1  # of the training set, held out for validation (LRA: 10%)
    num_train: int = 0  # 0 = all; otherwise a stratified subsample of each split
    num_val: int = 0
    num_test: int = 0
    data_seed: int = 0  # validation hold-out and subsamples


# ----------------------------------------------------------------------------- readers


def read_idx(path: Path, *, images: bool) -> np.ndarray:
    """An IDX file (gzip or raw) as uint8 (N, rows, cols) images or (N,) labels."""
    if not path.exists():
        raise DataSourceError(f"{path} not found")
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            blob = f.read()
    except (OSError, EOFError) as exc:
        raise MalformedRecord(
            path, "file", f"cannot be read as {'gzip' if opener is gzip.open else 'a file'}: {exc}"
        ) from exc
    ndim = 3 if images else 1
    header_len = 4 + 4 * ndim
    if len(blob) < header_len:
        raise MalformedRecord(path, "header", f"{len(blob)} bytes, an IDX header needs {header_len}")
    magic = int.from_bytes(blob[:4], "big")
    expected = IDX_IMAGES_MAGIC if images else IDX_LABELS_MAGIC
    if magic != expected:
        raise MalformedRecord(
            path, "header", f"magic number {magic:#010x}, expected {expected:#010x} (uint8, {ndim}-d)"
        )
    dims = tuple(int(d) for d in np.frombuffer(blob, dtype=">u4", count=ndim, offset=4))
    record = int(np.prod(dims[1:])) if images else 1
    have = len(blob) - header_len
    if have < dims[0] * record:
        raise MalformedRecord(
            path, f"record {have // record}", f"file ends inside record {have // record} of {dims[0]} (truncated)"
        )
    if have > dims[0] * record:
        raise MalformedRecord(
            path, "trailer", f"{have - dims[0] * record} bytes after the {dims[0]} records the header announces"
        )
    return np.frombuffer(blob, dtype=np.uint8, offset=header_len).reshape(dims)


def check_labels(path: Path, labels: np.ndarray, where: str = "record") -> np.ndarray:
    bad = np.flatnonzero((labels < 0) | (labels >= NUM_CLASSES))
    if bad.size:
        raise MalformedRecord(
            path, f"{where} {int(bad[0])}", f"label {int(labels[bad[0]])} is not a class 0-{NUM_CLASSES - 1}"
        )
    return labels.astype(np.int64)


def load_fashion_mnist(folder: Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """{"train"/"test": (uint8 (N, 32, 32) images padded from 28x28, int64 labels)}."""
    out = {}
    for split, (image_file, label_file) in FASHION_FILES.items():
        images = read_idx(folder / image_file, images=True)
        labels = check_labels(folder / label_file, read_idx(folder / label_file, images=False))
        if images.shape[1:] != (28, 28):
            raise MalformedRecord(
                folder / image_file, "header", f"images are {images.shape[1]}x{images.shape[2]}, expected 28x28"
            )
        if len(images) != len(labels):
            raise MalformedRecord(
                folder / label_file, "header", f"{len(labels)} labels for {len(images)} images in {image_file}"
            )
        out[split] = (np.pad(images, ((0, 0), (2, 2), (2, 2))), labels)
    return out


def rgb_to_gray(channel_major: np.ndarray) -> np.ndarray:
    """uint8 (N, 3*H*W) channel-major RGB -> uint8 (N, H, W), as tf.image.rgb_to_grayscale."""
    n = channel_major.shape[0]
    side = int(round((channel_major.shape[1] // 3) ** 0.5))
    rgb = channel_major.reshape(n, 3, side, side).astype(np.float32) / np.float32(255.0)
    gray = np.tensordot(np.asarray(GRAY_WEIGHTS, dtype=np.float32), rgb, axes=(0, 1))  # (N, H, W)
    return np.clip(gray * np.float32(255.5), 0, 255).astype(np.uint8)  # truncation, as TF's cast


class _CifarUnpickler(pickle.Unpickler):
    """Loads CIFAR-10's pickles without executing arbitrary code: only NumPy arrays."""

    ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"),
        ("_codecs", "encode"),  # how Python 3 writes bytes in a protocol-2 pickle (a re-pickled batch)
    }

    def find_class(self, module, name):
        if (module, name) in self.ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(
            f"unexpected object {module}.{name} (a CIFAR-10 batch holds a dict of arrays/lists)"
        )


def read_cifar_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """One CIFAR-10 python batch: (uint8 (N, 3072) channel-major, int64 (N,) labels)."""
    if not path.exists():
        raise DataSourceError(
            f"{path} not found. Download cifar-10-python.tar.gz from "
            f"https://www.cs.toronto.edu/~kriz/cifar.html, unpack it, and set task.data_dir to its "
            f"cifar-10-batches-py folder (data_batch_1..5, test_batch)"
        )
    if path.stat().st_size == 0:
        raise DataSourceError(f"{path} is empty; expected a CIFAR-10 python batch (a pickled dict)")
    try:
        with open(path, "rb") as f:
            batch = _CifarUnpickler(f, encoding="bytes").load()
    except Exception as exc:  # any unpickling failure is a corrupt file
        raise MalformedRecord(path, "file", f"not a CIFAR-10 python batch: {exc}") from exc
    if not isinstance(batch, dict):
        raise MalformedRecord(
            path, "file", f"holds a {type(batch).__name__}, expected a dict with b'data' and b'labels'"
        )
    batch = {k.decode() if isinstance(k, bytes) else k: v for k, v in batch.items()}
    for key in ("data", "labels"):
        if key not in batch:
            raise MalformedRecord(path, f"key '{key}'", f"missing; the batch has keys {sorted(batch)}")
    data = batch["data"]
    if (
        not isinstance(data, np.ndarray)
        or data.dtype != np.uint8
        or data.ndim != 2
        or data.shape[1] != 3 * NATIVE * NATIVE
    ):
        shape = getattr(data, "shape", None)
        raise MalformedRecord(
            path, "key 'data'", f"expected a uint8 array N x {3 * NATIVE * NATIVE}, got {type(data).__name__} {shape}"
        )
    labels = np.asarray(batch["labels"])
    if labels.ndim != 1 or len(labels) != len(data) or not np.issubdtype(labels.dtype, np.integer):
        raise MalformedRecord(
            path, "key 'labels'", f"expected {len(data)} integer labels, got {labels.shape} {labels.dtype}"
        )
    return data, check_labels(path, labels)


def cifar_folder(data_dir: str) -> Path:
    if not data_dir:
        raise DataSourceError(
            "task.source=cifar10 needs task.data_dir=<cifar-10-batches-py folder> (from cifar-10-python.tar.gz, "
            "https://www.cs.toronto.edu/~kriz/cifar.html)"
        )
    folder = Path(data_dir)
    if not (folder / CIFAR_TEST_BATCH).exists() and (folder / "cifar-10-batches-py").is_dir():
        folder = folder / "cifar-10-batches-py"
    return folder


def load_cifar10(data_dir: str) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """{"train"/"test": (uint8 (N, 32, 32) grayscale, int64 labels)} from the python batches."""
    folder = cifar_folder(data_dir)
    train = [read_cifar_batch(folder / name) for name in CIFAR_TRAIN_BATCHES]
    test = read_cifar_batch(folder / CIFAR_TEST_BATCH)
    return {
        "train": (rgb_to_gray(np.concatenate([d for d, _ in train])), np.concatenate([y for _, y in train])),
        "test": (rgb_to_gray(test[0]), test[1]),
    }


def load_cifar10_hf(data_dir: str) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """The same from ``uoft-cs/cifar10`` saved locally (``save_to_disk`` or parquet files)."""
    import datasets

    if not data_dir:
        raise DataSourceError(
            "task.source=cifar10_hf needs task.data_dir=<local copy of the dataset uoft-cs/cifar10>: "
            "datasets.load_dataset('uoft-cs/cifar10').save_to_disk(DIR), or its parquet files"
        )
    folder = Path(data_dir)
    if (folder / "dataset_dict.json").exists():
        dsd = datasets.load_from_disk(str(folder))
    else:
        files = {s: sorted(str(p) for p in folder.rglob(f"{s}-*.parquet")) for s in ("train", "test")}
        if not all(files.values()):
            raise DataSourceError(
                f"{folder} holds neither a saved DatasetDict (dataset_dict.json) nor parquet files "
                f"train-*.parquet and test-*.parquet of uoft-cs/cifar10"
            )
        dsd = datasets.load_dataset("parquet", data_files=files)
    out = {}
    for split in ("train", "test"):
        if split not in dsd:
            raise DataSourceError(f"{folder}: no split '{split}' (has {sorted(dsd)})")
        ds = dsd[split]
        for column in ("img", "label"):
            if column not in ds.column_names:
                raise MalformedRecord(folder, f"split {split}", f"no column '{column}' (has {ds.column_names})")
        channel_major = np.empty((len(ds), 3 * NATIVE * NATIVE), dtype=np.uint8)
        for i, image in enumerate(ds["img"]):
            pixels = np.asarray(image.convert("RGB"))
            if pixels.shape != (NATIVE, NATIVE, 3):
                raise MalformedRecord(
                    folder, f"split {split}, record {i}", f"image is {pixels.shape}, expected 32x32 RGB"
                )
            channel_major[i] = pixels.transpose(2, 0, 1).ravel()
        out[split] = (
            rgb_to_gray(channel_major),
            check_labels(folder, np.asarray(ds["label"]), where=f"split {split}, record"),
        )
    return out


# ----------------------------------------------------------------------------- tokens


def downsample(images: np.ndarray, resolution: int) -> np.ndarray:
    """uint8 (N, S, S) -> (N, r, r) by averaging (S/r)x(S/r) blocks (rounded)."""
    side = images.shape[1]
    if resolution == side:
        return images
    if side % resolution:
        raise ValueError(f"task.resolution={resolution} must divide the image side {side}")
    f = side // resolution
    blocks = images.reshape(len(images), resolution, f, resolution, f).astype(np.float32)
    return np.rint(blocks.mean(axis=(2, 4))).astype(np.uint8)


def to_tokens(images: np.ndarray) -> np.ndarray:
    """uint8 (N, r, r) -> int16 (N, r*r) row-major tokens, intensity + 1 (0 is padding)."""
    return images.reshape(len(images), -1).astype(np.int16) + 1


def to_dataset(tokens: np.ndarray, labels: np.ndarray):
    """A datasets.Dataset with ``input_ids`` (fixed-length int16 lists) and ``label``,
    built from Arrow buffers directly (fast for tens of thousands of long rows)."""
    import datasets
    import pyarrow as pa

    n, length = tokens.shape
    offsets = pa.array(np.arange(0, n * length + 1, length, dtype=np.int32))
    input_ids = pa.ListArray.from_arrays(offsets, pa.array(np.ascontiguousarray(tokens).ravel()))
    return datasets.Dataset(pa.table({"input_ids": input_ids, "label": pa.array(np.asarray(labels, dtype=np.int64))}))


def subsample(labels: np.ndarray, count: int, seed: int) -> np.ndarray:
    """Sorted indices of a stratified random subsample of exactly ``count`` items (all
    when count is 0 or too large): classes keep their shares, largest remainders first."""
    if not count or count >= len(labels):
        return np.arange(len(labels))
    rng = np.random.default_rng(seed)
    classes, sizes = np.unique(labels, return_counts=True)
    exact = count * sizes / len(labels)
    quota = np.floor(exact).astype(np.int64)
    quota[np.argsort(quota - exact, kind="stable")[: count - quota.sum()]] += 1
    keep = [rng.choice(np.flatnonzero(labels == c), size=q, replace=False) for c, q in zip(classes, quota)]
    return np.sort(np.concatenate(keep))


@register_task(
    "image",
    ImageConfig,
    sources=("fashion_mnist", "cifar10", "cifar10_hf"),
    scales={
        # CI: 16x16 = 256 tokens (2x2 average pooling), a few hundred images.
        "tiny": {"task": {"resolution": 16, "max_len": 256, "num_train": 640, "num_val": 128, "num_test": 256}},
        # 2 CPU cores, a minute or two: 16x16 = 256 tokens, 12k training images.
        "small": {"task": {"resolution": 16, "max_len": 256, "num_train": 12000, "num_val": 1000, "num_test": 2000}},
        # scale=lra: harness/conf/protocol/<protocol>/image.yaml (protocol=lra, pytorch, nystromformer;
        # docs/protocols.md)
    },
)
class ImageClassification(Task):
    """Image (LRA): grayscale pixels as a 1D sequence, 10 classes (Fashion-MNIST / CIFAR-10)."""

    head = "classifier"
    debian_packages: ClassVar[tuple[str, ...]] = (FASHION_PACKAGE,)

    def __init__(self, cfg, *, scale: str = "tiny"):
        super().__init__(cfg, scale=scale)
        if cfg.resolution <= 0 or NATIVE % cfg.resolution:
            raise ValueError(f"task.resolution={cfg.resolution} must divide {NATIVE} (32, 16, 8, ...)")
        if cfg.max_len != cfg.resolution**2:
            raise ValueError(f"task.max_len={cfg.max_len} must be task.resolution**2 = {cfg.resolution**2}")
        if not 0.0 < cfg.val_fraction < 1.0:
            raise ValueError(f"task.val_fraction={cfg.val_fraction} must lie in (0, 1)")

    @property
    def vocab_size(self) -> int:
        return VOCAB_SIZE

    @property
    def num_classes(self) -> int:
        return NUM_CLASSES

    def cache_params(self):
        params = super().cache_params()
        if self.cfg.source == "fashion_mnist":
            params.pop("data_dir")
        else:
            params["data_dir"] = str(Path(self.cfg.data_dir).resolve())
        return params

    def source_files(self) -> list[Path]:
        cfg = self.cfg
        if cfg.source == "fashion_mnist":
            from harness.data.debian import debian_path

            try:
                folder = debian_path(FASHION_PACKAGE, FASHION_DIR)
            except DataSourceError:  # build() says how to get it
                return []
            return [folder / name for pair in FASHION_FILES.values() for name in pair]
        if not cfg.data_dir:
            return []
        if cfg.source == "cifar10":
            folder = cifar_folder(cfg.data_dir)
            return [folder / name for name in (*CIFAR_TRAIN_BATCHES, CIFAR_TEST_BATCH)]
        return files_under(cfg.data_dir)

    def read_source(self) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        """{"train"/"test": (uint8 (N, 32, 32), int64 labels)} from ``cfg.source``."""
        if self.cfg.source == "fashion_mnist":
            from harness.data.debian import debian_path

            return load_fashion_mnist(debian_path(FASHION_PACKAGE, FASHION_DIR))
        if self.cfg.source == "cifar10":
            return load_cifar10(self.cfg.data_dir)
        return load_cifar10_hf(self.cfg.data_dir)

    def build(self):
        import datasets

        cfg = self.cfg
        raw = self.read_source()
        train_images, train_labels = raw["train"]
        test_images, test_labels = raw["test"]
        train_idx, val_idx = (
            np.asarray(p, dtype=np.int64)
            for p in stratified_split(train_labels.tolist(), (1.0 - cfg.val_fraction, cfg.val_fraction), cfg.data_seed)
        )
        train_idx = train_idx[subsample(train_labels[train_idx], cfg.num_train, cfg.data_seed)]
        val_idx = val_idx[subsample(train_labels[val_idx], cfg.num_val, cfg.data_seed + 1)]
        test_idx = subsample(test_labels, cfg.num_test, cfg.data_seed + 2)
        parts = {
            "train": (train_images[train_idx], train_labels[train_idx]),
            "validation": (train_images[val_idx], train_labels[val_idx]),
            "test": (test_images[test_idx], test_labels[test_idx]),
        }
        log.info(
            "image (%s): %s at %dx%d",
            cfg.source,
            ", ".join(f"{s} {len(y)}" for s, (_, y) in parts.items()),
            cfg.resolution,
            cfg.resolution,
        )
        return datasets.DatasetDict(
            {split: to_dataset(to_tokens(downsample(x, cfg.resolution)), y) for split, (x, y) in parts.items()}
        )
