"""The end of a run: the budgets checked, the manifest, the report and bench.py written, and the
partial directory renamed to the bundle, so a bundle appears whole or not at all."""
from __future__ import annotations

import os
import shutil
from pathlib import Path

from . import report
from .bundle import MANIFEST, SCHEMA, file_hashes, now, toolchain_versions
from .context import Context
from .errors import UserError
from .files import atomic_write, write_json
from .recipe import dump_recipe
from .stages import NAMES


def check_budgets(ctx: Context) -> list[dict]:
    b, out = ctx.recipe.budgets, []
    student = next((a for a in ctx.artifacts if a.role == "student" and a.precision == "fp32"), None)
    if b.size_mb is not None and student:
        out.append({"budget": "size_mb", "limit": b.size_mb, "value": student.bytes / 1e6,
                    "met": student.bytes / 1e6 <= b.size_mb})
    for dev, limit in b.latency_ms.items():
        m = next((m for m in ctx.measurements if m.device == dev and m.batch == 1 and m.artifact == student.path), None)
        out.append({"budget": f"latency_ms[{dev}]", "limit": limit, "value": m.p50_ms if m else None,
                    "met": (m.p50_ms <= limit) if m else None})
    if b.max_quality_drop is not None and "student" in ctx.quality:
        t = ctx.quality["teacher"][ctx.metric]
        # The fp32 student, then each quantized file that ships (student_int8, student_w4: their quality in
        # ONNX Runtime): a budget on quality holds for every file in the bundle.
        for key, q in ctx.quality.items():
            s = q.get(ctx.metric) if key == "student" else q.get(f"onnx_{ctx.metric}")
            if s is None or not (key == "student" or key.startswith("student_")):
                continue
            drop = (t - s) / t if t else 0.0
            name = "max_quality_drop" + ("" if key == "student" else f"[{key.removeprefix('student_')}]")
            out.append({"budget": name, "limit": b.max_quality_drop, "value": drop,
                        "met": drop <= b.max_quality_drop})
    return out


def manifest(ctx: Context, budgets: list[dict]) -> dict:
    q = ctx.quality
    if "student" in q and q["teacher"].get(ctx.metric):
        q["retained"] = q["student"][ctx.metric] / q["teacher"][ctx.metric]
    return {
        "schema": SCHEMA,
        "name": ctx.recipe.name,
        "created": now(),
        "seed": ctx.recipe.seed,
        "toolchain": toolchain_versions(),
        "recipe": ctx.recipe.model_dump(mode="json"),
        "task": {"name": ctx.recipe.task, "metric": ctx.metric},
        "data": ctx.data.meta | {"input_shape": list(ctx.data.input_shape), "num_classes": ctx.data.num_classes},
        "teacher": ctx.teacher_origin,
        "student": ctx.genome,
        "quality": q,
        "budgets": budgets,
        "stages": [ctx.records[n].to_dict() for n in NAMES if n in ctx.records],
        "artifacts": [a.to_dict() for a in ctx.artifacts],
        "reference": [a.to_dict() for a in ctx.reference],
        "measurements": [m.to_dict() for m in ctx.measurements],
    }


def finalize(ctx: Context, out: Path, force: bool) -> Path:
    budgets = check_budgets(ctx)
    for b in budgets:
        if b["met"] is False:
            ctx.log(f"budget not met: {b['budget']} is {b['value']:.4g}, limit {b['limit']}")
    shutil.rmtree(ctx.scratch, ignore_errors=True)
    shutil.rmtree(ctx.work / "stages", ignore_errors=True)
    (ctx.work / "run.json").unlink(missing_ok=True)
    atomic_write(ctx.work / "recipe.yaml", dump_recipe(ctx.recipe))
    bench = Path(__file__).resolve().parent.parent / "devices" / "bench_onnxruntime.py"
    atomic_write(ctx.work / "bench.py", bench.read_bytes())
    manifest_ = manifest(ctx, budgets)
    atomic_write(ctx.work / "report.md", report.markdown(manifest_))
    report.html(manifest_, ctx.work)  # report.html: the same with plots, one self-contained page
    manifest_["files"] = file_hashes(ctx.work)
    write_json(ctx.work / MANIFEST, manifest_)
    if out.exists():
        if not force:
            raise UserError(f"{out} appeared while running; the finished run stays in {ctx.work}")
        old = out.with_name(out.name + ".old")
        os.replace(out, old)
        shutil.rmtree(old)
    os.replace(ctx.work, out)
    return out


