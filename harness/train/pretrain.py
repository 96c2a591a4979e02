"""Self-pretraining (Amos, Berant & Gupta 2024, "Never Train from Scratch", arXiv:2310.02980):
before fine-tuning, the backbone learns to denoise the task's own training inputs.

``train.pretrain_steps`` > 0 runs that first stage: in each training batch (the same
loader as fine-tuning; a matcher's two documents both), ``train.pretrain_mask`` of the
non-padding tokens are replaced by a learned mask vector and a linear read-out of the
encoder's states predicts them (masked denoising: every mechanism can run it, causal or not).
The mask vector and read-out are dropped afterwards; the encoder keeps what it learned, the
task head starts fresh, and fine-tuning gets its own optimizer and schedule. Same optimizer
settings (lr, betas, eps, weight decay, warm-up) as fine-tuning, cosine decay over the
pretraining steps.
"""

from __future__ import annotations

import math
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from harness.train.model import Head

PRETRAINABLE_HEADS = ("classifier", "matcher", "tagger")


class MaskedDenoising(L.LightningModule):
    """The first stage: masked-token prediction on the encoder of ``model``."""

    def __init__(self, model: Head, train_cfg: Any, vocab_size: int):
        super().__init__()
        self.encoder = model.encoder
        self.train_cfg = train_cfg
        dim = self.encoder.cfg.dim
        self.mask_vector = nn.Parameter(torch.zeros(dim))
        nn.init.normal_(self.mask_vector, std=0.02)
        self.read_out = nn.Linear(dim, vocab_size)
        self.losses: list[float] = []

    def _documents(self, batch: dict[str, Tensor]) -> list[tuple[Tensor, Tensor]]:
        if "input_ids" in batch:
            return [(batch["input_ids"], batch["padding_mask"])]
        return [
            (batch[k], batch[k.replace("input_ids", "padding_mask")])
            for k in sorted(batch)
            if k.startswith("input_ids_")
        ]

    def denoising_loss(self, ids: Tensor, padding_mask: Tensor) -> Tensor:
        enc = self.encoder
        masked = (torch.rand(ids.shape, device=ids.device) < self.train_cfg.pretrain_mask) & ~padding_mask
        x = enc.embed(ids)  # (B, L, dim)
        x = torch.where(masked[..., None], self.mask_vector.to(x.dtype), x)
        if enc.use_cls:  # as in fine-tuning: the CLS token in front, never masked
            cls = enc.embed(torch.full_like(ids[:, :1], enc.cls_id))
            x = torch.cat([cls, x], dim=1)
            padding_mask = torch.cat([torch.zeros_like(padding_mask[:, :1]), padding_mask], dim=1)
            masked = torch.cat([torch.zeros_like(masked[:, :1]), masked], dim=1)
            ids = torch.cat([torch.zeros_like(ids[:, :1]), ids], dim=1)
        states, _ = enc.transform(x, padding_mask, step=self.global_step)
        logits = self.read_out(states[masked]).float()
        if logits.numel() == 0:
            return states.sum() * 0.0
        return F.cross_entropy(logits, ids[masked])

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        loss = torch.stack([self.denoising_loss(ids, pad) for ids, pad in self._documents(batch)]).mean()
        if not torch.isfinite(loss):
            from harness.train.training import NonFiniteLoss

            raise NonFiniteLoss(f"non-finite pretraining loss at step {self.global_step}")
        self.losses.append(float(loss.detach()))
        self.log("pretrain/loss", loss, prog_bar=True)
        return loss

    def configure_optimizers(self):
        cfg = self.train_cfg
        optimizer = torch.optim.AdamW(
            self.parameters(), lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps, weight_decay=cfg.weight_decay
        )
        warmup, total = max(1, min(cfg.warmup_steps, cfg.pretrain_steps // 10 or 1)), cfg.pretrain_steps

        def factor(step: int) -> float:
            if step < warmup:
                return (step + 1) / warmup
            return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, total - warmup))))

        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


def self_pretrain(
    model: Head, task, train_cfg: Any, data: L.LightningDataModule, trainer_kwargs: dict[str, Any]
) -> dict:
    """Run the first stage on ``model``'s encoder in place; returns what the record keeps."""
    if task.head not in PRETRAINABLE_HEADS:
        raise ValueError(
            f"train.pretrain_steps: task '{task.name}' has a {task.head} head; self-pretraining covers "
            f"{', '.join(PRETRAINABLE_HEADS)} heads (an LM already trains on its inputs); unset it"
        )
    stage = MaskedDenoising(model, train_cfg, task.vocab_size)
    trainer = L.Trainer(
        max_steps=train_cfg.pretrain_steps,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        enable_checkpointing=False,
        logger=False,
        enable_model_summary=False,
        gradient_clip_val=train_cfg.grad_clip or None,
        gradient_clip_algorithm=train_cfg.grad_clip_algorithm,
        **trainer_kwargs,
    )
    trainer.fit(stage, train_dataloaders=data.train_dataloader())
    tail = stage.losses[-max(1, len(stage.losses) // 10) :]
    return {
        "steps": int(trainer.global_step),
        "mask": train_cfg.pretrain_mask,
        "objective": "masked denoising",
        "first_loss": stage.losses[0] if stage.losses else None,
        "final_loss": sum(tail) / len(tail) if tail else None,
    }
