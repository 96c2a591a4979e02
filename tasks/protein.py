"""Protein function / family classification from the amino-acid sequence alone.

One residue per token (20 amino acids, then the rare letters X B Z U O; other letters
such as J read as X, counted in the log; 0 is padding); the first ``max_len`` residues of
a sequence are kept. In the spirit of TAPE's remote homology and Pfam family tasks (Rao
et al. 2019, arXiv:1906.08230), at LRA's byte-level text lengths. Three sources (readers
in ``tasks/_protein_io.py``):

* ``metastudent`` (offline default): the UniProt proteins with Gene Ontology (GO)
  annotations of Debian's ``metastudent-data`` (``dataset_201401/<ontology>/``: the BLAST
  v4 protein database ``goasp.fasta.{pin,psq,phr}`` and ``goasp_annot.dat``, accession
  then GO terms). Classes: the ``num_classes`` terms most often annotated directly,
  skipping the ontology's root and any term that is an ancestor or descendant
  (``is_a``/``part_of`` in ``goGraph.txt``) of one already chosen. A protein's label is
  the one chosen term its annotations imply (a term implies itself and its ancestors);
  proteins implying none or several are left out (counted). MFO, 10 classes: metal ion
  binding, nucleotide binding, transferase, hydrolase, RNA binding, structural
  constituent of ribosome, oxidoreductase, DNA binding, ligase, lyase. ``task.data_dir``
  may point at another copy of ``dataset_201401``.
* ``fasta``: ``task.data_dir`` holds FASTA file(s) (``*.fasta|*.fa|*.faa``, optionally
  ``.gz``) and ``labels.tsv`` (``id<TAB>label``, optional header ``id<TAB>label``); a
  UniProt FASTA id ``db|ACCESSION|NAME`` also matches its accession.
* ``pfam``: ``task.data_dir`` holds Pfam-style family files: Stockholm alignments
  (``*.sto|*.stk|*.sth|*.seed``, gaps removed, labelled by ``#=GF ID`` or the file name;
  a file may hold many alignments, like ``Pfam-A.seed``) or one FASTA file per family
  (labelled by the file name).

Then, for every source: a sequence occurring several times (once cut to ``max_len``) is
kept once, or dropped when its copies carry different labels; the ``num_classes`` most
frequent labels are kept (fewer than ``min_class_size`` distinct sequences in one is an
error), each sampled down to ``max_per_class`` (seeded), so the classes are balanced
when they are large enough; near-identical sequences are grouped (MinHash over 5-mers,
see ``_protein_io.near_duplicate_groups``) and whole groups go to train, validation or
test, stratified by label, so no test sequence has a copy or near-copy in train.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from harness.core import register_task
from harness.data import DataSourceError, Task
from tasks._protein_io import (
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

log = logging.getLogger(__name__)

SOURCES = ("metastudent", "fasta", "pfam")


@dataclass
class ProteinConfig:
    source: str = "metastudent"  # metastudent | fasta | pfam
    data_dir: str = ""  # fasta/pfam: the source folder; metastudent: optional copy of dataset_201401
    max_len: int = 1024  # residues kept from the start of each sequence
    num_classes: int = 10  # the most frequent labels (metastudent: GO terms, see the module docstring)
    ontology: str = "MFO"  # metastudent: MFO | BPO | CCO
    max_per_class: int = 2000  # sequences sampled per class (0: all)
    min_class_size: int = 20  # fewer distinct sequences in a kept class is an error
    val_fraction: float = 0.1
    test_fraction: float = 0.1
    group_near_duplicates: bool = True  # keep near-identical sequences in one split (else exact copies only)
    data_seed: int = 0  # class sampling and the split


# LRA has no protein task. Its closest one is byte-level text classification
# (google-research/long-range-arena, lra_benchmarks/text_classification/configs/
# base_tc_config.py): batch_size 32, emb_dim 256, num_heads 4, num_layers 4, qkv_dim 256,
# mlp_dim 1024, classifier_pool "CLS", max_length 1000, num_train_steps 20000,
# weight_decay 0.1, learning_rate 0.05 under "constant * linear_warmup * rsqrt_decay"
# with warmup 8000: lr = 0.05 * min(1, step/8000) / sqrt(max(step, 8000)), a peak of
# 0.05 / sqrt(8000) = 5.59e-4, which is this harness's "rsqrt" schedule at lr 5.59e-4.
# Sequences: 1024 residues (the config's 1000 rounded up; keeps 97% of MFO proteins whole).
LRA_MODEL = {"dim": 256, "depth": 4, "heads": 4, "mlp_dim": 1024, "dropout": 0.1, "positions": "learned"}
LRA_TRAIN = {
    "max_steps": 20000,
    "batch_size": 32,
    "lr": 5.59e-4,
    "schedule": "rsqrt",
    "warmup_steps": 8000,
    "weight_decay": 0.1,
    "eval_every": 500,
}


@register_task(
    "protein",
    ProteinConfig,
    sources=SOURCES,
    requires=("key_padding",),
    scales={
        # CI: 4 GO classes, 120 sequences each, first 128 residues.
        "tiny": {"task": {"max_len": 128, "num_classes": 4, "max_per_class": 120}},
        # 2 CPU cores (1-2 minutes): 10 balanced GO classes, first 256 residues; a step costs
        # 1.75 listops small steps, hence 300 of them.
        "small": {
            "task": {"max_len": 256, "num_classes": 10, "max_per_class": 800},
            "train": {"max_steps": 300, "eval_every": 100},
        },
        "lra": {
            "task": {"max_len": 1024, "num_classes": 10, "max_per_class": 5000},
            "model": {**LRA_MODEL, "pooling": "cls"},
            "train": LRA_TRAIN,
        },
    },
)
class Protein(Task):
    """Protein: GO function / Pfam family of a protein from its residues (TAPE-style)."""

    head = "classifier"
    debian_packages: ClassVar[tuple[str, ...]] = (METASTUDENT_PACKAGE,)

    @property
    def vocab_size(self) -> int:
        return VOCAB_SIZE

    @property
    def num_classes(self) -> int:
        return int(self.cfg.num_classes)

    def cache_params(self) -> dict[str, Any]:
        return protein_cache_params(self.cfg, super().cache_params())

    def source_files(self) -> list[Path]:
        return protein_source_files(self.cfg, with_labels=True)

    def build(self):
        import datasets

        cfg = self.cfg
        seqs = read_sequences(cfg.source, cfg.data_dir, ontology=cfg.ontology, num_classes=cfg.num_classes)
        labelled = np.array([i for i, name in enumerate(seqs.labels) if name], dtype=np.int64)
        kept = crop_and_dedupe(seqs, labelled, cfg.max_len, labelled=True)
        classes = self.choose_classes(Counter(seqs.labels[i] for i in kept))
        rng = np.random.default_rng(cfg.data_seed)
        chosen: list[int] = []
        for name in classes:
            members = np.array([i for i in kept if seqs.labels[i] == name])
            chosen.extend(sorted(rng.permutation(members)[: cfg.max_per_class or None].tolist()))
        log_cut(seqs.lengths[chosen], cfg.max_len, "protein")
        subset = seqs.subset(chosen, cfg.max_len)
        labels = np.array([classes.index(name) for name in subset.labels])
        groups = (
            near_duplicate_groups(subset, seed=cfg.data_seed) if cfg.group_near_duplicates else np.arange(len(subset))
        )
        parts = group_split(groups, labels, (cfg.val_fraction, cfg.test_fraction), cfg.data_seed)
        log.info("protein: %d classes, %s", len(classes), split_note(parts, groups))
        features = datasets.Features(
            {"input_ids": datasets.Sequence(datasets.Value("uint8")), "label": datasets.ClassLabel(names=classes)}
        )
        return datasets.DatasetDict(
            {
                split: datasets.Dataset.from_dict(
                    {"input_ids": [subset.get(i).tolist() for i in idx], "label": labels[idx].tolist()},
                    features=features,
                )
                for split, idx in zip(("train", "validation", "test"), parts)
            }
        )

    def choose_classes(self, counts: Counter) -> list[str]:
        """The ``num_classes`` most frequent labels (sorted by name); too few or too small is an error."""
        cfg = self.cfg
        ranked = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))
        if len(ranked) < cfg.num_classes:
            raise DataSourceError(
                f"protein ({cfg.source}) has {len(ranked)} labels, fewer than "
                f"task.num_classes={cfg.num_classes}; lower it"
            )
        small = [f"{name} ({n})" for name, n in ranked[: cfg.num_classes] if n < cfg.min_class_size]
        if small:
            raise DataSourceError(
                f"protein ({cfg.source}): classes with fewer than task.min_class_size={cfg.min_class_size} distinct "
                f"sequences: {', '.join(small)}; lower task.num_classes or task.min_class_size"
            )
        left_out = sum(n for _, n in ranked[cfg.num_classes :])
        if left_out:
            log.info(
                "protein: %d sequences of %d less frequent labels left out (num_classes=%d)",
                left_out,
                len(ranked) - cfg.num_classes,
                cfg.num_classes,
            )
        if cfg.max_per_class:
            capped = sum(max(0, n - cfg.max_per_class) for _, n in ranked[: cfg.num_classes])
            log.info("protein: %d sequences beyond max_per_class=%d not sampled", capped, cfg.max_per_class)
        return sorted(name for name, _ in ranked[: cfg.num_classes])
