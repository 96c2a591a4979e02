"""Lightning pieces: the module (loss + mechanism aux losses, metrics), the data module
over the cached ``datasets`` splits, and the callbacks that measure a cell.

Metrics are accumulated as sums (``correct``, ``count``, ``nll``) over a whole split, so
``accuracy`` and ``bits_per_token`` are exact, not means of batch means.
"""

from __future__ import annotations

import itertools
import math
import time
from collections.abc import Callable
from typing import Any

import lightning as L
import torch
from torch.utils.data import DataLoader

from harness.data.task import collate
from harness.train.config import TrainConfig
from harness.train.model import Head


class NonFiniteLoss(FloatingPointError):
    """Training produced a NaN/inf loss."""

    status = "nan"  # harness.core.results.status_of


class CellTimeout(TimeoutError):
    """The cell ran past train.time_limit_s."""

    status = "timeout"  # harness.core.results.status_of


def lr_lambda(schedule: str, warmup: int, total: int):
    """Multiplier of the base lr at a step: linear warm-up, then cosine/rsqrt/constant."""
    warmup = max(1, warmup)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        if schedule == "cosine":
            progress = min(1.0, (step - warmup) / max(1, total - warmup))
            return 0.5 * (1 + math.cos(math.pi * progress))
        if schedule == "rsqrt":
            return math.sqrt(warmup / (step + 1))
        if schedule == "constant":
            return 1.0
        raise ValueError(f"train.schedule='{schedule}'; valid: cosine, rsqrt, constant, onecycle")

    return factor


def one_cycle(optimizer, lr: float, warmup: int, total: int):
    """``schedule=onecycle``: torch's OneCycleLR as the PyTorch LRA re-implementations build it
    (Nyströmformer's run_tasks.py, Skyformer's main.py): linear up from lr/25 over ``warmup``
    steps, linear down to lr/25e4 at ``total``, beta1 cycled 0.95 <-> 0.85 (its defaults)."""
    if not (warmup >= 2 and total - warmup >= 2):  # a phase of one step: OneCycleLR divides by zero
        raise ValueError(
            f"train.schedule=onecycle needs train.warmup_steps={warmup} >= 2 and at least 2 steps after it "
            f"(train.max_steps={total})"
        )
    return torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=lr, total_steps=total, pct_start=warmup / total, anneal_strategy="linear"
    )


class TaskModule(L.LightningModule):
    """Trains a task head; logs ``<split>/accuracy`` (and ``bits_per_token`` for LMs)."""

    def __init__(self, model: Head, train_cfg: TrainConfig):
        super().__init__()
        self.model = model
        self.train_cfg = train_cfg
        self._sums: dict[str, dict[str, float]] = {}
        self.final_metrics: dict[str, dict[str, float]] = {}
        self._items: dict[str, dict[str, list[int]]] = {}
        self.final_items: dict[str, dict[str, list[int]]] = {}  # split -> {"correct": [...], "count": [...]}
        self.evaluated: dict[str, int] = {}  # examples each split's last evaluation actually saw
        self.val_curve: list[list[float]] = []  # [step, accuracy or bits/token] of each validation while fitting

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        logits = self.model(batch, step=self.global_step)
        loss, stats = self.model.loss(logits, batch)
        aux = self.model.encoder.aux_loss()
        total = loss if aux is None else loss + aux
        if not torch.isfinite(total):
            raise NonFiniteLoss(f"non-finite training loss {total.item()} at step {self.global_step}")
        self.log("train/loss", loss, prog_bar=True)
        if aux is not None:
            self.log("train/aux_loss", aux)
        self.log("train/accuracy", stats["correct"].float() / stats["count"].clamp_min(1), prog_bar=True)
        return total

    # -- evaluation: exact sums over the split --------------------------------------------
    def _eval_step(self, split: str, batch: dict[str, torch.Tensor]) -> None:
        logits = self.model(batch, step=self.global_step)
        _, stats = self.model.loss(logits, batch)
        sums = self._sums.setdefault(split, {})
        items = self._items.setdefault(split, {})
        first = next((v for v in batch.values() if isinstance(v, torch.Tensor)), None)
        sums["examples"] = sums.get("examples", 0.0) + float(first.shape[0] if first is not None else 0)
        for key, value in stats.items():
            if key.startswith("item_"):  # per test item, in split order (the paired tests of the report)
                items.setdefault(key[5:], []).extend(int(v) for v in value.tolist())
            else:
                sums[key] = sums.get(key, 0.0) + float(value)
        for mech in self.model.encoder.mechanisms:
            for key, number in mech.metrics().items():
                sums[f"mech/{key}"] = sums.get(f"mech/{key}", 0.0) + float(number)
        sums["batches"] = sums.get("batches", 0.0) + 1.0

    def _eval_end(self, split: str) -> None:
        sums = self._sums.pop(split, {})
        items = self._items.pop(split, {})
        if not sums:
            return
        if items and self.trainer.world_size == 1:  # under DDP each rank sees a shard: not recorded
            self.final_items[split] = items
        if self.trainer.world_size > 1:  # exact metrics under DDP: add up every rank's sums
            keys = sorted(sums)
            total = self.trainer.strategy.reduce(
                torch.tensor([sums[k] for k in keys], device=self.device), reduce_op="sum"
            )
            sums = dict(zip(keys, total.tolist()))
        self.evaluated[split] = int(sums.pop("examples", 0.0))
        count = max(sums["count"], 1.0)
        metrics = {"accuracy": sums["correct"] / count, "loss": sums["nll"] / count}
        if not math.isfinite(metrics["loss"]):
            name = {"val": "validation"}.get(split, split)
            raise NonFiniteLoss(f"non-finite {name} loss {metrics['loss']} at step {self.global_step}")
        if self.model.causal:
            metrics["bits_per_token"] = sums["nll"] / count / math.log(2)
        layers = len(self.model.encoder.mechanisms) * sums["batches"]
        metrics.update({k[5:]: v / layers for k, v in sums.items() if k.startswith("mech/")})
        for key, value in metrics.items():
            self.log(f"{split}/{key}", value, prog_bar=key == "accuracy", sync_dist=False)
        if split == "val" and self.trainer.state.fn == "fit":
            primary = metrics["bits_per_token"] if self.model.causal else metrics["accuracy"]
            self.val_curve.append([int(self.global_step), round(float(primary), 6)])
            # the step itself, logged: the CSV's own "step" column is the logger's count (one less)
            self.log("val/at_step", float(self.global_step), sync_dist=False)
        self.final_metrics[split] = metrics

    def validation_step(self, batch, batch_idx):
        self._eval_step("val", batch)

    def on_validation_epoch_end(self):
        self._eval_end("val")

    def test_step(self, batch, batch_idx):
        self._eval_step("test", batch)

    def on_test_epoch_end(self):
        self._eval_end("test")

    def configure_optimizers(self):
        cfg = self.train_cfg
        decay, no_decay = [], []
        for name, p in self.named_parameters():
            if p.requires_grad:
                exempt = not cfg.weight_decay_all and (p.ndim < 2 or "embed" in name or "norm" in name)
                (no_decay if exempt else decay).append(p)
        optimizer = torch.optim.AdamW(
            [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=cfg.lr,
            betas=tuple(cfg.betas),
            eps=cfg.eps,
        )
        if cfg.schedule == "onecycle":
            scheduler = one_cycle(optimizer, cfg.lr, cfg.warmup_steps, cfg.max_steps)
        else:
            scheduler = torch.optim.lr_scheduler.LambdaLR(
                optimizer, lr_lambda(cfg.schedule, cfg.warmup_steps, cfg.max_steps)
            )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


class TaskDataModule(L.LightningDataModule):
    """Batches of a prepared DatasetDict, padded per batch (``harness.data.task.collate``)."""

    def __init__(
        self,
        dataset_dict,
        *,
        batch_size: int,
        seed: int,
        num_workers: int = 0,
        eval_batch_size: int | None = None,
        warmup: tuple[Any, int, int] | None = None,
    ):
        """``warmup``: (a train split at a shorter length, steps, batch size): the warm start's
        first batches, before any of ``dataset_dict["train"]`` (see ``ResumableBatches``)."""
        super().__init__()
        self.dsd = dataset_dict
        self.warmup = warmup
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size or batch_size
        self.seed = seed
        self.num_workers = num_workers

    def train_dataloader(self):
        """Seeded batches that know where they are (``ResumableBatches``): every iterator starts at
        the batch the trainer's step says comes next, so a killed and resumed cell trains on the
        batches the uninterrupted one would have. (A shuffling DataLoader restarted a resumed
        epoch from its first batch in another order.)"""
        from torch.utils.data import ConcatDataset

        short, steps, short_batch = self.warmup or ([], 0, 1)
        trainer = getattr(self, "trainer", None)
        done = (lambda: trainer.global_step * trainer.accumulate_grad_batches) if trainer is not None else None
        rank, world = (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)
        sampler = ResumableBatches(
            len(short),
            len(self.dsd["train"]),
            steps=steps,
            short_batch=short_batch,
            batch=self.batch_size,
            seed=self.seed,
            batches_done=done,
            rank=rank,
            world=world,
        )
        if self.warmup:
            self.warm_sampler = sampler
        dataset = ConcatDataset([short, self.dsd["train"]]) if self.warmup else self.dsd["train"]
        return DataLoader(
            dataset,
            batch_sampler=sampler,
            collate_fn=collate,
            generator=self._generator(),
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
        )

    def _generator(self) -> torch.Generator:
        """A loader's own generator: an iterator draws its workers' base seed from it, not from
        torch's global generator (whose state would then depend on how many iterators a run made)."""
        return torch.Generator().manual_seed(self.seed)

    def _eval_loader(self, split: str) -> DataLoader:
        return DataLoader(
            self.dsd[split],
            batch_size=self.eval_batch_size,
            shuffle=False,
            collate_fn=collate,
            generator=self._generator(),
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
        )

    def val_dataloader(self):
        return self._eval_loader("validation")

    def test_dataloader(self):
        return self._eval_loader("test")


class ResumableBatches(torch.utils.data.Sampler):
    """Batches of indices into ``ConcatDataset([short, long])``: in the first epoch, ``steps``
    shuffled batches of ``short_batch`` short examples (cycling through them: the warm start),
    then the long split shuffled in batches of ``batch``; later epochs are the long split alone,
    each in its own order. Without a warm start (``n_short = steps = 0``): shuffled batches of the
    train split. Each epoch's order comes from (seed, epoch) alone, and each iterator starts where
    ``batches_done()`` (the trainer's step) says the run stands: a resumed cell continues at the
    batch the uninterrupted one trains next. (Lightning does not call ``set_epoch`` on a batch
    sampler, and restarts a resumed epoch's iterator from its start: neither can be relied on.)
    Without ``batches_done`` the sampler counts the batches it has yielded. Under DDP (``world``
    processes; the trainer runs with ``use_distributed_sampler=False``) rank r takes batches r,
    r + world, ... of each epoch, the same number on every rank (a remainder is dropped)."""

    def __init__(
        self,
        n_short: int,
        n_long: int,
        *,
        steps: int,
        short_batch: int,
        batch: int,
        seed: int,
        batches_done=None,
        rank: int = 0,
        world: int = 1,
    ):
        self.n_short, self.n_long, self.steps = n_short, n_long, steps
        self.short_batch, self.batch, self.seed = short_batch, batch, seed
        self.batches_done = batches_done
        self.rank, self.world = rank, world
        self.yielded = 0  # batches this sampler has yielded (its own count without ``batches_done``)
        self.short_drawn = 0  # warm-up batches this process has yielded

    def position(self, batches_done: int) -> tuple[int, int]:
        """(epoch, batch within it) after ``batches_done`` batches."""
        epoch, left = 0, batches_done
        while True:
            length = self.epoch_length(epoch)
            if left < length or length == 0:
                return epoch, left
            left -= length
            epoch += 1

    def _long_batches(self) -> int:
        return math.ceil(self.n_long / self.batch)

    def epoch_length(self, epoch: int) -> int:
        """This rank's batches in ``epoch``."""
        return ((self.steps if epoch == 0 else 0) + self._long_batches()) // self.world

    def __len__(self) -> int:
        """Batches of the epoch the next iterator serves."""
        return self.epoch_length(self.position(self._done())[0])

    def _done(self) -> int:
        return self.batches_done() if self.batches_done is not None else self.yielded

    def __iter__(self):
        epoch, skip = self.position(self._done())
        mine = itertools.islice(self._batches(epoch), self.rank, self.world * self.epoch_length(epoch), self.world)
        for i, batch in enumerate(mine):
            if i >= skip:
                self.short_drawn += int(epoch == 0 and i < self.steps)
                self.yielded += 1
                yield batch

    def _batches(self, epoch: int):
        g = torch.Generator().manual_seed(self.seed * 1000003 + epoch)
        if epoch == 0 and self.steps:
            need = self.steps * self.short_batch
            order = torch.cat(
                [torch.randperm(self.n_short, generator=g) for _ in range(math.ceil(need / self.n_short))]
            )
            for i in range(self.steps):
                yield order[i * self.short_batch : (i + 1) * self.short_batch].tolist()
        order = torch.randperm(self.n_long, generator=g) + self.n_short
        for i in range(self._long_batches()):
            yield order[i * self.batch : (i + 1) * self.batch].tolist()


class RandomStates(L.Callback):
    """The random generators' states (torch, CUDA, numpy, Python) saved in every checkpoint and
    restored on resume, so dropout and every other draw after a resume is the one the
    uninterrupted run makes. Plain lists and tensors: the checkpoint still loads with
    ``weights_only``."""

    def state_dict(self) -> dict[str, Any]:
        import random

        import numpy as np

        state = np.random.get_state(legacy=True)
        if isinstance(state, dict):  # only for a bit generator other than numpy's global MT19937
            raise TypeError(f"numpy's global random state is not MT19937: {state.get('bit_generator')}")
        name, keys, pos, has_gauss, cached = state
        version, python_state, gauss_next = random.getstate()
        return {
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "numpy": [name, keys.tolist(), int(pos), int(has_gauss), float(cached)],
            "python": [version, list(python_state), gauss_next],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        import random

        import numpy as np

        torch.set_rng_state(state["torch"])
        if state["cuda"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda"])
        name, keys, pos, has_gauss, cached = state["numpy"]
        np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
        version, python_state, gauss_next = state["python"]
        random.setstate((version, tuple(python_state), gauss_next))


class CellMeter(L.Callback):
    """Measures training throughput (tokens/s, padded tokens as the model sees them,
    after the first ``skip`` steps) and enforces the cell's time limit, also in the middle
    of a batch (a SIGALRM timer in the main thread interrupts a hanging forward).

    Its state (tokens, train time, elapsed wall time) is saved in checkpoints, so a resumed
    cell's throughput and wall time cover the whole cell; ``resumed_from_step`` is the step
    a resumed run started from (None for a fresh one)."""

    def __init__(self, time_limit_s: float = 0.0, skip: int = 2):
        self.time_limit_s = time_limit_s
        self.skip = skip
        self.tokens = 0
        self.train_time = 0.0
        self.steps = 0
        self.elapsed_before = 0.0  # wall time of earlier (killed) runs of this cell
        self.resumed_from_step: int | None = None
        self._t0 = 0.0
        self._start = time.perf_counter()
        self._alarm = False
        self._fit_done = False

    def on_fit_end(self, trainer, pl_module) -> None:
        self._fit_done = True

    # -- state saved in checkpoints -------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {
            "tokens": self.tokens,
            "train_time": self.train_time,
            "steps": self.steps,
            "elapsed": self.elapsed_before + (time.perf_counter() - self._start),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self._fit_done:  # testing a checkpoint after fit restores callbacks too: keep this run's numbers
            return
        self.tokens = int(state.get("tokens", 0))
        self.train_time = float(state.get("train_time", 0.0))
        self.steps = int(state.get("steps", 0))
        self.elapsed_before = float(state.get("elapsed", 0.0))
        self.resumed_from_step = -1  # set to the real step in on_train_start

    @property
    def wall_s(self) -> float:
        return self.elapsed_before + (time.perf_counter() - self._start)

    # -- time limit -----------------------------------------------------------------------
    def _on_alarm(self, signum, frame):
        raise CellTimeout(f"cell exceeded train.time_limit_s={self.time_limit_s:g}s")

    def start_timer(self) -> None:
        """Arm the time limit (main thread only); the cell's whole run counts."""
        import signal
        import threading

        if not self.time_limit_s or threading.current_thread() is not threading.main_thread():
            return
        remaining = max(0.01, self.time_limit_s - (time.perf_counter() - self._start))
        signal.signal(signal.SIGALRM, self._on_alarm)
        signal.setitimer(signal.ITIMER_REAL, remaining)
        self._alarm = True

    def stop_timer(self) -> None:
        import signal

        if self._alarm:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, signal.SIG_DFL)
            self._alarm = False

    def on_fit_start(self, trainer, pl_module) -> None:
        self.start_timer()

    def _note_resume(self, trainer) -> None:
        if self.resumed_from_step == -1:  # state was loaded from a checkpoint: training goes on from here
            self.resumed_from_step = int(trainer.global_step)

    def on_train_start(self, trainer, pl_module) -> None:
        self._note_resume(trainer)

    # -- throughput -----------------------------------------------------------------------
    @staticmethod
    def _sync(module: L.LightningModule) -> None:
        if module.device.type == "cuda":
            torch.cuda.synchronize(module.device)

    def on_train_batch_start(self, trainer, pl_module, batch: dict[str, Any], batch_idx: int) -> None:
        if self.time_limit_s and time.perf_counter() - self._start > self.time_limit_s:
            raise CellTimeout(f"cell exceeded train.time_limit_s={self.time_limit_s:g}s at step {trainer.global_step}")
        self._note_resume(trainer)
        self._sync(pl_module)
        self._t0 = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch: dict[str, Any], batch_idx: int) -> None:
        self._sync(pl_module)
        self.steps += 1
        if self.steps <= self.skip:
            return
        self.train_time += time.perf_counter() - self._t0
        self.tokens += sum(v.numel() for k, v in batch.items() if k.startswith("input_ids"))

    @property
    def tokens_per_s(self) -> float | None:
        return self.tokens / self.train_time if self.train_time > 0 else None


class CodeSegments(L.Callback):
    """The code every run of a cell trained under, carried in its checkpoints: one segment per
    run (``code_state()``'s commit, dirty flag and dirty files, the step the run started from,
    when it started), so a cell killed, changed and resumed records both codes, not only the last.
    A run killed before its next checkpoint leaves no segment: the work it did is not in the
    checkpoint the next run resumes from either."""

    def __init__(self, code_state: Callable[[], dict[str, Any]]) -> None:
        self._code_state = code_state  # () -> {"commit", "dirty", "dirty_files", ...}
        self.earlier: list[dict[str, Any]] = []  # the runs before this one (from the checkpoint)
        self.current: dict[str, Any] | None = None
        self._fit_done = False

    def on_train_start(self, trainer, pl_module) -> None:
        if self.current is None:  # after the model, data and trainer: the code training runs is imported
            state = self._code_state()
            self.current = {
                "commit": state.get("commit"),
                "dirty": state.get("dirty"),
                "dirty_files": list(state.get("dirty_files") or []),
                "from_step": int(trainer.global_step),
                "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            }

    def on_fit_end(self, trainer, pl_module) -> None:
        self._fit_done = True

    @property
    def segments(self) -> list[dict[str, Any]]:
        return self.earlier + ([self.current] if self.current is not None else [])

    def state_dict(self) -> dict[str, Any]:
        return {"segments": self.segments}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self._fit_done:  # testing the best checkpoint after fit restores callbacks too: keep this run's list
            return
        self.earlier = [dict(s) for s in state.get("segments") or []]
