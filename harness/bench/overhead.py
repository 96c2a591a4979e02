"""The harness's own overhead: ``python -m harness speed overhead [k=v ...]``.

Two ratios, written to ``<results_dir>/speed/overhead.json`` and shown in the leaderboard:

1. **Lightning vs a bare loop** (target: the harness keeps ≥ 90% of the bare loop's
   throughput). The same task data (the cached ``task`` at ``scale``), the same model
   (same seed), the same AdamW + schedule (``TaskModule.configure_optimizers``), gradient
   clipping, precision and determinism setting; one training epoch (or ``max_steps``)
   either through ``harness.train.training.TaskModule`` + ``lightning.Trainer`` as
   ``harness.train.run`` configures it (its ``CellMeter`` callback, per-step logging, the
   progress bar; no validation or checkpoints) or through a hand-written PyTorch loop
   (forward, loss, backward, clip, step, schedule). Throughput = padded tokens of the
   batches after the first ``skip`` / wall time from the end of batch ``skip - 1`` to the
   end of the last batch: data loading, hooks and logging included in both. Paths
   alternate A B B A ... over ``rounds`` rounds; the ratio is the median over adjacent
   (A, B) pairs, so a drift in the load of a shared machine cancels within each pair.
2. **Softmax through the mechanism contract vs a bare SDPA call** (target: within 5%):
   ``create_mechanism("softmax")(q, k, v)`` (forward pre-hook capability check, mask
   building, module call) vs ``F.scaled_dot_product_attention(q, k, v)`` on the same
   (B, H, L, D) tensors at the scale's training batch, timed with
   ``torch.utils.benchmark.Timer.blocked_autorange``, alternating, median of the paired ratios.
"""

from __future__ import annotations

import dataclasses
import logging
import statistics
import sys
import time
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger("harness.bench.overhead")

LIGHTNING_TARGET = 0.90  # harness throughput / bare-loop throughput, at least
CONTRACT_TARGET = 1.05  # contract time / bare SDPA time, at most


@dataclass
class OverheadConfig:
    """``python -m harness speed overhead`` settings."""

    results_dir: str = "results"  # writes <results_dir>/speed/overhead.json
    task: str = "listops"  # the cached task whose data both paths train on
    scale: str = "auto"  # auto = lra on CUDA, else small
    mechanism: str = "softmax"  # the model's attention in both paths
    rounds: int = 2  # A B B A per two rounds
    max_steps: int = 0  # 0 = one full training epoch
    skip: int = 5  # warm-up batches left out of the throughput
    progress_bar: bool = True  # the Lightning path as harness.train.run runs it (False: without its progress bar)
    contract_lengths: list[int] = field(default_factory=lambda: [128, 512, 1024])
    contract_batch_size: int = 0  # 0 = the scale's train.batch_size
    contract_min_run_time: float = 0.5  # seconds per blocked_autorange
    device: str = "auto"
    threads: int = 0  # 0 = torch's default
    cache_dir: str = ""  # "" = the run config's cache_dir


# ----------------------------------------------------------------------------- Lightning vs bare loop


class _EpochClock:
    """Tokens and wall time from the end of batch ``skip - 1`` to the end of the last batch."""

    def __init__(self, skip: int, device_type: str):
        self.skip, self.device_type = skip, device_type
        self.tokens = 0
        self.start: float | None = None
        self.end: float | None = None

    def batch_end(self, index: int, batch: dict[str, Any]) -> None:
        if self.device_type == "cuda":
            import torch

            torch.cuda.synchronize()
        now = time.perf_counter()
        if index == self.skip - 1 or (self.skip == 0 and self.start is None):
            self.start = now
        if index >= self.skip:
            self.tokens += sum(v.numel() for k, v in batch.items() if k.startswith("input_ids"))
            self.end = now

    @property
    def tokens_per_s(self) -> float:
        if self.start is None or self.end is None or self.end <= self.start:
            raise RuntimeError(f"too few batches to time after skip={self.skip}")
        return self.tokens / (self.end - self.start)


def _cell_config(cfg: OverheadConfig, scale: str):
    from harness.train.config import compose

    overrides = [f"task={cfg.task}", f"mechanism={cfg.mechanism}", f"scale={scale}"]
    if cfg.cache_dir:
        overrides.append(f"cache_dir={cfg.cache_dir}")
    return compose(overrides)


def _build(cell, seed: int):
    """(task, data module, TaskModule) for one path, from the same seed."""
    import lightning as L

    from harness.core.registry import create_task
    from harness.train.build import build_model
    from harness.train.config import as_dict, train_settings
    from harness.train.model import ModelConfig
    from harness.train.training import TaskDataModule, TaskModule

    task_cfg = {k: v for k, v in as_dict(cell.task).items() if k != "name"}
    mech_cfg = {k: v for k, v in as_dict(cell.mechanism).items() if k != "name"}
    task = create_task(cell.task.name, scale=cell.scale.name, **task_cfg)
    dsd, _ = task.load(cell.cache_dir)
    L.seed_everything(seed, workers=True, verbose=False)
    model = build_model(task, ModelConfig(**as_dict(cell.model)), cell.mechanism.name, mech_cfg)
    train = train_settings(cell.train)
    module = TaskModule(model, train)
    data = TaskDataModule(dsd, batch_size=train.batch_size, seed=seed, num_workers=cell.trainer.num_workers)
    return module, data, train


def lightning_epoch(cell, cfg: OverheadConfig, steps: int, device_type: str) -> float:
    """Tokens/s of one epoch through TaskModule + Trainer, configured as harness.train.run does."""
    import lightning as L
    from lightning.pytorch.callbacks import TQDMProgressBar

    from harness.train.training import CellMeter

    module, data, train = _build(cell, seed=0)
    clock = _EpochClock(cfg.skip, device_type)

    class Clock(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            clock.batch_end(batch_idx, batch)

    callbacks = [CellMeter(time_limit_s=train.time_limit_s), Clock()]
    if cfg.progress_bar:
        callbacks.append(TQDMProgressBar(refresh_rate=max(1, train.eval_every // 5)))
    trainer = L.Trainer(
        accelerator="cuda" if device_type == "cuda" else "cpu",
        devices=1,
        precision=cell.trainer.precision,
        max_epochs=1,
        max_steps=steps,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        gradient_clip_val=train.grad_clip or None,
        deterministic="warn" if cell.trainer.deterministic else False,
        callbacks=callbacks,
        enable_progress_bar=cfg.progress_bar,
        logger=False,
        enable_checkpointing=False,
        enable_model_summary=False,
    )
    trainer.fit(module, datamodule=data)
    return clock.tokens_per_s


def bare_epoch(cell, cfg: OverheadConfig, steps: int, device_type: str) -> float:
    """Tokens/s of the same epoch in a hand-written PyTorch loop."""
    import torch

    module, data, train = _build(cell, seed=0)
    device = torch.device(device_type)
    model = module.model.to(device).train()
    optimizers = module.configure_optimizers()
    optimizer, scheduler = optimizers["optimizer"], optimizers["lr_scheduler"]["scheduler"]
    autocast = {"bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}.get(str(cell.trainer.precision))
    torch.use_deterministic_algorithms(bool(cell.trainer.deterministic), warn_only=True)  # as Lightning sets it
    clock = _EpochClock(cfg.skip, device_type)
    loader = data.train_dataloader()
    for index, batch in enumerate(loader):
        if index >= steps:
            break
        batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
        with torch.autocast(device.type, dtype=autocast, enabled=autocast is not None):
            logits = model(batch, step=index)
            loss, _ = model.loss(logits, batch)
            aux = model.encoder.aux_loss()
            if aux is not None:
                loss = loss + aux
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if train.grad_clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), train.grad_clip)
        optimizer.step()
        scheduler.step()
        clock.batch_end(index, batch)
    return clock.tokens_per_s


def lightning_vs_bare(cfg: OverheadConfig, scale: str, device_type: str) -> dict[str, Any]:
    import torch

    cell = _cell_config(cfg, scale)
    module, data, train = _build(cell, seed=0)
    epoch = len(data.train_dataloader())
    steps = min(epoch, cfg.max_steps) if cfg.max_steps else epoch
    if steps <= cfg.skip + 1:
        raise ValueError(f"overhead: {steps} steps leave nothing to time after skip={cfg.skip}; raise max_steps")
    deterministic_before = torch.are_deterministic_algorithms_enabled()
    order = ["lightning", "bare", "bare", "lightning"] * ((cfg.rounds + 1) // 2)
    order = order[: 2 * cfg.rounds]
    throughput: dict[str, list[float]] = {"lightning": [], "bare": []}
    sequence = []
    try:
        for path in order:
            run = lightning_epoch if path == "lightning" else bare_epoch
            throughput[path].append(run(cell, cfg, steps, device_type))
            sequence.append((path, throughput[path][-1]))
            log.info("overhead: %s epoch %.0f tokens/s", path, throughput[path][-1])
    finally:
        torch.use_deterministic_algorithms(deterministic_before)
    ratio = median_paired_ratio(sequence, "lightning", "bare")
    return {
        "task": cfg.task,
        "scale": scale,
        "mechanism": cfg.mechanism,
        "steps": steps,
        "skip": cfg.skip,
        "batch_size": train.batch_size,
        "precision": str(cell.trainer.precision),
        "deterministic": bool(cell.trainer.deterministic),
        "progress_bar": cfg.progress_bar,
        "lightning_tokens_per_s": throughput["lightning"],
        "bare_tokens_per_s": throughput["bare"],
        "ratio": ratio,
        "target": LIGHTNING_TARGET,
        "meets_target": ratio >= LIGHTNING_TARGET,
        "method": "median over adjacent pairs of alternating rounds (A B | B A | ...) of Lightning tokens/s / bare "
        "tokens/s (pairs cancel slow drifts in machine load); tokens/s = padded tokens of batches after "
        "`skip` / wall time from the end of batch skip-1 to the end of the last batch",
    }


def median_paired_ratio(sequence: list[tuple[str, float]], numerator: str, denominator: str) -> float:
    """Median of numerator/denominator over adjacent pairs of an alternating sequence
    [(name, value), ...] (A B B A ...: every pair holds one of each)."""
    ratios = []
    for (name_a, a), (name_b, b) in zip(sequence[0::2], sequence[1::2]):
        values = {name_a: a, name_b: b}
        ratios.append(values[numerator] / values[denominator])
    return statistics.median(ratios)


# ----------------------------------------------------------------------------- contract vs bare SDPA


def contract_vs_sdpa(
    cfg: OverheadConfig, *, batch_size: int, heads: int, dim_head: int, device_type: str
) -> list[dict]:
    import torch
    import torch.nn.functional as F
    from torch.utils.benchmark import Timer

    from harness.core.registry import create_mechanism

    rows = []
    for length in cfg.contract_lengths:
        for causal in (False, True):
            torch.manual_seed(0)
            q, k, v = (torch.randn(batch_size, heads, length, dim_head, device=device_type) for _ in range(3))
            mech = create_mechanism("softmax", heads=heads, dim_head=dim_head, max_len=length).to(device_type).eval()
            with torch.no_grad():
                torch.testing.assert_close(
                    mech(q, k, v, causal=causal), F.scaled_dot_product_attention(q, k, v, is_causal=causal)
                )
            timers = {
                "contract": Timer(
                    "mech(q, k, v, causal=causal)",
                    globals={"mech": mech, "q": q, "k": k, "v": v, "causal": causal},
                    num_threads=torch.get_num_threads(),
                ),
                "sdpa": Timer(
                    "F.scaled_dot_product_attention(q, k, v, is_causal=causal)",
                    globals={"F": F, "q": q, "k": k, "v": v, "causal": causal},
                    num_threads=torch.get_num_threads(),
                ),
            }
            medians: dict[str, list[float]] = {"contract": [], "sdpa": []}
            sequence = []
            with torch.no_grad():
                for name in ["contract", "sdpa", "sdpa", "contract"] * max(1, (cfg.rounds + 1) // 2):
                    medians[name].append(timers[name].blocked_autorange(min_run_time=cfg.contract_min_run_time).median)
                    sequence.append((name, medians[name][-1]))
            contract, sdpa = statistics.median(medians["contract"]), statistics.median(medians["sdpa"])
            ratio = median_paired_ratio(sequence, "contract", "sdpa")
            rows.append(
                {
                    "length": length,
                    "causal": causal,
                    "batch_size": batch_size,
                    "heads": heads,
                    "dim_head": dim_head,
                    "contract_s": contract,
                    "sdpa_s": sdpa,
                    "ratio": ratio,
                    "overhead_us": 1e6 * (contract - sdpa),
                    "meets_target": ratio <= CONTRACT_TARGET,
                }
            )
            log.info(
                "overhead: softmax contract vs SDPA, L=%d %s: %.3f ms vs %.3f ms (paired ratio %.3f)",
                length,
                "causal" if causal else "non-causal",
                1e3 * contract,
                1e3 * sdpa,
                ratio,
            )
    return rows


# ----------------------------------------------------------------------------- entry points


def run_overhead(cfg: OverheadConfig | None = None, **overrides: Any) -> dict[str, Any]:
    """Measure both ratios and write ``<results_dir>/speed/overhead.json``; returns the record."""
    import torch

    from harness.core.registry import discover

    cfg = dataclasses.replace(cfg or OverheadConfig(), **overrides)
    discover()
    threads_before = torch.get_num_threads()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    try:
        return _measure_and_write(cfg)
    finally:
        torch.set_num_threads(threads_before)


def _measure_and_write(cfg: OverheadConfig) -> dict[str, Any]:
    import torch

    from harness.bench.speed import hardware, records_dir, scale_settings
    from harness.core.results import environment, write_json_atomic

    device = ("cuda" if torch.cuda.is_available() else "cpu") if cfg.device == "auto" else cfg.device
    scale = ("lra" if device == "cuda" else "small") if cfg.scale == "auto" else cfg.scale
    started = time.perf_counter()
    training = lightning_vs_bare(cfg, scale, device)
    settings = scale_settings(scale)
    model = settings.get("model", {})
    heads = int(model.get("heads", 4))
    contract = contract_vs_sdpa(
        cfg,
        batch_size=cfg.contract_batch_size or int(settings.get("train", {}).get("batch_size", 32)),
        heads=heads,
        dim_head=int(model.get("dim", 64)) // heads,
        device_type=device,
    )
    record = {
        "kind": "overhead",
        "training": training,
        "contract": contract,
        "contract_target": CONTRACT_TARGET,
        "threads": torch.get_num_threads(),
        "env": {**environment(), "hardware": hardware(device)},
        "wall_s": round(time.perf_counter() - started, 1),
        "config": dataclasses.asdict(cfg),
    }
    path = write_json_atomic(records_dir(cfg) / "overhead.json", record)
    log.info(
        "overhead: Lightning/bare throughput %.3f (target >= %.2f); contract/SDPA %s -> %s",
        training["ratio"],
        LIGHTNING_TARGET,
        ", ".join(f"{r['ratio']:.3f}" for r in contract),
        path,
    )
    return record


def after_sweep(speed_cfg: Any) -> None:
    """The overhead after a speed sweep asked for it (``overhead=true``): measured into the sweep's
    folder unless it is recorded there already (``rerun=all`` measures it anew)."""
    from harness.bench.speed import records_dir

    path = records_dir(speed_cfg) / "overhead.json"
    if path.exists() and speed_cfg.rerun != "all":
        log.info("overhead: recorded in %s (rerun=all to redo)", path)
        return
    log.info("overhead: measuring the harness's own overhead (overhead=true)")
    run_overhead(results_dir=speed_cfg.results_dir, device=speed_cfg.device, threads=speed_cfg.threads)


def parse_config(argv: list[str]) -> OverheadConfig:
    """``k=v`` arguments (the one grammar, ``harness.core.overrides``) -> a checked OverheadConfig."""
    from harness.bench.speed import REFUSED, check_scale
    from harness.core.overrides import parse
    from harness.core.registry import discover, get_mechanism, get_task

    cfg = parse(OverheadConfig, argv, command="speed overhead", refused=REFUSED)
    check_scale(cfg.scale)
    discover()
    get_mechanism(cfg.mechanism)  # UnknownNameError: one line with the registered names
    get_task(cfg.task)
    return cfg


def main(argv: list[str] | None = None) -> int:
    from harness.bench.speed import records_dir

    cfg = parse_config(sys.argv[1:] if argv is None else list(argv))
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)  # its set-up banner, once per epoch
    run_overhead(cfg)
    print(records_dir(cfg) / "overhead.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
