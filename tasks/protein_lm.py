"""Protein language modelling: predict each residue from the residues before it.

Causal next-residue prediction (as in TAPE's language-modelling pre-training, Rao et al.
2019, arXiv:1906.08230, and ProtGPT2-style models), on the sequences of ``tasks.protein``
(same sources and readers, ``tasks/_protein_io.py``; labels are not used). A sequence is
a start token followed by its first ``max_len - 1`` residues, so every residue is
predicted, the first one too. The metric is **bits per residue** (test
``bits_per_token``, lower is better) and next-residue accuracy; the task requires the
``causal`` capability, so non-causal mechanisms are recorded ``unsupported``.

Data: ``num_sequences`` distinct sequences sampled (seeded) from the source, copies of a
sequence (once cut) kept once, near-identical sequences grouped and whole groups sent to
one of train/validation/test (``_protein_io.near_duplicate_groups``), so the test set
is not memorised from train.

Baselines, recorded in every result's ``data`` and logged when the data is loaded:
``unigram_bits_per_token``, the cross-entropy on the test residues of the residue
frequencies of train (add-one smoothed), i.e. what a model that ignores context
achieves; ``residue_entropy_bits``, the entropy of the test residues' own frequencies (a
bound no context-free model beats); ``majority_accuracy``, the accuracy of always
predicting train's most frequent residue.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from harness.core import register_task
from harness.data import DataInfo, DataSourceError, Task
from tasks._protein_io import (
    ALPHABET,
    METASTUDENT_PACKAGE,
    VOCAB_SIZE,
    crop_and_dedupe,
    group_split,
    log_cut,
    near_duplicate_groups,
    protein_cache_params,
    protein_source_files,
    read_sequences,
    split_note,
)
from tasks.protein import LRA_MODEL, LRA_TRAIN, SOURCES

log = logging.getLogger(__name__)

START_ID = VOCAB_SIZE  # the token before the first residue; residues are 1..len(ALPHABET), 0 is padding


@dataclass
class ProteinLMConfig:
    source: str = "metastudent"  # metastudent | fasta | pfam
    data_dir: str = ""  # fasta/pfam: the source folder; metastudent: optional copy of dataset_201401
    max_len: int = 1024  # tokens the model sees: the start token and the first max_len - 1 residues
    ontology: str = "MFO"  # metastudent: which of its databases (MFO | BPO | CCO)
    num_sequences: int = 50000  # distinct sequences sampled from the source (0: all)
    val_fraction: float = 0.1
    test_fraction: float = 0.1
    group_near_duplicates: bool = True  # keep near-identical sequences in one split (else exact copies only)
    data_seed: int = 0  # sampling and the split


@dataclass
class ProteinLMDataInfo(DataInfo):
    """``DataInfo`` plus the context-free baselines, in bits per residue (see the module docstring)."""

    unigram_bits_per_token: float | None = None
    residue_entropy_bits: float | None = None


def residue_counts(ds) -> np.ndarray:
    """Occurrences of every token id (start token and padding included) in a split."""
    import pyarrow.compute as pc

    flat = pc.list_flatten(ds.data.column("input_ids")).to_numpy(zero_copy_only=False)
    return np.bincount(flat.astype(np.int64), minlength=VOCAB_SIZE + 1)


def residue_baselines(dsd) -> dict[str, float]:
    """Context-free baselines of a prepared DatasetDict on its test split, in bits per residue."""
    residues = slice(1, 1 + len(ALPHABET))
    train, test = residue_counts(dsd["train"])[residues], residue_counts(dsd["test"])[residues]
    if not test.sum():
        return {"unigram_bits_per_token": math.nan, "residue_entropy_bits": math.nan, "majority_accuracy": math.nan}
    p_train = (train + 1) / (train.sum() + train.size)  # add-one: a letter unseen in train costs finite bits
    p_test = test / test.sum()
    seen = p_test > 0
    return {
        "unigram_bits_per_token": float(-(p_test * np.log2(p_train)).sum()),
        "residue_entropy_bits": float(-(p_test[seen] * np.log2(p_test[seen])).sum()),
        "majority_accuracy": float(p_test[int(np.argmax(train))]),
    }


@register_task(
    "protein_lm",
    ProteinLMConfig,
    sources=SOURCES,
    requires=("causal", "key_padding"),
    scales={
        # CI: 400 sequences, the first 127 residues.
        "tiny": {"task": {"max_len": 128, "num_sequences": 400}},
        # 2 CPU cores (1-2 minutes): 8,000 sequences, the first 255 residues, 16 per batch
        # (a step then costs 1.4 listops small steps, hence 400 of them).
        "small": {
            "task": {"max_len": 256, "num_sequences": 8000},
            "train": {"max_steps": 400, "batch_size": 16, "eval_every": 100},
        },
        # LRA's text-classification model and schedule (see tasks/protein.py), 1,024 tokens.
        "lra": {"task": {"max_len": 1024, "num_sequences": 50000}, "model": LRA_MODEL, "train": LRA_TRAIN},
    },
)
class ProteinLM(Task):
    """Protein LM: causal next-residue prediction, bits per residue (lower is better)."""

    head = "lm"
    debian_packages: ClassVar[tuple[str, ...]] = (METASTUDENT_PACKAGE,)

    @property
    def vocab_size(self) -> int:
        return VOCAB_SIZE + 1  # padding, residues, start token

    def cache_params(self) -> dict[str, Any]:
        return protein_cache_params(self.cfg, super().cache_params())

    def source_files(self) -> list[Path]:
        return protein_source_files(self.cfg, with_labels=False)

    def build(self):
        import datasets

        cfg = self.cfg
        if cfg.max_len < 2:
            raise ValueError(f"task.max_len={cfg.max_len}: a protein LM needs the start token and at least one residue")
        seqs = read_sequences(cfg.source, cfg.data_dir, ontology=cfg.ontology)
        order = np.random.default_rng(cfg.data_seed).permutation(len(seqs))
        kept = sorted(
            crop_and_dedupe(seqs, order, cfg.max_len - 1, labelled=False, limit=cfg.num_sequences, what="protein_lm")
        )
        if len(kept) < 3:
            raise DataSourceError(f"protein_lm ({cfg.source}) has {len(kept)} distinct sequences; it needs at least 3")
        if cfg.num_sequences and len(kept) < cfg.num_sequences:
            log.warning(
                "protein_lm: the source has %d distinct sequences, fewer than task.num_sequences=%d",
                len(kept),
                cfg.num_sequences,
            )
        log_cut(seqs.lengths[kept], cfg.max_len - 1, "protein_lm")
        subset = seqs.subset(kept, cfg.max_len - 1)
        groups = (
            near_duplicate_groups(subset, seed=cfg.data_seed) if cfg.group_near_duplicates else np.arange(len(subset))
        )
        parts = group_split(groups, None, (cfg.val_fraction, cfg.test_fraction), cfg.data_seed)
        log.info(
            "protein_lm: %d sequences, %d residues; %s", len(subset), subset.residues.size, split_note(parts, groups)
        )
        features = datasets.Features({"input_ids": datasets.Sequence(datasets.Value("uint8"))})
        return datasets.DatasetDict(
            {
                split: datasets.Dataset.from_dict(
                    {"input_ids": [[START_ID, *subset.get(i).tolist()] for i in idx]}, features=features
                )
                for split, idx in zip(("train", "validation", "test"), parts)
            }
        )

    def describe(self, dsd) -> DataInfo:
        info = super().describe(dsd)
        info.majority_accuracy = residue_baselines(dsd)["majority_accuracy"]
        return info

    def load(self, cache_dir=None):
        """(DatasetDict, ProteinLMDataInfo): the cached data with its baselines (computed, logged)."""
        dsd, info = super().load(cache_dir)
        baselines = residue_baselines(dsd)
        log.info(
            "protein_lm baselines on test: unigram of train %.4f bits/residue, test residue entropy %.4f bits, "
            "most frequent residue %.4f accuracy",
            baselines["unigram_bits_per_token"],
            baselines["residue_entropy_bits"],
            baselines["majority_accuracy"],
        )
        fields = {**info.as_dict(), **{k: v for k, v in baselines.items() if k != "majority_accuracy"}}
        return dsd, ProteinLMDataInfo(**fields)
