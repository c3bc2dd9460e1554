"""A rung of the teacher search's ladder (compressor.search.subnets): a short distillation of a candidate from the
teacher's outputs, computed once for every candidate and rung, and its score on held-out data."""
from __future__ import annotations

import copy
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import nn

from ..data import LengthGrouped, trim
from ..schedule import cosine, lazy_rows, optimizer
from ..tasks import output, rows, size


@dataclass
class Rung:
    """What a short distillation trains on: inputs, the teacher's outputs on them (computed once, so every
    candidate and rung reuses them) and held-out inputs with their labels (or the teacher's outputs)."""
    x: object
    teacher_out: torch.Tensor
    val_x: object
    val_y: torch.Tensor  # labels (classification) or the teacher's outputs (embedding)
    task: str = "classification"
    batch_size: int = 64
    lr: float = 1e-3
    temperature: float = 4.0
    schedule: str = "constant"  # or "cosine": the learning rate annealed to zero over the rung, as distill.schedule
    by_length: bool = True  # token inputs: batches of similar-length sentences (data.group_by_length)
    lazy: bool = True  # token tables update only the rows a batch uses (distill.lazy_embeddings)

    @classmethod
    @torch.no_grad()
    def of(cls, teacher: nn.Module, x, val_x, val_y, task: str = "classification", **kw) -> "Rung":
        teacher.eval()
        if task != "classification":
            val_y = _outputs(teacher, val_x)
        return cls(x, _outputs(teacher, x), val_x, val_y, task, **kw)

    @torch.no_grad()
    def over(self, teacher: nn.Module, x, val_x=None, val_y=None, **settings) -> "Rung":
        """This rung's settings (``settings`` changes some: ``schedule=``), training on other inputs ``x`` (the
        teacher's outputs on them computed once), scored on ``val_x``/``val_y`` when given (inputs ``x`` may
        include samples this rung scored on)."""
        teacher.eval()
        held = {}
        if val_x is not None:
            held = {"val_x": val_x, "val_y": val_y if self.task == "classification" else _outputs(teacher, val_x)}
        return replace(self, x=x, teacher_out=_outputs(teacher, x), **held, **settings)

    def train(self, model: nn.Module, epochs: float, seed: int = 0) -> nn.Module:
        """A copy of ``model`` trained ``epochs`` passes over the rung's samples against the teacher's
        outputs (KD with temperature for classification, cosine for embeddings)."""
        model = copy.deepcopy(model).train()
        with lazy_rows(model, self.lazy) as tables:
            opt = optimizer(model.parameters(), lr=self.lr, weight_decay=0.01, tables=tables)
            g = torch.Generator().manual_seed(seed)
            n = size(self.x)
            batches, per_epoch = self._batches(n, int(epochs) + 1, g)
            steps = max(1, round(epochs * per_epoch))
            sched = torch.optim.lr_scheduler.LambdaLR(opt, (lambda s: cosine(s, steps)) if self.schedule == "cosine"
                                                      else (lambda s: 1.0))
            for s in range(steps):
                idx = batches[s]
                if len(idx) < 2:
                    idx = torch.randperm(n, generator=g)[:self.batch_size]
                xb = trim({k: v[idx] for k, v in self.x.items()} if isinstance(self.x, dict) else self.x[idx])
                y, t = output(model, xb), self.teacher_out[idx]
                if self.task == "classification":
                    T = self.temperature
                    loss = F.kl_div(F.log_softmax(y / T, -1), F.log_softmax(t / T, -1), reduction="batchmean",
                                    log_target=True) * T * T
                else:
                    loss = (1 - F.cosine_similarity(y, t, dim=-1)).mean()
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
        return model.eval()

    def _batches(self, n: int, epochs: int, g: torch.Generator) -> tuple[list[torch.Tensor], float]:
        """(sample indices of each training step, epoch after epoch; steps an epoch): shuffled, or for token inputs
        (``by_length``) in batches of similar length (compressor.data.LengthGrouped, whose epoch ends in a short
        batch per pool), each then trimmed to its longest."""
        lengths = self.x["attention_mask"].sum(1) if self.by_length and isinstance(self.x, dict) and \
            "attention_mask" in self.x else None
        if lengths is not None:
            grouped = LengthGrouped(lengths, self.batch_size, generator=g)
            return [torch.as_tensor(b) for _ in range(epochs) for b in grouped], len(grouped)
        order = torch.cat([torch.randperm(n, generator=g) for _ in range(epochs)])
        return list(order.split(self.batch_size)), n / self.batch_size

    def recalibrate(self, model: nn.Module) -> nn.Module:
        """Batch-norm statistics re-estimated on the rung's samples (as OFA does for each sub-network): a few
        training steps move the running averages only a little, so without this a short rung would score stale
        statistics, not the weights."""
        from ..structural import recalibrate_batchnorm

        recalibrate_batchnorm(model, [rows(self.x, i, i + 256) for i in range(0, size(self.x), 256)])
        return model.eval()

    def score(self, model: nn.Module) -> float:
        """Held-out accuracy (classification) or mean cosine similarity to the teacher (embedding), with the
        batch-norm statistics re-estimated first."""
        return self.evaluate(model)["score"]

    @torch.no_grad()
    def evaluate(self, model: nn.Module) -> dict:
        """``score`` and ``loss``: the held-out cross-entropy against the labels (classification) or mean cosine
        distance to the teacher (embedding). The loss breaks ties of the score: 180 validation images score in
        steps of 0.0056, and candidates of the final few often tie."""
        self.recalibrate(model)
        y = _outputs(model, self.val_x)
        if self.task == "classification":
            return {"score": float((y.argmax(-1) == self.val_y).float().mean()),
                    "loss": float(F.cross_entropy(y.float(), self.val_y))}
        cos = float(F.cosine_similarity(y, self.val_y, dim=-1).mean())
        return {"score": cos, "loss": 1 - cos}


def _outputs(model: nn.Module, x) -> torch.Tensor:
    """``model``'s outputs on ``x``, 256 samples at a time."""
    return torch.cat([output(model, trim(rows(x, i, i + 256))) for i in range(0, size(x), 256)])
