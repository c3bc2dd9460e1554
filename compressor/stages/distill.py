"""distill: the student learns from the teacher (compressor.distill: Lightning, the recipe's losses);
its weights go to model/student.pt and its held-out quality into the record."""
from __future__ import annotations

import os

import torch

from ..bundle import StageRecord
from ..context import Context

name = "distill"
needs = ("student", "teacher", "data", "task", "quality")


def skip(ctx: Context) -> str | None:
    return None  # every run distils


def train(ctx: Context) -> dict:
    """Distil ``ctx.student`` from the teacher as the recipe says (every rank of a multi-process run)."""
    from ..distill.train import fit  # Lightning loads when a run distils, not with the package

    # a student cut from the teacher (prune, search) knows something before training: it competes as epoch 0
    return fit(ctx.student, ctx.teacher, ctx.data, ctx.recipe.distill, ctx.recipe.data, ctx.scratch / "checkpoints",
               seed=ctx.recipe.seed, log=ctx.log, val_metric=ctx.task.val_metric,
               as_it_came=ctx.genome.get("pruned_from") == "teacher")


def run(ctx: Context) -> StageRecord:
    result = train(ctx)
    weights = ctx.work / "model" / "student.pt"
    weights.parent.mkdir(parents=True, exist_ok=True)
    tmp = weights.with_name(".student.pt.tmp")
    torch.save(ctx.student.state_dict(), tmp)
    os.replace(tmp, weights)
    quality = ctx.score(ctx.student)
    ctx.quality["student"] = quality
    ctx.log(", ".join(f"student held-out {k} {v:.4f} (teacher {ctx.quality['teacher'][k]:.4f})"
                      for k, v in quality.items() if k in ("accuracy", "agreement", "probe_accuracy")))
    return StageRecord(name, config=ctx.recipe.distill.model_dump(mode="json"),
                       metrics={**result, **quality}, outputs={"weights": "model/student.pt"})


def restore(ctx: Context, rec: StageRecord) -> None:
    from ..teacher import load_state

    ctx.student.load_state_dict(load_state(ctx.work / rec.outputs["weights"], "student"))
    ctx.student.eval()
    ctx.quality["student"] = {k: rec.metrics[k] for k in ctx.quality["teacher"] if k in rec.metrics}
