"""scale=lra protocols (issue 23): the presets pinned to the values their sources give
(docs/protocols.md cites each), the protocol in a cell's identity and path, the model and
optimiser options they use, and every protocol x task cell training four steps on CPU on
data in its publisher's own layout."""

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from harness.train.cells import config_hash, resolve_cell
from harness.train.config import CONF_DIR, compose

LRA_TASKS = ("listops", "text", "retrieval", "image", "pathfinder")


def preset(task: str, protocol: str | None = None, *extra: str):
    return compose([f"task={task}", "scale=lra", *([f"protocol={protocol}"] if protocol else []), *extra])


def flat(cfg) -> dict:
    out = {}
    for section in ("task", "model", "train", "trainer"):
        for key, value in OmegaConf.to_container(cfg[section], resolve=True).items():
            out[f"{section}.{key}"] = value
    return out


# Each value as its source gives it (the YAML under harness/conf/protocol/ cites file and line of thought).
LRA = {  # google-research/long-range-arena @ cd31e5c
    "listops": {
        "task.max_len": 2000,
        "model.dim": 512,
        "model.depth": 4,
        "model.heads": 8,
        "model.qkv_dim": 512,
        "model.mlp_dim": 1024,
        "model.dropout": 0.1,
        "model.attention_dropout": 0.1,
        "model.positions": "sinusoidal",
        "model.pooling": "cls",
        "model.head_mlp": 1024,
        "train.max_steps": 5000,
        "train.batch_size": 32,
        "train.schedule": "rsqrt",
        "train.warmup_steps": 1000,
        "train.weight_decay": 0.1,
        "train.eval_every": 50,
    },
    "text": {
        "task.max_len": 1000,
        "model.dim": 256,
        "model.depth": 4,
        "model.heads": 4,
        "model.qkv_dim": 256,
        "model.mlp_dim": 1024,
        "model.pooling": "cls",
        "model.positions": "sinusoidal",
        "model.head_mlp": 1024,
        "model.attention_dropout": 0.1,
        "train.max_steps": 20000,
        "train.warmup_steps": 8000,
        "train.schedule": "rsqrt",
        "train.weight_decay": 0.1,
        "train.eval_every": 100,
    },
    "retrieval": {
        "task.max_len": 4000,
        "model.dim": 128,
        "model.depth": 4,
        "model.heads": 4,
        "model.qkv_dim": 128,
        "model.mlp_dim": 512,
        "model.pooling": "first",
        "model.interaction": "concat",
        "model.head_mlp": 512,
        "model.positions": "sinusoidal",
        "train.max_steps": 5000,
        "train.warmup_steps": 8000,
        "train.weight_decay": 0.1,
    },
    "image": {
        "task.max_len": 1024,
        "model.dim": 128,
        "model.depth": 1,
        "model.heads": 8,
        "model.qkv_dim": 64,
        "model.mlp_dim": 128,
        "model.dropout": 0.3,
        "model.attention_dropout": 0.2,
        "model.positions": "learned",
        "model.pooling": "cls",
        "model.head_mlp": 128,
        "train.max_steps": 35000,
        "train.batch_size": 256,
        "train.lr": 5e-4,
        "train.schedule": "cosine",
        "train.warmup_steps": 175,
        "train.weight_decay": 0.0,
        "train.eval_batches": 39,
    },
    "pathfinder": {
        "task.max_len": 1024,
        "task.difficulty": "hard",
        "model.dim": 32,
        "model.depth": 4,
        "model.heads": 4,
        "model.qkv_dim": 16,
        "model.mlp_dim": 32,
        "model.dropout": 0.2,
        "model.attention_dropout": 0.1,
        "model.positions": "sinusoidal",
        "model.pooling": "mean",
        "model.head_mlp": 32,
        "train.max_steps": 62400,
        "train.batch_size": 512,
        "train.lr": 1e-3,
        "train.warmup_steps": 312,
        "train.eval_batches": 39,
    },
}
LRA_OPTIMIZER = {
    "train.betas": [0.9, 0.98],
    "train.eps": 1e-9,
    "train.weight_decay_all": True,
    "train.grad_clip": 0.0,
    "trainer.precision": "32-true",
}
PYTORCH_MODEL = {
    "model.dim": 64,
    "model.depth": 2,
    "model.heads": 2,
    "model.qkv_dim": 0,
    "model.mlp_dim": 128,
    "model.dropout": 0.1,
    "model.attention_dropout": 0.1,
    "model.positions": "learned",
    "model.pooling": "padded_mean",
    "model.head_mlp": 128,
    "model.interaction": "nli",
    "train.schedule": "onecycle",
    "train.betas": [0.9, 0.999],
    "train.eps": 1e-6,
    "train.weight_decay": 0.0,
    "trainer.precision": "16-mixed",
}
SKYFORMER = {  # pkuzengqi/Skyformer @ 1a677cb, src/config.py
    "listops": {
        "task.max_len": 2000,
        "train.max_steps": 50000,
        "train.batch_size": 32,
        "train.lr": 1e-4,
        "train.warmup_steps": 1000,
    },
    "text": {
        "task.max_len": 4000,
        "train.max_steps": 50000,
        "train.batch_size": 32,
        "train.lr": 1e-4,
        "train.warmup_steps": 80,
    },
    "retrieval": {
        "task.max_len": 4000,
        "train.max_steps": 50000,
        "train.batch_size": 16,
        "train.lr": 2e-4,
        "train.warmup_steps": 800,
    },
    "image": {
        "task.max_len": 1024,
        "train.max_steps": 50000,
        "train.batch_size": 256,
        "train.lr": 1e-4,
        "train.warmup_steps": 175,
    },
    "pathfinder": {
        "task.max_len": 1024,
        "task.difficulty": "hard",
        "train.max_steps": 50000,
        "train.batch_size": 128,
        "train.lr": 2e-4,
        "train.warmup_steps": 312,
    },
}
NYSTROMFORMER = {  # mlpen/Nystromformer @ 5689313, LRA/code/lra_config.py and LRA/datasets/
    "listops": {"task.max_len": 2000, "train.max_steps": 5000, "train.batch_size": 32, "train.warmup_steps": 1000},
    "text": {"task.max_len": 1000, "train.max_steps": 20000, "train.batch_size": 32, "train.warmup_steps": 8000},
    "retrieval": {"task.max_len": 4000, "train.max_steps": 30000, "train.batch_size": 32, "train.warmup_steps": 800},
    "image": {"task.max_len": 1024, "train.max_steps": 35000, "train.batch_size": 256, "train.warmup_steps": 175},
    "pathfinder": {"task.max_len": 1024, "train.max_steps": 62400, "train.batch_size": 256, "train.warmup_steps": 312},
}


def expected(protocol: str, task: str) -> dict:
    if protocol == "lra":
        return {**LRA_OPTIMIZER, **LRA[task]}
    if protocol == "pytorch":
        return {**PYTORCH_MODEL, "train.grad_clip": 1.0, "train.grad_clip_algorithm": "value", **SKYFORMER[task]}
    return {**PYTORCH_MODEL, "train.grad_clip": 0.0, "train.lr": 1e-4, **NYSTROMFORMER[task]}


@pytest.mark.parametrize("protocol", ["lra", "pytorch", "nystromformer"])
@pytest.mark.parametrize("task", LRA_TASKS)
def test_presets_are_the_cited_values(task, protocol):
    got = flat(preset(task, None if protocol == "lra" else protocol))
    want = expected(protocol, task)
    assert {k: got.get(k) for k in want} == want


def test_lra_peak_learning_rates_are_lras_constant_over_sqrt_warmup():
    # 'constant * linear_warmup * rsqrt_decay' with constant 0.05 peaks at 0.05 / sqrt(warmup)
    for task, warmup in (("listops", 1000), ("text", 8000), ("retrieval", 8000)):
        assert preset(task).train.lr == pytest.approx(0.05 / math.sqrt(warmup), rel=1e-4)


def test_lra_is_the_default_protocol_and_the_scale_says_which():
    cfg = preset("listops")
    assert cfg.scale.protocol == "lra" and "pytorch" in cfg.scale.protocols
    assert compose(["task=listops", "scale=small"]).scale.protocol == ""


def test_pathx_preset_is_lras_pathfinder128():
    got = flat(preset("pathfinder", None, "+preset=pathx"))
    assert {
        k: got[k]
        for k in (
            "task.resolution",
            "task.max_len",
            "model.depth",
            "model.heads",
            "model.dim",
            "model.qkv_dim",
            "model.positions",
            "model.pooling",
            "train.batch_size",
            "train.grad_clip",
            "train.max_steps",
        )
    } == {
        "task.resolution": 128,
        "task.max_len": 16384,
        "model.depth": 1,
        "model.heads": 2,
        "model.dim": 32,
        "model.qkv_dim": 16,
        "model.positions": "learned",
        "model.pooling": "mean",
        "train.batch_size": 64,
        "train.grad_clip": 1.0,
        "train.max_steps": 500000,
    }


def test_tasks_outside_lra_keep_their_own_presets_under_protocol_lra():
    cfg = preset("mqar")
    assert cfg.scale.protocol == "lra" and cfg.task.max_len == 4096 and cfg.train.eps == 1e-8


def test_protocol_errors_are_one_line():
    from harness.train.config import check_protocol

    with pytest.raises(ValueError, match=r"protocol=pytorch is a setting of scale=lra; scale=tiny has no protocols"):
        check_protocol(compose(["task=listops", "protocol=pytorch"]))
    with pytest.raises(ValueError, match=r"protocol=pytorch has no preset for task 'mqar' \(it covers image, listops"):
        check_protocol(preset("mqar", "pytorch"))
    with pytest.raises(ValueError, match=r"protocol=none at scale=lra; valid: lra, pytorch, nystromformer"):
        check_protocol(preset("listops", "none"))


def test_every_protocol_setting_cites_its_source():
    files = [*sorted((CONF_DIR / "protocol").glob("*/*.yaml")), CONF_DIR / "preset" / "pathx.yaml"]
    assert len(files) == 18
    for path in files:
        for line in path.read_text().splitlines():
            code = line.split("#")[0].rstrip()
            if code.startswith("  ") and not code.lstrip().startswith("-") and not code.endswith(":"):
                assert "#" in line, f"{path.relative_to(CONF_DIR)}: {line.strip()!r} cites no source"


# ----------------------------------------------------------------------------- identity


def test_protocol_is_part_of_the_cell_identity_and_its_path(tmp_path):
    lra = resolve_cell(preset("listops", None, f"results_dir={tmp_path}"))
    torch_ = resolve_cell(preset("listops", "pytorch", f"results_dir={tmp_path}"))
    assert lra.identity["protocol"] == "lra" and lra.variant == ""
    assert torch_.identity["protocol"] == "pytorch" and torch_.variant == "pytorch"
    assert torch_.variant_label == "protocol=pytorch"
    assert torch_.result_path == tmp_path / "runs" / "lra" / "listops" / "softmax" / "pytorch" / "seed0.json"
    other = resolve_cell(preset("listops", "pytorch", f"results_dir={tmp_path}", "model.depth=3"))
    assert other.variant == other.config_hash and other.variant_label == "protocol=pytorch, model.depth=3"


def test_later_settings_at_their_defaults_leave_the_identity_alone(tmp_path):
    base = resolve_cell(compose(["task=listops", f"results_dir={tmp_path}"]))
    assert not {"betas", "eps", "weight_decay_all", "grad_clip_algorithm"} & set(base.identity["train"])
    assert not {"qkv_dim", "attention_dropout", "head_mlp", "interaction"} & set(base.identity["model"])
    assert "protocol" not in base.identity and base.variant == ""
    changed = resolve_cell(compose(["task=listops", f"results_dir={tmp_path}", "train.eps=1e-9"]))
    assert changed.identity["train"]["eps"] == 1e-9 and config_hash(changed.identity) != config_hash(base.identity)


# ----------------------------------------------------------------------------- model options


class _Task:
    def __init__(self, head: str, num_classes: int = 3, vocab_size: int = 20, max_len: int = 16):
        self.name, self.head, self.num_classes, self.vocab_size, self.max_len = (
            "t",
            head,
            num_classes,
            vocab_size,
            max_len,
        )


def _model(head="classifier", mechanism="softmax", **model):
    from harness.train.build import build_model
    from harness.train.model import ModelConfig

    return build_model(_Task(head), ModelConfig(dim=16, depth=1, heads=2, mlp_dim=32, dropout=0.0, **model), mechanism)


def test_qkv_dim_sets_the_projection_width_and_the_mechanisms_head_size():
    model = _model(qkv_dim=8)
    mix = model.encoder.blocks[0].mix
    assert (mix.to_q.out_features, mix.to_kv.out_features, mix.to_out.in_features) == (8, 16, 8)
    assert mix.dim_head == 4 and mix.mechanism.dim_head == 4
    batch = {"input_ids": torch.randint(1, 20, (2, 7)), "padding_mask": torch.zeros(2, 7, dtype=torch.bool)}
    assert model(batch).shape == (2, 3)


def test_head_mlp_is_dense_relu_dense():
    head = _model(head_mlp=24).out
    assert [type(m).__name__ for m in head] == ["Linear", "ReLU", "Linear"] and head[0].out_features == 24
    assert isinstance(_model().out, torch.nn.Linear)


def test_concat_interaction_is_lras_two_layer_mlp_on_x1_x2():
    model = _model(head="matcher", interaction="concat", head_mlp=12)
    assert [m.out_features for m in model.out if isinstance(m, torch.nn.Linear)] == [12, 6, 3]
    assert model.out[0].in_features == 32  # [X1, X2]
    batch = {
        "input_ids_1": torch.randint(1, 20, (2, 5)),
        "padding_mask_1": torch.zeros(2, 5, dtype=torch.bool),
        "input_ids_2": torch.randint(1, 20, (2, 9)),
        "padding_mask_2": torch.zeros(2, 9, dtype=torch.bool),
    }
    assert model(batch).shape == (2, 3)
    nli = _model(head="matcher", head_mlp=12)
    assert nli.out[0].in_features == 64 and isinstance(nli.out[1], torch.nn.ReLU)
    with pytest.raises(ValueError, match="model.interaction=concat needs model.head_mlp"):
        _model(head="matcher", interaction="concat")


def test_first_and_padded_mean_pooling():
    states = torch.arange(24, dtype=torch.float32).view(2, 3, 4)
    pad = torch.tensor([[False, False, True], [False, False, False]])
    first = _model(pooling="first").encoder
    assert not first.use_cls and torch.equal(first.pool(states, pad), states[:, 0])
    padded = _model(pooling="padded_mean").encoder  # the task's max_len is 16
    assert torch.allclose(padded.pool(states, pad), torch.stack([states[0, :2].sum(0), states[1].sum(0)]) / 16)
    mean = _model().encoder
    assert torch.allclose(mean.pool(states, pad)[0], states[0, :2].mean(0))


def test_attention_dropout_reaches_mechanisms_with_attention_weights_only():
    assert _model(attention_dropout=0.2).encoder.blocks[0].mix.mechanism.cfg.dropout == 0.2
    assert not hasattr(_model(mechanism="linear", attention_dropout=0.2).encoder.blocks[0].mix.mechanism.cfg, "dropout")
    from harness.train.build import build_model
    from harness.train.model import ModelConfig

    own = build_model(
        _Task("classifier"), ModelConfig(dim=16, depth=1, heads=2, attention_dropout=0.2), "softmax", {"dropout": 0.05}
    )
    assert own.encoder.blocks[0].mix.mechanism.cfg.dropout == 0.05  # the mechanism's own setting wins


def test_a_mask_reaches_no_value_check_in_the_per_call_hook(monkeypatch):
    """The capability hook runs on every mechanism call: it must not read the mask's values
    (``bool(mask.any())`` is a device sync per call on a GPU)."""
    import harness.core.attention as attention
    from harness.core.attention import UnsupportedCapability
    from harness.core.registry import create_mechanism, discover

    discover()
    calls = []
    original = torch.Tensor.any
    monkeypatch.setattr(torch.Tensor, "any", lambda self, *a, **k: calls.append(1) or original(self, *a, **k))
    q = torch.randn(1, 2, 5, 4)
    mask = torch.zeros(1, 5, dtype=torch.bool)
    softmax = create_mechanism("softmax", heads=2, dim_head=4, max_len=8)
    softmax(q, q, q, key_padding_mask=mask)

    class NoPadding(attention.Attention):
        def forward(self, q, k, v, *, key_padding_mask=None, causal=False, context=None):
            return v

    NoPadding.name, NoPadding.capabilities = "no_padding_here", attention.Capabilities()
    mech = NoPadding(None, heads=2, dim_head=4, max_len=8)
    calls.clear()
    with pytest.raises(UnsupportedCapability, match="does not support key padding masks"):
        mech(q, q, q, key_padding_mask=mask)
    assert calls == []
    assert mech(q, q, q).shape == q.shape


# ----------------------------------------------------------------------------- optimiser


def _optimizer(**train):
    from harness.train.config import TrainConfig
    from harness.train.training import TaskModule

    module = TaskModule(_model(), TrainConfig(max_steps=100, warmup_steps=10, **train))
    return module.configure_optimizers()


def test_flax_weight_decay_covers_every_parameter():
    groups = _optimizer(weight_decay=0.1, weight_decay_all=True)["optimizer"].param_groups
    assert len(groups[1]["params"]) == 0 and groups[0]["weight_decay"] == 0.1
    assert len(_optimizer(weight_decay=0.1)["optimizer"].param_groups[1]["params"]) > 0
    opt = _optimizer(betas=[0.9, 0.999], eps=1e-9)["optimizer"]
    assert opt.defaults["betas"] == (0.9, 0.999) and opt.defaults["eps"] == 1e-9


def test_onecycle_is_torchs_one_cycle_as_the_pytorch_codes_build_it():
    out = _optimizer(schedule="onecycle", lr=1e-3)
    opt, sched = out["optimizer"], out["lr_scheduler"]["scheduler"]
    assert isinstance(sched, torch.optim.lr_scheduler.OneCycleLR)
    lrs = []
    for _ in range(100):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[0] == pytest.approx(1e-3 / 25) and max(lrs) == pytest.approx(1e-3) and lrs.index(max(lrs)) == 9
    assert lrs[-1] < 1e-5
    with pytest.raises(
        ValueError, match=r"train.schedule=onecycle needs train.warmup_steps=0 >= 2 and at least 2 steps"
    ):
        from harness.train.config import TrainConfig
        from harness.train.training import TaskModule

        TaskModule(_model(), TrainConfig(max_steps=100, warmup_steps=0, schedule="onecycle")).configure_optimizers()


# ----------------------------------------------------------------------------- every cell, 4 steps on CPU


def _real_sources(root: Path) -> dict[str, list[str]]:
    """Each LRA task's real source, written in its publisher's layout (tests/test_readers_as_released.py)."""
    from PIL import Image
    from test_readers_as_released import py2_pickle, write_aan, write_aclimdb, write_listops_as_lra

    from tasks import image

    listops = write_listops_as_lra(
        root / "listops-1000", rows=[("( ( ( [MAX 2 ) 9 ) ] )", 9), ("( ( [MIN 3 ) ] )", 3)] * 4
    )
    aan = write_aan(root / "tsv_data")
    reviews = {
        (s, p): [f"{p} review {i} of {s}".encode() for i in range(4)] for s in ("train", "test") for p in ("pos", "neg")
    }
    imdb = write_aclimdb(root / "imdb", reviews)
    cifar = root / "cifar" / "cifar-10-batches-py"
    cifar.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name in [*image.CIFAR_TRAIN_BATCHES, image.CIFAR_TEST_BATCH]:
        batch = {b"labels": [i % 10 for i in range(20)], b"data": rng.integers(0, 256, (20, 3072), dtype=np.uint8)}
        (cifar / name).write_bytes(py2_pickle(batch))
    pathfinder = {}
    for side in (32, 128):
        base = root / f"pf{side}" / f"pathfinder{side}" / "curv_contour_length_14"
        (base / "metadata").mkdir(parents=True)
        (base / "imgs" / "0").mkdir(parents=True)
        rows = []
        for k in range(10):
            Image.fromarray(rng.integers(0, 256, (side, side), dtype=np.uint8), mode="L").save(
                base / "imgs" / "0" / f"s{k}.png"
            )
            rows.append(f"imgs/0 s{k}.png {k} {k % 2} 1.0 14 2 2 0.5 1 1")
        (base / "metadata" / "0.npy").write_text("\n".join(rows) + "\n")
        pathfinder[side] = str(root / f"pf{side}")
    return {
        "listops": ["task.source=lra", f"task.data_dir={listops}"],
        "text": ["task.source=imdb", f"task.data_dir={imdb}", "task.val_fraction=0.25"],
        "retrieval": ["task.source=aan", f"task.data_dir={aan}"],
        "image": ["task.source=cifar10", f"task.data_dir={cifar.parent}"],
        "pathfinder": ["task.source=lra", f"task.data_dir={pathfinder[32]}"],
        "pathx": ["task=pathfinder", "+preset=pathx", "task.source=lra", f"task.data_dir={pathfinder[128]}"],
    }


@pytest.fixture(scope="module")
def real_sources(tmp_path_factory):
    return _real_sources(tmp_path_factory.mktemp("released"))


CELLS = [(p, t) for p in ("lra", "pytorch", "nystromformer") for t in LRA_TASKS] + [("lra", "pathx")]
FAST = ("pytorch", "listops")


def _four_steps(protocol, task, sources, tmp_path):
    from harness.train.run import run_cell

    overrides = [
        "scale=lra",
        f"protocol={protocol}",
        *([f"task={task}"] if task != "pathx" else []),
        *sources[task],
        "train.max_steps=4",
        "train.eval_every=4",
        "train.warmup_steps=2",
        "train.batch_size=2",
        "train.eval_batches=1",
        "trainer.accelerator=cpu",
        "trainer.precision=32-true",
        "trainer.progress_bar=false",
        f"results_dir={tmp_path / 'results'}",
        f"cache_dir={tmp_path / 'cache'}",
    ]
    if task == "pathx":  # 16,384 tokens: a linear mechanism keeps four CPU steps in seconds
        overrides.append("mechanism=linear")
    result = run_cell(compose(overrides))
    assert result["status"] == "ok", result["error"]
    assert result["steps"] == 4 and result["config"]["protocol"] == protocol and "protocol" not in result
    assert result["variant_label"].startswith(f"protocol={protocol}, " if protocol != "lra" else "")
    return result


def test_a_protocol_cell_trains_four_steps_on_released_data(real_sources, tmp_path):
    result = _four_steps(*FAST, real_sources, tmp_path)
    assert result["config"]["model"]["pooling"] == "padded_mean" and result["data"]["source"] == "lra"


@pytest.mark.slow
@pytest.mark.parametrize("protocol,task", [c for c in CELLS if c != FAST])
def test_every_protocol_cell_trains_four_steps_on_released_data(protocol, task, real_sources, tmp_path):
    _four_steps(protocol, task, real_sources, tmp_path)


def test_task_sentinel_defaults_pass_the_config_check():
    """image's num_train=0 (all) and pathfinder's num_distractors=-1 (LRA's) / 0 (none, the small
    preset) are settings, not errors; a size of 0 still is one."""
    from harness.train.run import check_config

    check_config(compose(["task=pathfinder", "scale=small"]))  # num_distractors=0
    check_config(preset("image"))  # num_train=0
    check_config(preset("pathfinder"))  # num_distractors=-1
    with pytest.raises(ValueError, match=r"task.max_len=0 must be >= 1"):
        check_config(compose(["task=pathfinder", "task.max_len=0"]))


def test_the_grid_refuses_a_protocol_without_a_preset_before_anything_runs(tmp_path, capsys):
    from harness.grid.sweep import main

    code = main(
        [
            "scale=lra",
            "protocol=pytorch",
            "tasks=listops,mqar",
            "mechanisms=softmax",
            "seeds=0",
            "dry_run=true",
            f"results_dir={tmp_path}",
        ]
    )
    assert code != 0
    assert "mqar: protocol=pytorch has no preset for task 'mqar'" in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()


# ----------------------------------------------------------------------------- mechanisms under a protocol

_ALL = dict.fromkeys(LRA_TASKS)
# Each mechanism's settings as its protocol's source runs them (the mechanism's docstring cites the file).
MECHANISMS = {
    "lra": {  # google-research/long-range-arena @ cd31e5c, lra_benchmarks/
        # linformer_attention.py low_rank_features=16, one lr_kernel (text's 32 never reaches the model)
        "linformer": {t: {"k": 16, "share_kv": True} for t in _ALL},
        # synthesizer.py SynthesizerBlock: synthesizer_mode='random', ignore_dot_product=False
        "synthesizer": {t: {"mode": "random", "add_dot_product": True} for t in _ALL},
        # sinkhorn_transformer.py block_size=50 (64 in image/configs/*/sinkhorn_base.py); sort_activation='softmax';
        # sinkhorn_operator n_iters=1, temp=1.0, clip=1.0
        "sinkhorn": {
            t: {
                "block_size": 64 if t in ("image", "pathfinder") else 50,
                "sort": "softmax",
                "gumbel_noise": False,
                "sinkhorn_iters": 1,
                "temperature": 1.0,
                "clip": 1.0,
                "combine": "sum",
            }
            for t in _ALL
        },
        # reformer_attention.py n_hashes=1, n_buckets=10: 10 chunks of the length padded by chunk_len=10
        # (CLS counted), PRNGKey(0) at every call
        "reformer": {
            t: {"n_hashes": 1, "n_buckets": 10, "seed": 0, "redraw": False, "bucket_size": size}
            for t, size in {"listops": 201, "text": 101, "retrieval": 401, "image": 103, "pathfinder": 103}.items()
        },
        # performer.py 'generalized' (deterministic ReLU features, kernel_epsilon 0.001);
        # listops/configs/performer_base.py
        "performer": {
            **{t: {"kernel": "relu_deterministic", "feature_eps": 1e-3} for t in _ALL},
            "listops": {"kernel": "softmax", "num_features": 2, "feature_eps": 1e-6, "redraw_interval": 1},
        },
        "bigbird": {t: {"block_size": 64, "random_blocks": 3} for t in _ALL},  # bigbird.py, bigbird_attention.py
        # local.py block_size=50; image/configs/*/local_base.py block_size 64; each block sees itself only
        "local": {
            t: {"window": 64 if t in ("image", "pathfinder") else 50, "look_backward": 0, "look_forward": 0}
            for t in _ALL
        },
        "longformer": {t: {"window": 512, "global_tokens": 0} for t in _ALL},  # sliding_window_size=512, no global_mask
        "sparse": {t: {"stride": 50, "summary": 10} for t in _ALL},  # train_utils.py Fixed{1,2}Pattern(50, c=10)
    },
    "nystromformer": {  # mlpen/Nystromformer @ 5689313, LRA/code/lra_config.py and README
        "nystrom": {t: {"num_landmarks": 64, "conv_kernel_size": 35} for t in _ALL},  # nystrom-64
        "linformer": {t: {"k": 256, "share_kv": True} for t in _ALL},  # linformer-256, K = E K, V = E V
        "reformer": {t: {"n_hashes": 2, "bucket_size": 64} for t in _ALL},  # reformer-2, HF chunk length 64
        "performer": {t: {"kernel": "softmax", "num_features": 256, "redraw_interval": 0} for t in _ALL},
    },
    "pytorch": {  # pkuzengqi/Skyformer @ 1a677cb, src/config.py
        "nystrom": {t: {"num_landmarks": 128, "conv_kernel_size": 0} for t in _ALL},
        "linformer": {t: {"k": 128, "share_kv": True} for t in _ALL},
        "reformer": {t: {"n_hashes": 2, "bucket_size": 64} for t in _ALL},
        "performer": {t: {"kernel": "softmax", "num_features": 128, "redraw_interval": 0} for t in _ALL},
        "bigbird": {t: {"block_size": 64, "random_blocks": 3} for t in _ALL},
        "skyformer": {t: {"num_landmarks": 128} for t in _ALL},
    },
}
MECHANISM_CELLS = [(p, m, t) for p, per in MECHANISMS.items() for m, tasks in per.items() for t in tasks]


@pytest.mark.parametrize("protocol,mechanism,task", MECHANISM_CELLS)
def test_scale_lra_runs_each_mechanism_with_its_protocols_settings(protocol, mechanism, task):
    cfg = preset(task, None if protocol == "lra" else protocol, f"mechanism={mechanism}")
    want = MECHANISMS[protocol][mechanism][task]
    assert {k: cfg.mechanism[k] for k in want} == want


def test_mechanism_protocol_settings_stay_inside_their_protocol():
    from harness.core.registry import create_mechanism  # noqa: F401  (discovery)

    # other scales, tasks a protocol does not cover, and other protocols keep the mechanism's own defaults
    assert compose(["task=listops", "mechanism=linformer"]).mechanism.k == 256
    assert compose(["task=listops", "mechanism=linformer", "scale=small"]).mechanism.k == 256
    assert preset("mqar", None, "mechanism=linformer").mechanism.k == 256
    assert preset("listops", "pytorch", "mechanism=sinkhorn").mechanism.block_size == 64
    # the command line still wins, and a changed setting is a variant named by it
    assert preset("text", None, "mechanism=linformer", "mechanism.k=32").mechanism.k == 32


def test_a_mechanisms_protocol_settings_are_its_preset_cell(tmp_path):
    base = resolve_cell(preset("listops", None, "mechanism=reformer", f"results_dir={tmp_path}"))
    assert base.variant == "" and base.identity["mechanism"]["n_hashes"] == 1
    other = resolve_cell(
        preset("listops", None, "mechanism=reformer", "mechanism.n_hashes=2", f"results_dir={tmp_path}")
    )
    assert other.variant == other.config_hash and other.variant_label == "mechanism.n_hashes=2"


def test_protocol_settings_are_checked_when_a_mechanism_registers():
    from dataclasses import dataclass

    from harness.core.attention import Attention
    from harness.core.registry import register_mechanism

    @dataclass
    class RankConfig:
        rank: int = 4

    class Ranked(Attention):
        pass

    def register(protocols):
        return register_mechanism("ranked_protocol_check", RankConfig, protocols=protocols)(Ranked)

    with pytest.raises(TypeError, match=r"protocol lra sets unknown fields \['rnak'\]"):
        register({"lra": {"*": {"rnak": 2}}})
    with pytest.raises(ValueError, match=r"protocol lra has no task \['mqar'\]"):
        register({"lra": {"mqar": {"rank": 2}}})
    with pytest.raises(ValueError, match=r"names 'nope', which has no harness/conf/protocol/nope/"):
        register({"nope": {"*": {"rank": 2}}})


def test_new_mechanism_settings_at_their_defaults_leave_the_identity_alone(tmp_path):
    """sinkhorn's sort and clip were added after cells were recorded: at the values those cells
    ran with they are left out of the identity (so the recorded cells keep their presets)."""
    base = resolve_cell(compose(["task=listops", "mechanism=sinkhorn", f"results_dir={tmp_path}"]))
    assert "sort" not in base.identity["mechanism"] and "clip" not in base.identity["mechanism"]
    lra = resolve_cell(preset("listops", None, "mechanism=sinkhorn", f"results_dir={tmp_path}"))
    assert lra.identity["mechanism"]["sort"] == "softmax" and lra.identity["mechanism"]["clip"] == 1.0
