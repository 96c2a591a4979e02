"""ListOps: the generator against an independent evaluator, bounds, determinism; the LRA loader."""

import random
import statistics

import pytest

from harness.cli import main
from harness.core.registry import create_task
from harness.data.task import DataSourceError, MalformedRecord
from tasks import listops


def evaluate(tokens: list[str]) -> int:
    """An independent evaluator: a stack machine over the token sequence."""
    stack: list = []
    for tok in tokens:
        if tok.startswith("["):
            stack.append([tok])
        elif tok == "]":
            op, *args = stack.pop()
            value = {
                "[MIN": min,
                "[MAX": max,
                "[SM": lambda a: sum(a) % 10,
                "[MED": lambda a: int(statistics.median(a)),
            }[op](args)
            if stack:
                stack[-1].append(value)
            else:
                return value
        else:
            if stack:
                stack[-1].append(int(tok))
            else:
                return int(tok)
    raise AssertionError("unterminated expression")


def depth_and_args(tokens: list[str]) -> tuple[int, list[int]]:
    depth = max_depth = 0
    counts, stack = [], []
    for tok in tokens:
        if tok.startswith("["):
            depth += 1
            max_depth = max(max_depth, depth)
            stack.append(0)
        elif tok == "]":
            counts.append(stack.pop())
            depth -= 1
            if stack:
                stack[-1] += 1
        elif stack:
            stack[-1] += 1
    return max_depth, counts


def test_generated_rows_are_correct_and_bounded(tmp_path):
    assert (
        main(
            [
                "tool",
                "listops-generate",
                f"data_dir={tmp_path}",
                "num_train=300",
                "num_val=40",
                "num_test=40",
                "seed=3",
                "min_length=20",
                "max_length=120",
            ]
        )
        == 0
    )
    seen = set()
    for name in ("basic_train.tsv", "basic_val.tsv", "basic_test.tsv"):
        lines = (tmp_path / name).read_text().splitlines()
        assert lines[0] == "Source\tTarget"
        for line in lines[1:]:
            source, target = line.split("\t")
            assert source.startswith("( ") and source.endswith(" )")  # LRA's parenthesised printing
            tokens = listops.tokenize(source)
            assert evaluate(tokens) == int(target)
            assert 20 < len(tokens) < 120  # values + operators + closing brackets
            depth, counts = depth_and_args(tokens)
            assert 1 <= depth <= 9  # operators never at the max depth 10 (values only)
            assert all(2 <= c <= 10 for c in counts)
            assert source not in seen  # no duplicates, across splits too
            seen.add(source)


def test_same_seed_same_files_other_seed_other_files(tmp_path):
    args = ["num_train=30", "num_val=5", "num_test=5", "min_length=10", "max_length=80"]
    for out, seed in (("a", "1"), ("b", "1"), ("c", "2")):
        assert main(["tool", "listops-generate", f"data_dir={tmp_path / out}", f"seed={seed}", *args]) == 0
    a, b, c = ((tmp_path / d / "basic_train.tsv").read_text() for d in "abc")
    assert a == b and a != c


def test_operators_and_median_truncation():
    assert listops.apply_operator(listops.MED, [1, 2]) == 1  # int(np.median([1, 2])) = int(1.5)
    assert listops.apply_operator(listops.MED, [3, 8, 1, 4]) == 3
    assert listops.apply_operator(listops.SUM_MOD, [9, 8, 7]) == 4
    rng = random.Random(0)
    values = [listops.generate_tree(rng)[0] for _ in range(2000)]
    leaves = sum(isinstance(v, int) for v in values)
    assert 0.70 < leaves / len(values) < 0.80  # a value with probability 0.75 at the root


def write_lra_fixture(folder, rows_by_file):
    folder.mkdir(parents=True, exist_ok=True)
    for name, rows in rows_by_file.items():
        (folder / name).write_text("Source\tTarget\n" + "".join(f"{s}\t{t}\n" for s, t in rows))


def test_lra_loader_reads_released_layout(tmp_path):
    rows = [("( ( ( [MAX 2 ) 9 ) ] )", 9), ("( ( ( ( [SM 5 ) 7 ) ( ( ( [MIN 3 ) 4 ) ] ) ) ] )", 5)]
    write_lra_fixture(tmp_path / "lra", {f: rows for f in listops.SPLIT_FILES.values()})
    task = create_task("listops", source="lra", data_dir=str(tmp_path / "lra"), max_len=64)
    dsd, info = task.load(tmp_path / "cache")
    assert info.source == "lra" and info.sizes == {"train": 2, "validation": 2, "test": 2}
    first = [listops.TOKENS[i] for i in dsd["train"][0]["input_ids"]]
    assert first == ["[MAX", "2", "9", "]"]  # parentheses dropped, ] kept
    assert dsd["train"]["label"] == [9, 5]


def test_lra_loader_names_file_and_line_of_a_malformed_row(tmp_path):
    good = [("( ( [MAX 2 ) ] )", 2)]
    write_lra_fixture(tmp_path / "lra", {f: good for f in listops.SPLIT_FILES.values()})
    with open(tmp_path / "lra" / "basic_val.tsv", "a") as f:
        f.write("( ( [MAX 2 ) ] )\t2\textra\n")
    task = create_task("listops", source="lra", data_dir=str(tmp_path / "lra"))
    with pytest.raises(MalformedRecord, match=r"basic_val\.tsv, line 3: expected 2 tab-separated fields"):
        task.load(tmp_path / "cache")
    (tmp_path / "lra" / "basic_val.tsv").write_text("Source\tTarget\n( ( [MAX 2 ) ] )\tseven\n")
    with pytest.raises(MalformedRecord, match=r"basic_val\.tsv, line 2: target 'seven'"):
        task.load(tmp_path / "cache")


def test_missing_real_source_says_what_to_download(tmp_path):
    task = create_task("listops", source="lra", data_dir=str(tmp_path / "nowhere"))
    with pytest.raises(DataSourceError, match="lra_release"):
        task.load(tmp_path / "cache")


def test_unknown_source_lists_valid_ones():
    with pytest.raises(ValueError, match="valid sources: generated, lra"):
        create_task("listops", source="imdb")


def test_cache_is_reused_and_keyed_by_parameters(tmp_path):
    small = dict(min_length=5, max_length=40, max_len=40, num_train=50, num_val=10, num_test=10)
    a = create_task("listops", **small)
    _, info = a.load(tmp_path)
    assert 0 < info.majority_accuracy < 1
    stamp = (a.cache_path(tmp_path) / "meta.json").stat().st_mtime_ns
    a.load(tmp_path)
    assert (a.cache_path(tmp_path) / "meta.json").stat().st_mtime_ns == stamp  # not rebuilt
    b = create_task("listops", **{**small, "data_seed": 1})
    assert b.cache_path(tmp_path) != a.cache_path(tmp_path)
    assert b.load(tmp_path)[1].fingerprint != info.fingerprint
