"""Protein LM: the builder (start token, splits, baselines), the shared readers through this
task, causality of the built model, and cells end to end (ok with bits per residue;
``unsupported`` for a non-causal mechanism)."""

import math
from collections import Counter

import pytest
import torch
from test_protein import STOCKHOLM, families, write_fasta, write_fasta_source

from harness.core.registry import create_task, get_mechanism, list_mechanisms
from harness.data.task import MalformedRecord, collate
from harness.train.build import build_model
from harness.train.config import compose
from harness.train.model import ModelConfig
from harness.train.run import run_cell
from tasks import _protein_io as pio
from tasks.protein_lm import START_ID, residue_baselines

CAUSAL_MECHANISMS = [m for m in list_mechanisms() if get_mechanism(m).capabilities.causal]
NON_CAUSAL_MECHANISMS = [m for m in list_mechanisms() if not get_mechanism(m).capabilities.causal]


def lm_task(tmp_path, **overrides):
    return create_task(
        "protein_lm", **{"source": "fasta", "data_dir": str(tmp_path / "src"), "max_len": 48, **overrides}
    )


def test_builder_adds_start_token_cuts_dedupes_and_splits_by_group(tmp_path):
    fams = families(11, 3, 30, length=70)
    fams["fam0"] += fams["fam0"][:4]  # exact copies: kept once
    write_fasta_source(tmp_path / "src", fams)
    (tmp_path / "src" / "labels.tsv").unlink()  # a language model needs no labels
    dsd, info = lm_task(tmp_path, num_sequences=0, val_fraction=0.2, test_fraction=0.2).load(tmp_path / "cache")
    assert sum(info.sizes.values()) == 90 and info.num_classes is None
    originals = {s[:47] for seqs in fams.values() for s in seqs}
    seen = {}
    for split in ("train", "validation", "test"):
        assert abs(info.sizes[split] - {"train": 54, "validation": 18, "test": 18}[split]) <= 2
        for ids in dsd[split]["input_ids"]:
            assert ids[0] == START_ID and START_ID not in ids[1:] and 2 <= len(ids) <= 48
            residues = pio.decode(ids[1:])
            assert residues in originals and residues not in seen, (split, seen.get(residues))  # no copy across splits
            seen[residues] = split
    assert info.length_max == 48  # start token + 47 residues
    assert 0.0 < info.majority_accuracy < 0.2
    assert info.unigram_bits_per_token >= info.residue_entropy_bits > 3.5  # ~log2(20) = 4.32 for random residues


def test_sample_size_and_seed(tmp_path):
    write_fasta_source(tmp_path / "src", families(12, 2, 40))
    a, info = lm_task(tmp_path, num_sequences=50).load(tmp_path / "cache")
    assert sum(info.sizes.values()) == 50
    b, _ = lm_task(tmp_path, num_sequences=50).load(tmp_path / "cache2")
    c, _ = lm_task(tmp_path, num_sequences=50, data_seed=1).load(tmp_path / "cache")
    assert a["test"]["input_ids"] == b["test"]["input_ids"] != c["test"]["input_ids"]


def test_baselines_by_hand():
    import datasets

    def split(*seqs):
        return datasets.Dataset.from_dict({"input_ids": [[START_ID, *pio.encode(s)] for s in seqs]})

    dsd = datasets.DatasetDict({"train": split("AAAC"), "validation": split("A"), "test": split("AC", "")})
    got = residue_baselines(dsd)
    p_a, p_c = 4 / 29, 2 / 29  # add-one over the 25 letters: (3 + 1) / (4 + 25), (1 + 1) / (4 + 25)
    assert got["unigram_bits_per_token"] == pytest.approx(-(math.log2(p_a) + math.log2(p_c)) / 2)
    assert got["residue_entropy_bits"] == pytest.approx(1.0)
    assert got["majority_accuracy"] == pytest.approx(0.5)  # predicting A, the most frequent residue of train


def test_reads_pfam_family_files(tmp_path):
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "Pfam-A.seed").write_text(STOCKHOLM)
    dsd, info = lm_task(tmp_path, source="pfam", group_near_duplicates=False).load(tmp_path / "cache")
    everything = {pio.decode(ids[1:]) for s in ("train", "validation", "test") for ids in dsd[s]["input_ids"]}
    assert everything == {"MKVLAGEYYWWPLK", "MKAVLASGEWWLK", "PEVSGK", "PEVTSGK", "AEVTAGRK"}


def test_fasta_record_without_sequence_names_file_and_record(tmp_path):
    (tmp_path / "src").mkdir()
    write_fasta(tmp_path / "src" / "good.fasta", [("sp|P1|A_HUMAN", "MKVLA")])
    (tmp_path / "src" / "bad.fa").write_text(">sp|P2|B_HUMAN\nMKV\n>sp|P3|C_HUMAN no residues\n")
    with pytest.raises(MalformedRecord, match=r"bad\.fa, record 'sp\|P3\|C_HUMAN' \(line 3\): has no sequence"):
        lm_task(tmp_path).load(tmp_path / "cache")


@pytest.mark.parametrize("mechanism", CAUSAL_MECHANISMS)
def test_future_residues_never_change_a_prediction(mechanism):
    """On the model the task builds: changing residue t (and everything after it) leaves
    the predictions at positions < t unchanged, in a padded batch."""
    task = create_task("protein_lm", max_len=40)
    torch.manual_seed(0)
    model = build_model(task, ModelConfig(dim=32, depth=2, heads=2, mlp_dim=64, dropout=0.0), mechanism).eval()
    gen = torch.Generator().manual_seed(1)
    seqs = [[START_ID, *torch.randint(1, 26, (n,), generator=gen).tolist()] for n in (39, 25)]
    batch = collate([{"input_ids": s} for s in seqs])
    t = 17
    changed = batch["input_ids"].clone()
    changed[:, t:] = torch.where(
        batch["padding_mask"][:, t:], 0, 1 + (changed[:, t:] % 25)
    )  # another residue, pads kept
    with torch.no_grad():  # the same random draws in both passes (LSH rotations, feature maps)
        torch.manual_seed(1234)
        before = model(batch)
        torch.manual_seed(1234)
        after = model({**batch, "input_ids": changed})
    assert torch.allclose(before[:, :t], after[:, :t], atol=1e-5), (before[:, :t] - after[:, :t]).abs().max()
    assert not torch.allclose(before[:, t:25], after[:, t:25], atol=1e-3)  # the changed residues do matter
    _, stats = model.loss(before, batch)
    assert int(stats["count"]) == 39 + 25  # every residue is predicted, the first one too (from the start token)


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    folder = tmp_path_factory.mktemp("protein_lm") / "src"
    write_fasta_source(folder, families(13, 4, 30))
    return folder


def lm_cell(tmp_path, source, mechanism):
    return compose(
        [
            "task=protein_lm",
            "scale=tiny",
            f"mechanism={mechanism}",
            "task.source=fasta",
            f"task.data_dir={source}",
            "trainer.progress_bar=false",
            "train.max_steps=16",
            "train.eval_every=8",
            f"results_dir={tmp_path / 'results'}",
            f"cache_dir={tmp_path / 'cache'}",
        ]
    )


def test_tiny_cell_reports_bits_per_residue_and_accuracy(tmp_path, source):
    result = run_cell(lm_cell(tmp_path, source, "softmax"))
    assert result["status"] == "ok", result["error"]
    test = result["metrics"]["test"]
    assert test["bits_per_token"] == pytest.approx(test["loss"] / math.log(2)) and 0 <= test["accuracy"] <= 1
    assert 0 < test["bits_per_token"] < math.log2(27) + 1  # near the uniform 4.75 bits after 16 steps, finite
    data = result["data"]
    assert data["source"] == "fasta" and data["unigram_bits_per_token"] >= data["residue_entropy_bits"] > 3.5
    assert 0 < data["majority_accuracy"] < 0.2


@pytest.mark.skipif(not NON_CAUSAL_MECHANISMS, reason="every registered mechanism is causal")
def test_non_causal_mechanism_cell_is_unsupported_not_failed(tmp_path, source):
    mechanism = "nystrom" if "nystrom" in NON_CAUSAL_MECHANISMS else NON_CAUSAL_MECHANISMS[0]
    result = run_cell(lm_cell(tmp_path, source, mechanism))
    assert result["status"] == "unsupported" and "causal" in result["error"]
    assert result["metrics"] == {} and result["data"]["source"] == "fasta"


@pytest.mark.slow
def test_metastudent_package_at_tiny_scale(tmp_path):
    """The real offline source (Debian metastudent-data, fetched if needed) at scale=tiny."""
    cfg = compose(["task=protein_lm", "scale=tiny"]).task
    dsd, info = create_task("protein_lm", **{k: v for k, v in cfg.items() if k != "name"}).load(tmp_path)
    assert sum(info.sizes.values()) == 400 and info.length_max == 128
    residues = Counter(r for ids in dsd["train"]["input_ids"] for r in pio.decode(ids[1:]))
    assert residues.most_common(1)[0][0] == "L"  # leucine, the most frequent amino acid in UniProt
    assert 4.0 < info.residue_entropy_bits <= info.unigram_bits_per_token < 4.3
