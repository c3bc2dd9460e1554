"""analyze: the teacher's (and the recipe's student's) params, FLOPs and layers, the teacher's quality,
and the teacher's ONNX export, so a model no exporter takes fails in seconds rather than after training."""
from __future__ import annotations

from ..bundle import StageRecord
from ..context import Context
from ..models import count_flops, count_params
from .export import export_model

name = "analyze"
needs = ("teacher", "student", "data", "task")


def skip(ctx: Context) -> str | None:
    return None  # always runs


def run(ctx: Context) -> StageRecord:
    x = ctx.flops_example()
    info = {}
    for role, model in (("teacher", ctx.teacher), ("student", ctx.student)):
        if model is None:
            continue
        info[role] = {"params": count_params(model), "flops": count_flops(model, x),
                      "layers": [{"path": n, "type": type(m).__name__, "params": count_params(m)}
                                 for n, m in model.named_children()]}
    # The file the export stage then checks and measures. Students are built from the teacher or beside
    # it, so they usually share its operators.
    ctx.teacher_onnx = export_model(ctx, ctx.teacher, ctx.scratch / "teacher.onnx", "teacher")
    quality = ctx.task.teacher_score(ctx.teacher, ctx.data, ctx.recipe.data.batch_size)
    info["teacher"].update(quality)
    ctx.quality["teacher"] = quality
    t = info["teacher"]
    line = (f"teacher: {t['params']:,} params, {t['flops'] / 1e6:.1f} MFLOPs, "
            + ", ".join(f"held-out {k} {v:.4f}" for k, v in quality.items() if k in ("accuracy", "probe_accuracy")))
    if "student" in info:
        s = info["student"]
        line += (f"; student: {s['params']:,} params, {s['flops'] / 1e6:.1f} MFLOPs "
                 f"({t['flops'] / max(s['flops'], 1):.1f}x fewer)")
    ctx.log(line)
    if "accuracy" in quality and (chance := _chance(ctx.data)) and quality["accuracy"] <= chance + 0.02:
        info["teacher"]["at_chance"] = True  # a student distilled from it learns nothing
        ctx.log(f"analyze: warning: the teacher's held-out accuracy {quality['accuracy']:.4f} is at chance "
                f"({chance:.4f}: the most frequent of {ctx.data.num_classes} classes); a student distilled from it "
                "learns nothing: train it further (teacher.train), or check that its inputs and labels are what it "
                "was trained on")
    return StageRecord(name, config={"teacher": ctx.teacher_origin, "student": ctx.genome}, metrics=info)


def _chance(data) -> float | None:
    """The held-out accuracy of always answering the most frequent class (None without class labels)."""
    counts = {}
    for _, y in data.loader("test", 256) if getattr(data, "num_classes", 0) >= 2 else ():
        for v in y.reshape(-1).tolist():
            counts[v] = counts.get(v, 0) + 1
    return max(counts.values()) / sum(counts.values()) if counts else None


def restore(ctx: Context, rec: StageRecord) -> None:
    ctx.task.prepare(ctx.teacher, ctx.data, ctx.recipe.data.batch_size)  # the teacher's reference outputs
    ctx.quality["teacher"] = {k: v for k, v in rec.metrics["teacher"].items()
                              if k not in ("params", "flops", "layers")}
