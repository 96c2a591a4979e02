"""The typed schema of a run, registered in Hydra's ConfigStore, and ``compose``.

``harness/conf/config.yaml`` composes: this schema, ``task=`` (a registered task config),
``mechanism=`` (a registered mechanism config), ``protocol=`` (whose settings; ``none``
except at scale=lra, where it is ``lra`` or ``pytorch``), ``scale=`` (model size and training
budget), ``trainer=`` (hardware), ``task_scale/<task>_<scale>`` (the task's own settings at
that scale, registered with the task), and ``harness/conf/protocol/<protocol>/<task>.yaml`` (the task's
settings under that protocol, each value citing its source). Command-line overrides come last.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig

from harness.train.model import ModelConfig

CONF_DIR = Path(__file__).resolve().parents[1] / "conf"
RERUN = ("none", "failed", "all")


def conf_file(group: str, name: str) -> Path:
    """``harness/conf/<group>/<name>.yaml`` (a scale, a grid, ...); ValueError in one line
    ("unknown scale 'big'; valid: lra, small, tiny") when the group has no such file."""
    valid = sorted(p.stem for p in (CONF_DIR / group).glob("[!_]*.yaml"))
    if name not in valid:
        raise ValueError(f"unknown {group} '{name}'; valid: {', '.join(valid)}")
    return CONF_DIR / group / f"{name}.yaml"


def load_conf(group: str, name: str) -> dict[str, Any]:
    """The contents of ``conf_file(group, name)``, resolved, as plain Python values."""
    from omegaconf import OmegaConf

    return as_dict(OmegaConf.load(conf_file(group, name)))


def as_dict(node: Any) -> dict[str, Any]:
    """A config section (a ``DictConfig``, or a mapping already) as a plain ``dict[str, Any]``,
    interpolations resolved; an empty (``None``) section is ``{}``. TypeError when it is not a mapping."""
    from omegaconf import OmegaConf

    if node is None:
        return {}
    if isinstance(node, DictConfig):
        node = OmegaConf.to_container(node, resolve=True)
    if not isinstance(node, dict):
        raise TypeError(f"expected a mapping of settings, got {type(node).__name__}")
    return {str(k): v for k, v in node.items()}


def train_settings(section: DictConfig) -> TrainConfig:
    """The ``train`` section of a composed config as its typed ``TrainConfig`` object."""
    from omegaconf import OmegaConf

    train = OmegaConf.to_object(section)
    if not isinstance(train, TrainConfig):
        raise TypeError(f"train: expected the TrainConfig schema, got {type(train).__name__}")
    return train


@dataclass
class ProcessLauncherConf:
    """``hydra/launcher=process``, the grid's launcher (``harness.grid.launcher``): every cell in its own process."""

    _target_: str = "hydra_plugins.harness_launcher.process_launcher.ProcessLauncher"
    n_jobs: int = 1  # cells run side by side (each in its own process)


ConfigStore.instance().store(group="hydra/launcher", name="process", node=ProcessLauncherConf, provider="harness")
GRAD_CLIP_ALGORITHMS = ("norm", "value")
ON_LOCKED = ("skip", "wait")


@dataclass
class TrainConfig:
    """Optimisation budget; set by the scale, refined per task by its scale preset."""

    max_steps: int = 100
    batch_size: int = 32
    lr: float = 1e-3
    weight_decay: float = 0.01
    warmup_steps: int = 10
    schedule: str = "cosine"  # cosine | rsqrt | constant (after linear warm-up) | onecycle (torch OneCycleLR, linear)
    eval_every: int = 50  # validate every N training steps (and at the end)
    eval_batches: int = 0  # limit validation batches (0 = all)
    grad_clip: float = 1.0
    time_limit_s: float = 0.0  # stop a cell as "timeout" after this long (0 = none)
    # Warm start (a curriculum in length): the first warmup_length_steps training steps draw batches
    # (of warmup_batch_size; 0 = batch_size) from the task's training split at warmup_length tokens,
    # the rest at the task's own length. 0 = off. Needs a task with ``at_length`` (e.g. mqar).
    warmup_length: int = 0
    warmup_length_steps: int = 0
    warmup_batch_size: int = 0
    # -- the reference protocols' optimiser (harness/conf/protocol/, docs/protocols.md); the defaults are the
    # harness's own
    betas: list[float] = field(default_factory=lambda: [0.9, 0.98])  # Adam(W)'s (beta1, beta2)
    eps: float = 1e-8  # Adam(W)'s epsilon (LRA: 1e-9; the PyTorch re-implementations: 1e-6)
    weight_decay_all: bool = False  # decay every parameter, as Flax's Adam does (LRA); else not norms/biases/embeddings
    grad_clip_algorithm: str = "norm"  # norm (clip the global norm to grad_clip) | value (clip each element)
    # Self-pretraining (harness/train/pretrain.py): this many steps of masked denoising on the task's own
    # training inputs before fine-tuning (0 = off); pretrain_mask: the share of tokens masked.
    pretrain_steps: int = 0
    pretrain_mask: float = 0.15

    def __post_init__(self):
        if self.grad_clip_algorithm not in GRAD_CLIP_ALGORITHMS:
            raise ValueError(
                f"train.grad_clip_algorithm='{self.grad_clip_algorithm}'; valid: {', '.join(GRAD_CLIP_ALGORITHMS)}"
            )
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise ValueError(f"train.betas={list(self.betas)} must be two numbers in [0, 1)")
        if not self.eps > 0:
            raise ValueError(f"train.eps={self.eps} must be > 0")
        if self.pretrain_steps < 0 or not 0 < self.pretrain_mask < 1:
            raise ValueError(
                f"train.pretrain_steps={self.pretrain_steps} must be >= 0 and train.pretrain_mask="
                f"{self.pretrain_mask} in (0, 1)"
            )
        if self.warmup_length < 0 or self.warmup_length_steps < 0 or self.warmup_batch_size < 0:
            raise ValueError("train.warmup_length, train.warmup_length_steps and train.warmup_batch_size must be >= 0")
        if bool(self.warmup_length) != bool(self.warmup_length_steps):
            raise ValueError("a warm start needs both train.warmup_length and train.warmup_length_steps (or neither)")
        if self.warmup_length_steps >= self.max_steps > 0 and self.warmup_length:
            raise ValueError(
                f"train.warmup_length_steps={self.warmup_length_steps} leaves no step of "
                f"train.max_steps={self.max_steps} at the task's own length"
            )


@dataclass
class TrainerConfig:
    """Where and how Lightning runs (harness/conf/trainer/*.yaml)."""

    accelerator: str = "auto"
    devices: Any = "auto"
    strategy: str = "auto"
    precision: str = "32-true"  # bf16-mixed on GPUs
    num_workers: int = 0
    deterministic: bool = True
    progress_bar: bool = True  # per-step bars, only when the output is a terminal
    accumulate_grad_batches: int = 1
    # Any other Lightning Trainer argument passes through with the + prefix, e.g.
    # +trainer.benchmark=true (checked against lightning.Trainer's signature).


@dataclass
class LoggerConfig:
    """Where training curves go (harness/conf/logger/*.yaml): csv (default), tensorboard, wandb."""

    name: str = "csv"
    project: str = "longbench"  # wandb only


@dataclass
class ScaleConfig:
    name: str = "tiny"
    seeds: list[int] = field(default_factory=lambda: [0])
    # Whose settings a scale's presets follow (``protocol=``, harness/conf/protocol/<protocol>.yaml and
    # harness/conf/protocol/<protocol>/<task>.yaml): "" at scales without protocols; ``protocols`` lists
    # the ones a scale accepts (scale=lra: lra, pytorch).
    protocol: str = ""
    protocols: list[str] = field(default_factory=list)


@dataclass
class RunConfig:
    task: Any = MISSING
    mechanism: Any = MISSING
    scale: ScaleConfig = field(default_factory=ScaleConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    seed: int = 0
    results_dir: str = "results"
    cache_dir: str = "${oc.env:HARNESS_CACHE_DIR,.cache/data}"
    rerun: str = "none"  # none: skip recorded cells | failed: retry failed ones | all
    on_locked: str = "skip"  # a cell running in another process: skip it | wait for it
    keep_checkpoints: bool = False


ConfigStore.instance().store(name="run_schema", node=RunConfig)


def compose(overrides: list[str] | None = None, *, config_name: str = "config") -> DictConfig:
    """Compose the run config as ``python -m harness run`` would (for tests and tools)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    from harness.core.registry import discover

    discover()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
        return hydra_compose(config_name=config_name, overrides=list(overrides or []))


def compose_isolated(overrides: list[str] | None = None) -> DictConfig:
    """``compose`` that also works inside a running Hydra app (a cell computing its
    presets, a launcher computing a cell's identity): Hydra's global state is saved and
    restored around it."""
    from hydra.core.global_hydra import GlobalHydra
    from hydra.initialize import get_gh_backup, restore_gh_from_backup

    backup = get_gh_backup()
    GlobalHydra.instance().clear()
    try:
        return compose(overrides)
    finally:
        restore_gh_from_backup(backup)


def protocol_preset(protocol: str, task: str) -> Path:
    """The file holding ``task``'s settings under ``protocol`` (it may not exist)."""
    return CONF_DIR / "protocol" / protocol / f"{task}.yaml"


def check_protocol(cfg: DictConfig) -> None:
    """``protocol=`` is one the scale accepts, and a protocol other than ``lra`` (the harness's
    own presets for tasks LRA does not have) has a preset for the task: one line otherwise."""
    scale = cfg.scale
    protocol, accepted = scale.get("protocol") or "", list(scale.get("protocols") or [])
    if not accepted:
        if protocol:
            raise ValueError(
                f"protocol={protocol} is a setting of scale=lra; scale={scale.name} has no protocols "
                "(drop protocol=, or add scale=lra)"
            )
        return
    if protocol not in accepted:
        raise ValueError(f"protocol={protocol or 'none'} at scale={scale.name}; valid: {', '.join(accepted)}")
    task = cfg.task.name
    if protocol != "lra" and not protocol_preset(protocol, task).exists():
        have = sorted(p.stem for p in (CONF_DIR / "protocol" / protocol).glob("[!_]*.yaml"))
        raise ValueError(
            f"protocol={protocol} has no preset for task '{task}' (it covers {', '.join(have)}); "
            "use protocol=lra for it"
        )
