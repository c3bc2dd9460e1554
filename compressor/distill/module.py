"""DistillModule: a LightningModule with a frozen teacher and a trainable student.

Usable in a user's own Trainer:

    module = DistillModule(student, teacher, losses=[(0.7, KD(temperature=4)), (0.3, CE())])
    pl.Trainer(max_epochs=5).fit(module, train_loader, val_loader)

Feature terms name module paths (``term.student_paths`` / ``term.teacher_paths``); the module checks
they exist, captures them with forward hooks on every step, and, given ``example`` (a batch of
inputs), builds the terms' learned adapters before the optimizer is made so that they train too.
"""
from __future__ import annotations

import numpy as np
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import nn

from ..schedule import cosine
from ..schedule import optimizer as make_optimizer
from .hooks import capture, check_paths


# What validation reports, and the best checkpoint is chosen by: name -> f(student out, teacher out, labels).
VAL_METRICS = {
    "acc": lambda s, t, y: (s.argmax(-1) == y).float().mean(),  # classification: top-1 accuracy
    "cosine": lambda s, t, y: _cosine(s, t),  # embeddings
}


def _cosine(s, t):
    """Mean cosine between student and teacher embeddings; for a student of another width (a searched
    one may be narrower), the mean cosine between their pairwise-similarity rows over the batch: the
    same scale (1: the same geometry), and comparable within a run, whose width is fixed."""
    s, t = s.flatten(1), t.flatten(1)
    if s.shape == t.shape:
        return F.cosine_similarity(s, t, dim=-1).mean()
    s, t = F.normalize(s, dim=-1), F.normalize(t, dim=-1)
    return F.cosine_similarity(s @ s.T, t @ t.T, dim=-1).mean()


def _call(model, x):
    return model(**x) if isinstance(x, dict) else model(x)


class DistillModule(pl.LightningModule):
    """Inputs are tensors or dicts of tensors (Hugging Face: input_ids, attention_mask; the mask also
    reaches the loss terms, which keep padding out of attention losses)."""

    def __init__(self, student: nn.Module, teacher: nn.Module, losses, *, lr: float = 3e-3,
                 weight_decay: float = 1e-4, optimizer: str = "adamw", schedule: str = "cosine",
                 epochs: int | None = None, example=None, val_metric: str = "acc"):
        super().__init__()
        if val_metric not in VAL_METRICS:
            raise ValueError(f"val_metric {val_metric!r}: one of {', '.join(VAL_METRICS)}")
        self.val_metric = val_metric
        self.student = student
        # The teacher is deliberately not a registered submodule: it stays out of checkpoints and
        # optimizers, and Lightning's .train() calls cannot switch it out of eval mode.
        object.__setattr__(self, "teacher", teacher.eval().requires_grad_(False))
        self.weights = [float(w) for w, _ in losses]
        self.terms = nn.ModuleList([t for _, t in losses])
        names = [getattr(t, "name", type(t).__name__.lower()) for _, t in losses]
        # Two terms of one kind (feature on two layer sets) need distinct names to be logged apart.
        self.term_names = [n if names.count(n) == 1 else f"{n}_{names[:i].count(n)}" for i, n in enumerate(names)]
        self.lr, self.weight_decay, self.optimizer_name = lr, weight_decay, optimizer
        self.schedule, self.epochs = schedule, epochs
        # The modules feature terms read, each hooked once per step even when several terms name it.
        self.student_paths = list(dict.fromkeys(p for t in self.terms for p in getattr(t, "student_paths", ())))
        self.teacher_paths = list(dict.fromkeys(p for t in self.terms for p in getattr(t, "teacher_paths", ())))
        # The teacher's outputs by training-sample index, when compressor.distill.cache computed them once:
        # a batch (x, y, i) then looks them up instead of running the teacher.
        self.teacher_cache: torch.Tensor | None = None
        # The student's token tables that give sparse gradients during fit (schedule.lazy_rows): their rows
        # update lazily (schedule.LazyRowsAdamW).
        self.tables: list = []
        # And the hidden features the terms read, by module path (with the axes that follow a token batch's length).
        self.teacher_feature_cache: dict = {}  # path -> a memory-mapped numpy array (compressor.distill.cache)
        self.token_axes: dict[str, tuple[int, ...]] = {}
        check_paths(student, self.student_paths, "student")
        check_paths(teacher, self.teacher_paths, "teacher")
        if example is not None:
            self.build_adapters(example)

    @torch.no_grad()
    def build_adapters(self, x) -> None:
        """Run one batch through both models so terms size their adapters (shape errors surface here)."""
        terms = [t for t in self.terms if hasattr(t, "build")]
        if not terms:
            return
        was = self.student.training
        self.student.eval()  # a probe must not move BatchNorm statistics
        try:
            s, t, sf, tf = self._forward(x)
        finally:
            self.student.train(was)
        for term in terms:
            term.build(sf, tf, student=s, teacher=t)  # the outputs too: cosine sizes its projection on them

    def _forward(self, x, idx=None):
        if idx is not None and self.teacher_cache is not None:
            t, tf = None, self._cached_features(x, idx)
        else:
            with capture(self.teacher, self.teacher_paths, "teacher") as tf, torch.no_grad():
                t = _call(self.teacher, x)
        with capture(self.student, self.student_paths, "student") as sf:
            s = _call(self.student, x)
        if t is None:
            first = s if isinstance(s, torch.Tensor) else next(v for v in (s if isinstance(s, (tuple, list)) else [s]))
            t = self.teacher_cache[idx.cpu()].to(first.device, first.dtype)
        return s, t, sf, tf

    def _cached_features(self, x, idx) -> dict:
        from .cache import cut_features

        if not self.teacher_paths:
            return {}
        n = x["attention_mask"].shape[1] if isinstance(x, dict) and "attention_mask" in x else None
        rows = idx.cpu().numpy()
        return {p: cut_features(torch.from_numpy(np.ascontiguousarray(self.teacher_feature_cache[p][rows])),
                                self.token_axes[p], n).to(self.device, torch.float32) for p in self.teacher_paths}

    def forward(self, x):
        return _call(self.student, x)

    def on_validation_start(self):  # a validate() before fit (the student as it came) needs the teacher there too
        self.teacher.to(self.device).eval()

    def on_fit_start(self):
        self.teacher.to(self.device).eval()
        for term in self.terms:  # TAID's linear floor needs the run's length
            if hasattr(term, "total_steps") and not term.total_steps:
                term.total_steps = int(self.trainer.estimated_stepping_batches)

    def _loss(self, x, y, idx=None):
        s, t, sf, tf = self._forward(x, idx)
        mask = x.get("attention_mask") if isinstance(x, dict) else None
        parts = {n: w * term(student=s, teacher=t, target=y, student_features=sf, teacher_features=tf,
                             attention_mask=mask)
                 for n, w, term in zip(self.term_names, self.weights, self.terms)}
        return sum(parts.values()), parts, s, t

    def training_step(self, batch, batch_idx):
        x, y, *idx = batch  # (x, y, i): the sample indices of a cached teacher's outputs
        total, parts, _, _ = self._loss(x, y, idx[0] if idx else None)
        if not torch.isfinite(total):
            raise FloatingPointError(
                f"distillation loss became {total.item()} at epoch {self.current_epoch}, step {batch_idx} "
                f"({', '.join(f'{k}={v.item():.3g}' for k, v in parts.items())}); lower distill.lr")
        self.log("train_loss", total, prog_bar=True, on_step=False, on_epoch=True, sync_dist=True)
        for k, v in parts.items():
            self.log(f"train_{k}", v, on_step=False, on_epoch=True, sync_dist=True)
        return total

    def validation_step(self, batch, batch_idx):
        x, y = batch
        total, _, s, t = self._loss(x, y)
        self.log("val_loss", total, prog_bar=False, sync_dist=True)
        self.log(f"val_{self.val_metric}", VAL_METRICS[self.val_metric](s, t, y), prog_bar=True,
                 sync_dist=True)  # synced: ranks agree on the best epoch

    def configure_optimizers(self):
        params = [p for p in self.student.parameters() if p.requires_grad] + list(self.terms.parameters())
        if self.optimizer_name == "sgd":
            opt = torch.optim.SGD(params, lr=self.lr, momentum=0.9, weight_decay=self.weight_decay, nesterov=True)
        else:
            opt = make_optimizer(params, lr=self.lr, weight_decay=self.weight_decay, tables=self.tables)
        if self.schedule == "constant" or not self.epochs:
            return opt
        epochs = self.epochs
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda e: cosine(e, epochs))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "epoch"}}
