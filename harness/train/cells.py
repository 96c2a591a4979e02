"""What a grid cell *is*: its identity (the whole effective config), where its record,
checkpoints and logs live, and the lock that lets one process at a time run it.

The identity of a cell is its resolved config: the task (source and data paths included),
the mechanism, the model, the training recipe and the trainer's numerics (precision,
gradient accumulation). Paths to results, logs and caches, progress settings and the time
limit are not part of it. ``config_hash`` hashes the identity without the seed, so the
seeds of one config share a hash.

The cell with the scale's presets (``task=T mechanism=M scale=S`` and nothing else) is the
*default* variant and keeps the short paths; the presets of another protocol (scale=lra
``protocol=pytorch``) are the variant named by the protocol; any other config is a variant
named by its hash, with ``variant_label`` listing how it differs from the presets::

    runs/<scale>/<task>/<mechanism>/[<variant>/]seed<k>.json
    checkpoints/<scale>/<task>/<mechanism>/[<variant>/]seed<k>/
    logs/<scale>/<task>/<mechanism>/[<variant>/]seed<k>/
"""

from __future__ import annotations

import functools
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from harness.core.names import check_safe_name
from harness.core.results import result_path

TRAIN_KEYS_NOT_IN_IDENTITY = ("time_limit_s",)
TRAINER_KEYS_IN_IDENTITY = ("precision", "accumulate_grad_batches")
# Our own trainer settings that do not change what is trained or measured; every other
# trainer key (a ``+trainer.KEY`` passthrough such as limit_test_batches) is identity.
TRAINER_KEYS_NOT_IN_IDENTITY = ("accelerator", "devices", "strategy", "num_workers", "deterministic", "progress_bar")


def _plain(node: Any) -> Any:
    return OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else node


# Settings added after cells were recorded, with the value every earlier cell was trained with:
# a cell's identity leaves such a setting out while it holds that value, so adding a setting does
# not make every recorded cell a stranger to its own presets. Any other value is identity.
LATER_SETTINGS = {
    "model": {"qkv_dim": 0, "attention_dropout": 0.0, "head_mlp": 0, "interaction": "nli"},
    "train": {
        "betas": [0.9, 0.98],
        "eps": 1e-8,
        "weight_decay_all": False,
        "grad_clip_algorithm": "norm",
        "pretrain_steps": 0,
        "pretrain_mask": 0.15,
    },
}


# The same for a mechanism's config fields, per mechanism (fields whose default keeps what the
# mechanism computed before they existed; a field that changed the computation is not listed).
LATER_MECHANISM_SETTINGS = {
    "sinkhorn": {"sort": "sinkhorn", "clip": 0.0},
}


def _without_later_defaults(section: str, values: dict[str, Any]) -> dict[str, Any]:
    later = LATER_SETTINGS.get(section, {})
    if section == "mechanism":
        later = LATER_MECHANISM_SETTINGS.get(values.get("name", ""), {})
    return {k: v for k, v in values.items() if not (k in later and v == later[k])}


def cell_identity(cfg: DictConfig) -> dict[str, Any]:
    """The resolved config that makes a cell what it is (see the module docstring); at a
    scale with protocols (scale=lra) the protocol too (``protocol``: lra, pytorch, ...)."""
    train = {k: v for k, v in _plain(cfg.train).items() if k not in TRAIN_KEYS_NOT_IN_IDENTITY}
    trainer = _plain(cfg.trainer)
    identity = {
        "scale": cfg.scale.name,
        "task": _plain(cfg.task),
        "mechanism": _without_later_defaults("mechanism", _plain(cfg.mechanism)),
        "model": _without_later_defaults("model", _plain(cfg.model)),
        "train": _without_later_defaults("train", train),
        "trainer": {k: v for k, v in trainer.items() if k not in TRAINER_KEYS_NOT_IN_IDENTITY},
    }
    protocol = cfg.scale.get("protocol") or ""
    if protocol:
        identity["protocol"] = protocol
    return identity


def config_hash(identity: dict[str, Any]) -> str:
    blob = json.dumps(identity, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:10]


def _flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def difference(identity: dict[str, Any], preset: dict[str, Any]) -> str:
    """How ``identity`` differs from ``preset``, as overrides: ``model.depth=2, train.lr=0.001``."""
    a, b = _flatten(identity), _flatten(preset)
    keys = sorted(k for k in set(a) | set(b) if a.get(k, "<unset>") != b.get(k, "<unset>"))
    return ", ".join(
        f"{k}={json.dumps(a[k]) if not isinstance(a.get(k), (int, float, str)) else a[k]}" if k in a else f"~{k}"
        for k in keys
    )


def preset_identity(task: str, mechanism: str, scale: str, protocol: str = "") -> dict[str, Any]:
    """The identity of the scale's preset cell for (task, mechanism), under ``protocol``
    ("" = the scale's default protocol)."""
    return json.loads(_preset_identity_json(task, mechanism, scale, protocol))


@functools.lru_cache(maxsize=1024)
def _preset_identity_json(task: str, mechanism: str, scale: str, protocol: str = "") -> str:
    from harness.train.config import compose_isolated

    overrides = [
        f"task={task}",
        f"mechanism={mechanism}",
        f"scale={scale}",
        *([f"protocol={protocol}"] if protocol else []),
    ]
    identity = cell_identity(compose_isolated(overrides))
    return json.dumps(identity, default=str)


@dataclass
class Cell:
    """One grid cell, resolved: names, identity, variant and every path it owns."""

    results_dir: Path
    scale: str
    task: str
    mechanism: str
    seed: int
    identity: dict[str, Any]
    config_hash: str
    variant: str = ""
    variant_label: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def name(self) -> str:
        variant = f"[{self.variant}]" if self.variant else ""
        return f"{self.scale}/{self.task}/{self.mechanism}{variant}/seed{self.seed}"

    def _folder(self, kind: str) -> Path:
        folder = self.results_dir / kind / self.scale / self.task / self.mechanism
        return (folder / self.variant if self.variant else folder) / f"seed{self.seed}"

    @property
    def result_path(self) -> Path:
        return result_path(self.results_dir, self.scale, self.task, self.mechanism, self.seed, self.variant)

    @property
    def checkpoint_dir(self) -> Path:
        return self._folder("checkpoints")

    @property
    def log_dir(self) -> Path:
        return self._folder("logs")

    @property
    def lock_path(self) -> Path:
        return self.result_path.with_suffix(".lock")


def resolve_cell(cfg: DictConfig) -> Cell:
    """The cell a composed run config describes; names are checked before any path exists."""
    from harness.core.registry import get_mechanism, get_task

    get_task(cfg.task.name)  # unknown names fail here, listing the valid ones
    get_mechanism(cfg.mechanism.name)
    check_safe_name("scale.name", cfg.scale.name)
    check_safe_name("task.name", cfg.task.name)
    check_safe_name("mechanism.name", cfg.mechanism.name)
    identity = cell_identity(cfg)
    digest = config_hash(identity)
    preset = preset_identity(cfg.task.name, cfg.mechanism.name, cfg.scale.name)
    # A protocol other than the scale's default is a variant named by the protocol (its presets)
    # or by the hash (anything else), its label saying the protocol first.
    protocol = identity.get("protocol", "")
    other_protocol = protocol and protocol != preset.get("protocol", "")
    if other_protocol:
        check_safe_name("protocol", protocol)
        preset = preset_identity(cfg.task.name, cfg.mechanism.name, cfg.scale.name, protocol)
    if config_hash(preset) == digest:
        variant, label = (protocol, f"protocol={protocol}") if other_protocol else ("", "")
    else:
        variant = digest
        label = ", ".join(
            x for x in (f"protocol={protocol}" if other_protocol else "", difference(identity, preset)) if x
        )
    return Cell(
        results_dir=Path(cfg.results_dir),
        scale=cfg.scale.name,
        task=cfg.task.name,
        mechanism=cfg.mechanism.name,
        seed=int(cfg.seed),
        identity=identity,
        config_hash=digest,
        variant=variant,
        variant_label=label,
    )


def cell_lock(cell: Cell):
    """A lock file per cell (``filelock``: released by the kernel when its holder dies)."""
    from filelock import FileLock

    cell.lock_path.parent.mkdir(parents=True, exist_ok=True)
    return FileLock(str(cell.lock_path))
