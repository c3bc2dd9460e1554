"""prune: with a ``prune:`` section the teacher, cut as the recipe says, becomes the student: whole layers
(compressor.prune, LAPTOP-Diff's output-loss criterion), FFN neurons and heads (compressor.width), channels
of any model (compressor.structural). The genome in the record rebuilds it (compressor.prune.rebuild)."""
from __future__ import annotations

import torch

from ..bundle import StageRecord
from ..context import Context
from ..errors import UserError
from ..flops import count_flops as flops
from ..prune import build_pruned, calibration_batches, narrowed, prune_teacher
from ..tasks import sq_error_mean
from ..recipe import PruneSpec

name = "prune"
needs = ("teacher", "data", "genome", "records")



def skip(ctx: Context) -> str | None:
    if ctx.recipe.prune is None:
        return "no prune section in the recipe"
    search = ctx.records.get("search")
    if search is not None and not search.skipped and (search.config or {}).get("family") == "teacher":
        return "the search cut the teacher already (search.family: teacher)"
    seeded = (search.metrics.get("pruned_seed") or {}) if search is not None else {}
    if seeded.get("seeded"):
        # The search already weighed the pruned teacher against its candidates; its choice stands.
        why = ("the search chose the pruned teacher" if seeded["chosen"] else
               f"the search chose another candidate over the pruned teacher ({', '.join(seeded['removed'])} removed)")
        ctx.log(f"prune: {why}; the student stays the search's")
        return f"{why} (search.seed_pruned)"
    return None


def run(ctx: Context) -> StageRecord:
    spec = ctx.recipe.prune
    student, info, plan, channels = cut(ctx, spec)
    ctx.student = student
    ctx.genome = _genome(ctx, info["removed"], plan, channels)
    if channels:
        keep_cut(ctx, student)
    ctx.log(f"the pruned teacher replaces the recipe's student: {info['params']:,} params, "
            f"{info['flops'] / 1e6:.1f} MFLOPs")
    return StageRecord(name, config=spec.model_dump(mode="json"),
                       metrics={k: v for k, v in info.items() if k != "removed"},
                       outputs={"removed": info["removed"], "width": plan, "channels": channels, "genome": ctx.genome})


def cut(ctx: Context, spec: PruneSpec):
    """The teacher cut as ``spec`` says (layers, then width, then channels): (student, the cut's figures with the
    removed units, the width plan or None, the channel plan or None). The prune stage's student, and the search's
    ``as_fast_as: prune`` reference."""
    batches, labels = calibration_batches(ctx.data, ctx.recipe.data.batch_size, spec.calibration_batches,
                                          labels=True)
    if spec.remove:
        student, info = prune_teacher(ctx.teacher, batches, spec.by, spec.remove, log=ctx.log, ignore=spec.ignore,
                                      **latency_source(spec, ctx.recipe.targets, ctx.log, ctx.recipe.export))
    else:  # width or channels only
        student, info = build_pruned(ctx.teacher, []), {"removed": []}
    plan = None
    if spec.width is not None:
        from ..width import prune_width

        w = spec.width
        timed = None
        if w.cost == "latency":  # the device's milliseconds, at the length the profile runs
            from ..context import sequence_length
            from ..tasks import at_length, take

            timed = {**device_source(spec, ctx.recipe.targets, ctx.recipe.export, "prune.width.cost: latency"),
                     "example": at_length(take(batches[0], 1), sequence_length(ctx.recipe, ctx.data))}
        student, plan, info["width"] = prune_width(student, batches, w.remove, ffn=w.ffn, heads=w.heads,
                                                   multiple=w.multiple, projections=w.projections, log=ctx.log,
                                                   hidden=w.hidden, latency=timed)
    channels = None
    if spec.channels is not None:
        from ..structural import prune_channels

        c = spec.channels
        try:
            student, channels, info["channels"] = prune_channels(
                student, batches, c.remove, by=c.by, importance=c.importance, ignore=spec.ignore,
                keep_stem=c.keep_stem, heads=c.heads, multiple=c.multiple, projections=c.projections, labels=labels,
                log=ctx.log)
        except UserError as e:
            raise UserError(f"{e}{unlayered(student, batches[0])}") from None
        r = info["channels"]
        gone = 1 - r[f"{c.by}_after"] / r[f"{c.by}_before"]
        if gone > c.remove + 0.05:  # the nearest cut under the budget can be far under it (Hubert: 62% for 50%)
            ctx.log(f"prune.channels: warning: the cut removes {gone:.0%} of the {c.by}, {c.remove:.0%} asked: the "
                    f"nearest cut at or under the budget ({r['allocation']} ratio {r['ratio']}; whole heads, "
                    f"multiples of {c.multiple}); a lower multiple, or heads: false, gives finer steps")
    if spec.width is not None or spec.channels is not None:
        info["params"] = sum(p.numel() for p in student.parameters())
        info["flops"] = flops(student, batches[0])
        # The whole cut (layers and width) against the teacher, as the layer criterion measures it.
        if "measured_loss" in info:
            info["layers_measured_loss"] = info["measured_loss"]
        info["measured_loss"] = sq_error_mean(ctx.teacher, student, batches)
    return student, info, plan, channels


def unlayered(model, example) -> str:
    """Where most of the model's FLOPs run outside nn.Linear / nn.Conv layers (weights held as bare parameters and
    used through F.linear or F.conv2d), why nothing can be cut: torch-pruning cuts those layers alone."""
    from torch import nn

    from ..flops import flops_by_module

    per = flops_by_module(model, example)
    layers = sum(per.get(p, 0) for p, m in model.named_modules() if isinstance(m, (nn.Linear, nn.modules.conv._ConvNd)))
    total = per.get("", 0)
    if not total or layers >= 0.5 * total:
        return ""
    return (f" (only {layers / total:.0%} of its FLOPs run in nn.Linear or nn.Conv layers, the only ones "
            "torch-pruning cuts: weights held as bare parameters and used through F.linear / F.conv2d are not "
            "layers to it; hold them in nn.Linear / nn.Conv2d)")


def restore(ctx: Context, rec: StageRecord) -> None:
    if "removed" in rec.outputs:
        ctx.student = cut_teacher(ctx, rec.outputs["removed"], rec.outputs.get("width"), rec.outputs.get("channels"))
        ctx.genome = rec.outputs["genome"]


def keep_cut(ctx: Context, student) -> None:
    """Save a channel-cut teacher's weights in scratch: resuming before distillation has saved the student's
    needs them (a channel plan gives the shapes only)."""
    path = ctx.scratch / "pruned.pt"
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(student.state_dict(), path.with_name(".pruned.pt.tmp"))
    path.with_name(".pruned.pt.tmp").replace(path)


def cut_teacher(ctx: Context, removed, width=None, channels=None, saved: bool = False):
    """The teacher without ``removed`` units, narrowed to the width and channel plans; with a channel plan (or
    ``saved``: the search's trained finalist), the weights keep_cut saved."""
    student = narrowed(build_pruned(ctx.teacher, removed), width, channels)
    if channels or saved:
        from ..teacher import load_state

        student.load_state_dict(load_state(ctx.scratch / "pruned.pt", "cut teacher"))
    return student


def _genome(ctx: Context, removed, plan=None, channels=None) -> dict:
    t = ctx.recipe.teacher
    g = {"model": t.model, "config": t.kwargs, "defaults": ctx.genome.get("defaults", {}),
         "pruned_from": "teacher", "removed": list(removed)}
    if plan:
        g["width"] = plan
    if channels:
        g["channels"] = channels
    return g


def latency_source(spec: PruneSpec, targets, log=print, export=None) -> dict:
    """prune_teacher's keyword arguments for a ``by: latency`` spec: the device to measure on (the
    spec's, else the recipe's first target) or the predictor to predict with. ``export``: the recipe's
    export section, so the models are timed as they will ship."""
    if spec.by != "latency":
        return {}
    if spec.latency == "predict":
        from devices import DeviceError
        from devices.predictor import LatencyPredictor

        try:
            return {"predictor": LatencyPredictor.load(spec.predictor)}
        except DeviceError as e:
            raise UserError(f"prune.predictor: {e}") from None
    return device_source(spec, targets, export)


def device_source(spec: PruneSpec, targets, export=None, what: str = "prune by: latency") -> dict:
    """{"device", "measure_kw"}: the device ``what`` measures on (prune.device, else the recipe's first target),
    timed as the export section ships the model."""
    from devices import DeviceError, get_device, load_profile

    name = spec.device or (targets[0] if targets else None)
    if name is None:
        raise UserError(f"{what} needs prune.device (a device profile) or a target to measure on")
    try:
        dev = get_device(load_profile(name))
    except DeviceError as e:
        raise UserError(f"prune.device: {e}") from None
    why = dev.why_unavailable()
    if why:
        raise UserError(f"{what} cannot measure on {name} ({why}); use latency: predict with a "
                        "predictor, or by: flops" if what == "prune by: latency" else
                        f"{what} cannot measure on {name} ({why}); use width.cost: flops")
    shipped = {"opset": export.opset, "dynamic_batch": export.dynamic_batch} if export is not None else {}
    return {"device": dev, "measure_kw": {"warmup": 10, "runs": 50, "max_seconds": 2.0, **shipped}}
