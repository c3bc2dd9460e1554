"""DistillModule: a LightningModule with a frozen teacher and a trainable student.

Usable in a user's own Trainer:

    module = DistillModule(student, teacher, losses=[(0.7, KD(temperature=4)), (0.3, CE())])
    pl.Trainer(max_epochs=5).fit(module, train_loader, val_loader)
"""
from __future__ import annotations

import math

import pytorch_lightning as pl
import torch
from torch import nn


class DistillModule(pl.LightningModule):
    def __init__(self, student: nn.Module, teacher: nn.Module, losses, *, lr: float = 3e-3,
                 weight_decay: float = 1e-4, optimizer: str = "adamw", schedule: str = "cosine",
                 epochs: int | None = None):
        super().__init__()
        self.student = student
        # The teacher is deliberately not a registered submodule: it stays out of checkpoints and
        # optimizers, and Lightning's .train() calls cannot switch it out of eval mode.
        object.__setattr__(self, "teacher", teacher.eval().requires_grad_(False))
        self.weights = [float(w) for w, _ in losses]
        self.terms = nn.ModuleList([t for _, t in losses])
        self.term_names = [getattr(t, "name", type(t).__name__.lower()) for _, t in losses]
        self.lr, self.weight_decay, self.optimizer_name = lr, weight_decay, optimizer
        self.schedule, self.epochs = schedule, epochs

    def forward(self, x):
        return self.student(x)

    def on_fit_start(self):
        self.teacher.to(self.device).eval()

    def _loss(self, x, y):
        with torch.no_grad():
            t = self.teacher(x)
        s = self.student(x)
        parts = {n: w * term(student=s, teacher=t, target=y)
                 for n, w, term in zip(self.term_names, self.weights, self.terms)}
        return sum(parts.values()), parts, s

    def training_step(self, batch, batch_idx):
        x, y = batch
        total, parts, _ = self._loss(x, y)
        if not torch.isfinite(total):
            raise FloatingPointError(
                f"distillation loss became {total.item()} at epoch {self.current_epoch}, step {batch_idx} "
                f"({', '.join(f'{k}={v.item():.3g}' for k, v in parts.items())}); lower distill.lr")
        self.log("train_loss", total, prog_bar=True, on_step=False, on_epoch=True)
        for k, v in parts.items():
            self.log(f"train_{k}", v, on_step=False, on_epoch=True)
        return total

    def validation_step(self, batch, batch_idx):
        x, y = batch
        total, _, s = self._loss(x, y)
        self.log("val_loss", total, prog_bar=False)
        self.log("val_acc", (s.argmax(-1) == y).float().mean(), prog_bar=True)

    def configure_optimizers(self):
        params = list(self.student.parameters()) + list(self.terms.parameters())
        if self.optimizer_name == "sgd":
            opt = torch.optim.SGD(params, lr=self.lr, momentum=0.9, weight_decay=self.weight_decay, nesterov=True)
        else:
            opt = torch.optim.AdamW(params, lr=self.lr, weight_decay=self.weight_decay)
        if self.schedule == "constant" or not self.epochs:
            return opt
        epochs = self.epochs
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda e: 0.5 * (1 + math.cos(math.pi * min(e, epochs) / epochs)))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "epoch"}}
