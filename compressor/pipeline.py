"""run(recipe) -> bundle. The only place where stage order lives.

Each stage is a function ``stage(ctx) -> StageRecord`` and a ``restore(ctx, record)`` that rebuilds
what it produced from its record, so ``--resume`` skips finished stages. Records go to
``<out>.partial/stages/<name>.json`` as each stage ends; the bundle appears under ``<out>`` only when
every stage has finished (a rename), so a failed run never leaves a half-written bundle.
"""
from __future__ import annotations

import json
import os
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from devices import DeviceError, Measurement, get_device, load_profile
from exporters.artifact import Artifact

from . import report
from .bundle import MANIFEST, SCHEMA, StageRecord, atomic_write, file_hashes, now, toolchain_versions, write_json
from .data import DataSplits, load_data
from .errors import StageError, UserError
from .hold import hold
from .models import HF_BUILDERS, build_model, count_flops, count_params, is_hf_dir
from .recipe import Recipe, dump_recipe, load_recipe
from .tasks import as_tuple, at_length, get_task, onnx_io
from .teacher import check_fits, load_teacher

# The stage order, as data. Stages not yet implemented are skipped (search, prune, quantize come next).
STAGE_ORDER = ("analyze", "search", "prune", "distill", "quantize", "export", "profile")


@dataclass
class Context:
    recipe: Recipe
    work: Path  # the partial bundle directory
    data: DataSplits
    teacher: nn.Module
    teacher_origin: dict
    student: nn.Module | None  # None until search or prune makes one, when the recipe names none
    genome: dict
    task: object = None  # compressor.tasks: how quality is measured
    log: Callable[[str], None] = print
    artifacts: list[Artifact] = field(default_factory=list)
    reference: list[Artifact] = field(default_factory=list)  # measured for comparison, not shipped
    measurements: list[Measurement] = field(default_factory=list)
    records: dict[str, StageRecord] = field(default_factory=dict)
    quality: dict = field(default_factory=dict)
    teacher_onnx: Artifact | None = None  # analyze's export of the teacher, reused by the export stage

    @property
    def scratch(self) -> Path:
        """Files needed while running (checkpoints, the teacher's ONNX) but not shipped."""
        return self.work / "work"

    def example(self, n: int = 1):
        """``n`` held-out inputs: a tensor, or a dict of tensors (token inputs)."""
        return self.data.tensors("test", limit=n)[0]

    def flops_example(self):
        """One input at the length the devices run (data's dims, or the profile's), for FLOP counts."""
        length = {**self.data.meta.get("dims", {}), **self.recipe.profile.dims}.get("sequence")
        return at_length(self.example(1), length)

    def score(self, model: nn.Module) -> dict:
        """The task's quality metrics of ``model`` on the held-out split."""
        return self.task.score(model, self.data, self.recipe.data.batch_size)

    @property
    def metric(self) -> str:
        return self.recipe.metric


def build_student(recipe: Recipe, data: DataSplits) -> tuple[nn.Module | None, dict]:
    if recipe.student is None:  # search or prune makes it
        return None, {}
    defaults = {"in_channels": data.input_shape[0], "num_classes": data.num_classes,
                "in_features": int(torch.Size(data.input_shape).numel())}
    if recipe.student.model in HF_BUILDERS:  # the teacher's own class with a smaller config
        from .hf import inherited

        own = recipe.student.config.keys() & {"path", "package"}  # a student from another directory
        defaults.update({k: v for k, v in inherited(recipe.teacher).items()
                         if not (own and k in ("path", "package"))
                         and (recipe.student.model == "hf-encoder" or k in ("path", "package"))})
    model = build_model(recipe.student.model, recipe.student.config, defaults, what="student")
    genome = {"model": recipe.student.model, "config": recipe.student.config, "defaults": defaults}
    return model, genome


# ---------------------------------------------------------------------------------------------- stages

def analyze(ctx: Context) -> StageRecord:
    x = ctx.flops_example()
    info = {}
    for role, model in (("teacher", ctx.teacher), ("student", ctx.student)):
        if model is None:
            continue
        info[role] = {"params": count_params(model), "flops": count_flops(model, x),
                      "layers": [{"path": n, "type": type(m).__name__, "params": count_params(m)}
                                 for n, m in model.named_children()]}
    _check_exports(ctx)
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
    return StageRecord("analyze", config={"teacher": ctx.teacher_origin, "student": ctx.genome}, metrics=info)


def _check_exports(ctx: Context) -> None:
    """Export the teacher now, the file the export stage then checks and measures: a model that no ONNX
    exporter takes (an unsupported operator) fails in seconds, naming the operator and its module, not
    after the distillation. Its students are built from it or alongside it, so they usually share its
    operators."""
    ctx.teacher_onnx = _export_model(ctx, ctx.teacher, ctx.scratch / "teacher.onnx", "teacher")


def _export_model(ctx: Context, model, path: Path, role: str, *, dynamo_first: bool = False) -> Artifact:
    """``model``'s ONNX file: Optimum's for a Hugging Face classifier where Optimum takes it, else
    torch.onnx.export (``dynamo_first``: torch.export's exporter before the TorchScript one)."""
    from exporters.onnx import export_onnx

    spec = ctx.recipe.export
    x = ctx.example(2)
    art = None if dynamo_first else _export_hf(ctx, model, x, path, role)
    return art or export_onnx(model, as_tuple(x), path, opset=spec.opset, dynamic_batch=spec.dynamic_batch,
                              role=role, dynamo_first=dynamo_first, **onnx_io(x, ctx.task.output, spec.dynamic_batch))


def restore_analyze(ctx: Context, rec: StageRecord) -> None:
    ctx.task.prepare(ctx.teacher, ctx.data, ctx.recipe.data.batch_size)  # the teacher's reference outputs
    ctx.quality["teacher"] = {k: v for k, v in rec.metrics["teacher"].items()
                              if k not in ("params", "flops", "layers")}


def search(ctx: Context) -> StageRecord:
    from .search.stage import stage  # with a search section the searched student replaces the recipe's

    return stage(ctx)


def restore_search(ctx: Context, rec: StageRecord) -> None:
    from .search.stage import restore

    restore(ctx, rec)


def prune(ctx: Context) -> StageRecord:
    from .prune import stage  # with a prune section the pruned teacher becomes the student

    return stage(ctx)


def restore_prune(ctx: Context, rec: StageRecord) -> None:
    from .prune import restore

    restore(ctx, rec)


def distill(ctx: Context) -> StageRecord:
    from .distill.train import fit

    spec = ctx.recipe.distill
    result = fit(ctx.student, ctx.teacher, ctx.data, spec, ctx.recipe.data, ctx.scratch / "checkpoints",
                 seed=ctx.recipe.seed, log=ctx.log, val_metric=ctx.task.val_metric)
    weights = ctx.work / "model" / "student.pt"
    weights.parent.mkdir(parents=True, exist_ok=True)
    tmp = weights.with_name(".student.pt.tmp")
    torch.save(ctx.student.state_dict(), tmp)
    os.replace(tmp, weights)
    quality = ctx.score(ctx.student)
    ctx.quality["student"] = quality
    ctx.log(", ".join(f"student held-out {k} {v:.4f} (teacher {ctx.quality['teacher'][k]:.4f})"
                      for k, v in quality.items() if k in ("accuracy", "agreement", "probe_accuracy")))
    return StageRecord("distill", config=spec.model_dump(mode="json"),
                       metrics={**result, **quality}, outputs={"weights": "model/student.pt"})


def restore_distill(ctx: Context, rec: StageRecord) -> None:
    from .teacher import load_state

    ctx.student.load_state_dict(load_state(ctx.work / rec.outputs["weights"], "student"))
    ctx.student.eval()
    ctx.quality["student"] = {k: rec.metrics[k] for k in ctx.quality["teacher"] if k in rec.metrics}


def quantize(ctx: Context) -> StageRecord:
    from .quantize import stage  # NNCF/torchao/OpenVINO load only when a quantize mode needs them

    return stage(ctx)


def restore_quantize(ctx: Context, rec: StageRecord) -> None:
    from .quantize import restore

    restore(ctx, rec)


def export(ctx: Context) -> StageRecord:
    from exporters.onnx import parity

    spec = ctx.recipe.export
    held_out = ctx.example(spec.parity.samples)
    metrics, outputs = {}, {}
    for role, model, path in (("student", ctx.student, ctx.work / "model" / "student.onnx"),
                              ("teacher", ctx.teacher, ctx.scratch / "teacher.onnx")):
        # The teacher's file is analyze's, unless this run resumed after analyze.
        art = ctx.teacher_onnx if role == "teacher" and ctx.teacher_onnx else _export_model(ctx, model, path, role)
        try:
            check = parity(path, model, held_out, atol=spec.parity.atol, rtol=spec.parity.rtol)
        except Exception as e:
            if art.extra.get("exporter") != "torchscript":
                raise StageError("export", f"{role}: {e}") from None
            # A TorchScript trace can bake Python values in (len(x) of the example's batch, say): the
            # torch.export graph keeps them symbolic. Try it before giving up.
            ctx.log(f"export: {role}: the TorchScript export does not match PyTorch ({str(e).splitlines()[0][:160]}); "
                    "trying torch.export")
            art = _export_model(ctx, model, path, role, dynamo_first=True)
            try:
                check = parity(path, model, held_out, atol=spec.parity.atol, rtol=spec.parity.rtol)
            except Exception as e2:
                raise StageError("export", f"{role}: {e2}") from None
        art.path = path.relative_to(ctx.work).as_posix()
        art.extra["parity"] = check
        (ctx.artifacts if role == "student" else ctx.reference).append(art)
        metrics[role] = {"bytes": art.bytes, "parity_max_abs": check["max_abs"], "parity_max_rel": check["max_rel"]}
        outputs[role] = art.to_dict()
    # The deployed file's own quality on the whole held-out split, through ONNX Runtime.
    onnx_quality = ctx.task.score_onnx(ctx.work / "model" / "student.onnx", ctx.data)
    key = f"onnx_{ctx.metric}"
    metrics["student"][key] = onnx_quality[ctx.metric]
    ctx.quality.setdefault("student", {})[key] = onnx_quality[ctx.metric]
    ctx.log(f"exported student.onnx ({metrics['student']['bytes'] / 1e6:.3f} MB), parity max abs error "
            f"{metrics['student']['parity_max_abs']:.2e}, ONNX Runtime {ctx.metric} {onnx_quality[ctx.metric]:.4f}")
    if {ctx.recipe.teacher.model, ctx.genome.get("model")} & set(HF_BUILDERS) or is_hf_dir(ctx.recipe.teacher.model):
        outputs["tokenizer"] = _copy_tokenizer(ctx)
    metrics["targets"], outputs["targets"] = _export_for_targets(ctx)
    return StageRecord("export", config=spec.model_dump(mode="json"), metrics=metrics, outputs=outputs)


def _export_hf(ctx: Context, model, x, path: Path, role: str) -> Artifact | None:
    """A Hugging Face classifier through Optimum's exporter, where Optimum supports it and the data gives
    every input it takes; None (and a log line) where not: torch.onnx.export then runs as for any model."""
    from exporters import ExportError
    from exporters.onnx import export_optimum

    from .intake import is_adapted, is_hf_model, unadapted

    if ctx.recipe.task != "classification" or not (is_hf_model(model) and is_adapted(model)):
        return None
    from .hf import classifier_kind

    kind = classifier_kind(type(model).__name__)
    if kind is None or not ctx.recipe.export.dynamic_batch:
        return None
    task = kind[0]
    example = x if isinstance(x, dict) else {"pixel_values": x}
    try:
        with unadapted(model):
            return export_optimum(model, path, task=task, example_inputs=example, opset=ctx.recipe.export.opset,
                                  role=role)
    except ExportError as e:
        ctx.log(f"export: {role}: {e}; exporting with torch.onnx.export instead")
        return None


def _export_for_targets(ctx: Context) -> tuple[dict, list[dict]]:
    """The files each non-ONNX-Runtime target runs (OpenVINO IR, TensorRT engine + trtexec script,
    int8 TFLite + Vela). A target whose toolchain is missing or rejects the model is reported, and the
    rest of the bundle is still written."""
    from exporters.targets import export_for_target

    report, made = {}, []
    for target in ctx.recipe.targets:
        prof = load_profile(target)
        if prof.runtime == "onnxruntime":
            continue
        sources = [a for a in ctx.artifacts if a.format == "onnx" and a.role == "student"]
        if prof.runtime == "vela":  # the full-int8 TFLite is quantized from the torch module, once
            sources = sources[:1]
        else:
            sources = [a for a in sources if a.precision in prof.precisions]
        files, problems = [], []
        for src in sources:
            absolute = Artifact.from_dict({**src.to_dict(), "path": str(ctx.work / src.path)})
            arts, probs = export_for_target(prof.runtime, prof.options, absolute, ctx.work / "model",
                                            model=ctx.student, example_inputs=as_tuple(ctx.example(1)),
                                            calibration=[ctx.example(64)], precisions=prof.precisions)
            for a in arts:
                a.path = Path(a.path).resolve().relative_to(ctx.work.resolve()).as_posix()
                a.extra["target"] = target
                if a.path not in {x.path for x in ctx.artifacts}:
                    ctx.artifacts.append(a)
                    made.append(a.to_dict())
                files.append(a.path)
            problems += probs
        for p in problems:
            ctx.log(f"{target}: {p}")
        report[target] = {"runtime": prof.runtime, "files": files, "problems": problems}
    return report, made


def _copy_tokenizer(ctx: Context) -> list[str]:
    """A text model ships with the files that turn text into its inputs: model/tokenizer/."""
    from .hf import tokenizer_files

    kw = {k: ctx.recipe.teacher.kwargs.get(k) for k in ("path", "package")}
    if not any(kw.values()):
        kw["path"] = ctx.recipe.teacher.model
    dest = ctx.work / "model" / "tokenizer"
    dest.mkdir(parents=True, exist_ok=True)
    copied = []
    for f in tokenizer_files(**kw):
        atomic_write(dest / f.name, f.read_bytes())
        copied.append((dest / f.name).relative_to(ctx.work).as_posix())
    return copied


def restore_export(ctx: Context, rec: StageRecord) -> None:
    ctx.artifacts.append(Artifact.from_dict(rec.outputs["student"]))  # after the quantize stage's int8 file
    ctx.reference = [Artifact.from_dict(rec.outputs["teacher"])]
    key = f"onnx_{ctx.metric}"
    ctx.quality.setdefault("student", {})[key] = rec.metrics["student"][key]
    ctx.artifacts += [Artifact.from_dict(d) for d in rec.outputs.get("targets", [])]


def gemm_peak_gflops(threads: int, sizes=(256, 512, 1024), seconds: float = 0.2) -> float:
    """This machine's attained fp32 peak at ``threads`` threads: ``threads`` x the fastest single-thread
    n x n torch GEMM, or the threaded GEMM where that is faster (best of ``seconds`` per size). The
    yardstick for a measurement's attained GFLOP/s; a datasheet peak is often unreachable. The
    single-thread probe is the robust one: on a shared machine a threaded GEMM waits at every barrier
    for a descheduled thread (measured here: 28-41 GFLOP/s at 2 threads against 162 at 1)."""
    def best_rate(n_threads: int) -> float:
        torch.set_num_threads(n_threads)
        peak = 0.0
        for n in sizes:
            a, b = torch.randn(n, n), torch.randn(n, n)
            a @ b  # warm-up: thread pool and caches
            best, t_end = float("inf"), time.perf_counter() + seconds
            while time.perf_counter() < t_end:
                t0 = time.perf_counter()
                a @ b
                best = min(best, time.perf_counter() - t0)
            peak = max(peak, 2 * n ** 3 / best / 1e9)
        return peak

    before = torch.get_num_threads()
    try:
        return max(threads * best_rate(1), best_rate(threads) if threads > 1 else 0.0)
    finally:
        torch.set_num_threads(before)


def _runnable(ctx: Context, prof) -> list[Artifact]:
    """Per role and precision the device lists, the file in the format its runtime prefers."""
    from exporters.targets import FORMATS

    formats = FORMATS.get(prof.runtime, ("onnx",))
    if prof.runtime == "tensorrt" and not prof.local:
        # trtexec builds the engine on the board: one built here would not run on its GPU
        formats = ("onnx",)
    best: dict[tuple[str, str], Artifact] = {}
    for art in [*ctx.artifacts, *ctx.reference]:
        if art.format not in formats or art.precision not in prof.precisions:
            continue
        if art.format == "tensorrt" and art.extra.get("target") != prof.name:
            continue  # an engine runs only on the GPU it was built for
        key = (art.role, art.precision)
        if key not in best or formats.index(art.format) < formats.index(best[key].format):
            best[key] = art
    return list(best.values())


def _dims(ctx: Context, prof, art: Artifact, batch: int) -> dict:
    """Sizes of symbolic input axes besides the batch (a sequence length), in the form the device takes:
    ONNX Runtime scripts name the axis, OpenVINO wants each input's full shape."""
    x = ctx.example(1)
    seq = {"sequence": int(next(v for v in x.values() if v.dim() == 2).shape[1])} if isinstance(x, dict) else {}
    dims = {**seq, **ctx.data.meta.get("dims", {}), **ctx.recipe.profile.dims}  # default: the data's own length
    if not dims:
        return {}
    if prof.runtime != "openvino":
        return {"dims": dims}
    # An OpenVINO IR loses the ONNX axis names ('?'): take them from the ONNX file the IR came from.
    named = {i["name"]: i["shape"] for a in ctx.artifacts + ctx.reference if a.format == "onnx"
             for i in a.inputs or []}
    shapes = {}
    for i in art.inputs or []:
        shape = []
        for k, d in enumerate(i["shape"]):
            if isinstance(d, int) and d > 0:
                shape.append(d)
                continue
            source = named.get(i["name"], [])
            name = d if isinstance(d, str) and d in dims else (source[k] if k < len(source) else None)
            if k == 0 and name not in dims:
                shape.append(batch)
            elif name in dims:
                shape.append(int(dims[name]))
            elif len(dims) == 1:  # one size given, one unnamed axis besides the batch: that one
                shape.append(int(next(iter(dims.values()))))
            else:
                raise DeviceError(f"{art.path}: input {i['name']} axis {k} has no size; set profile.dims")
        shapes[i["name"]] = shape
    return {"dims": shapes} if shapes else {}


def profile(ctx: Context) -> StageRecord:
    spec = ctx.recipe.profile
    metrics, skipped, not_measured, saturated = {}, {}, {}, {}
    # FLOPs per sample of what each file holds (int8 files run the same operations); counted now, since
    # search and prune may have replaced the student after analyze.
    x = ctx.flops_example()
    flops = {"student": count_flops(ctx.student, x), "teacher": count_flops(ctx.teacher, x)}
    params = {"student": count_params(ctx.student), "teacher": count_params(ctx.teacher)}
    peaks = {}
    for target in ctx.recipe.targets:
        prof = load_profile(target)
        device = get_device(prof)
        why = device.why_unavailable()
        if why:
            skipped[target] = why
            ctx.log(f"{target}: not measured ({why})")
            continue
        if prof.local and prof.kind == "cpu":
            peaks[target] = {"gflops": round(gemm_peak_gflops(prof.threads or 1), 2), "threads": prof.threads,
                             "source": "measured: threads x the fastest 1-thread fp32 torch GEMM, n 256-1024"}
        elif prof.peak_gflops:
            peaks[target] = {"gflops": prof.peak_gflops, "source": f"profile {prof.name} (datasheet)"}
        for art in ctx.artifacts:  # a quantized file this device does not run: say so, not silently
            if art.role == "student" and art.precision not in prof.precisions and art.precision.startswith("w"):
                why = f"{target} lists precisions {', '.join(prof.precisions)}, not {art.precision}"
                if art.extra.get("matmulnbits") and prof.runtime != "onnxruntime":
                    why += (f"; its MatMulNBits is an ONNX Runtime contrib op (com.microsoft domain), not a "
                            f"{prof.runtime} precision")
                not_measured.setdefault(target, {})[art.path] = why
                ctx.log(f"{target}: {art.path} not measured ({why})")
        for art in _runnable(ctx, prof):
            key = art.role if art.precision == "fp32" else f"{art.role}_{art.precision}"  # student_int8
            for batch in spec.batch_sizes:
                try:
                    m = device.measure(ctx.work / art.path, batch=batch, warmup=spec.warmup, runs=spec.runs,
                                       max_seconds=spec.max_seconds, precision=art.precision,
                                       **_dims(ctx, prof, art, batch))
                except DeviceError as e:  # one target's failure leaves the rest of the bundle intact
                    skipped[target] = f"{art.path}: {e}"
                    ctx.log(f"{target}: {art.path} not measured ({e})")
                    break
                m.artifact = art.path
                if art.extra.get("reduce_range") is False and m.host.get("int8_saturates"):
                    # A board the quantize stage could not see (remote, no options.int8_saturates) reports
                    # its CPU: int8 kernels that saturate on this file's full-range weights give wrong outputs.
                    note = (f"{target}: its CPU has no VNNI, so its int8 kernels saturate on the 8-bit weights of "
                            f"{art.path} (outputs may be wrong): set options.int8_saturates: true in its profile, "
                            "or quantize.reduce_range: true, and run again")
                    m.notes.append(note)
                    if target not in saturated:
                        saturated[target] = note
                        ctx.log(f"warning: {note}")
                m.add_roofline(flops.get(art.role), prof)
                if target in peaks and m.gflops:  # against the measured peak where there is one
                    m.peak_gflops = peaks[target]["gflops"]
                    m.roofline = m.gflops / m.peak_gflops
                    m.extra["peak_source"] = peaks[target]["source"]
                ctx.measurements.append(m)
                metrics.setdefault(target, {})[f"{key}_b{batch}_p50_ms"] = m.p50_ms
        for batch in spec.batch_sizes:
            d = metrics.get(target, {})
            if f"teacher_b{batch}_p50_ms" not in d or f"student_b{batch}_p50_ms" not in d:
                continue  # e.g. an NPU estimate of the student alone
            d[f"speedup_b{batch}"] = d[f"teacher_b{batch}_p50_ms"] / d[f"student_b{batch}_p50_ms"]
            ctx.log(f"{target} batch {batch}: student p50 {d[f'student_b{batch}_p50_ms']:.3f} ms, teacher "
                    f"{d[f'teacher_b{batch}_p50_ms']:.3f} ms ({d[f'speedup_b{batch}']:.1f}x faster)")
    return StageRecord("profile", config=spec.model_dump(mode="json"),
                       metrics={**metrics, "skipped": skipped, "peak_gflops": peaks, "flops": flops,
                                "params": params, **({"not_measured": not_measured} if not_measured else {}),
                                **({"int8_saturates": saturated} if saturated else {})},
                       outputs={"measurements": [m.to_dict() for m in ctx.measurements]})


def restore_profile(ctx: Context, rec: StageRecord) -> None:
    ctx.measurements = [Measurement.from_dict(d) for d in rec.outputs["measurements"]]


STAGES = {
    "analyze": (analyze, restore_analyze),
    "search": (search, restore_search),
    "prune": (prune, restore_prune),
    "distill": (distill, restore_distill),
    "quantize": (quantize, restore_quantize),
    "export": (export, restore_export),
    "profile": (profile, restore_profile),
}


# ------------------------------------------------------------------------------------------- the run

def _check_budgets(ctx: Context) -> list[dict]:
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


def _manifest(ctx: Context, budgets: list[dict]) -> dict:
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
        "stages": [ctx.records[n].to_dict() for n in STAGE_ORDER if n in ctx.records],
        "artifacts": [a.to_dict() for a in ctx.artifacts],
        "reference": [a.to_dict() for a in ctx.reference],
        "measurements": [m.to_dict() for m in ctx.measurements],
    }


def _finalize(ctx: Context, out: Path, force: bool) -> Path:
    budgets = _check_budgets(ctx)
    for b in budgets:
        if b["met"] is False:
            ctx.log(f"budget not met: {b['budget']} is {b['value']:.4g}, limit {b['limit']}")
    shutil.rmtree(ctx.scratch, ignore_errors=True)
    shutil.rmtree(ctx.work / "stages", ignore_errors=True)
    (ctx.work / "run.json").unlink(missing_ok=True)
    atomic_write(ctx.work / "recipe.yaml", dump_recipe(ctx.recipe))
    bench = Path(__file__).resolve().parent.parent / "devices" / "bench_onnxruntime.py"
    atomic_write(ctx.work / "bench.py", bench.read_bytes())
    manifest = _manifest(ctx, budgets)
    atomic_write(ctx.work / "report.md", report.markdown(manifest))
    report.html(manifest, ctx.work)  # report.html: the same with plots, one self-contained page
    manifest["files"] = file_hashes(ctx.work)
    write_json(ctx.work / MANIFEST, manifest)
    if out.exists():
        if not force:
            raise UserError(f"{out} appeared while running; the finished run stays in {ctx.work}")
        old = out.with_name(out.name + ".old")
        os.replace(out, old)
        shutil.rmtree(old)
    os.replace(ctx.work, out)
    return out


def _data_defaults(recipe: Recipe) -> dict:
    """A Hugging Face teacher lends the data its tokenizer."""
    t = recipe.teacher
    if t.model in HF_BUILDERS:
        return {"tokenizer_path": t.kwargs.get("path"), "tokenizer_package": t.kwargs.get("package")}
    if is_hf_dir(t.model):
        return {"tokenizer_path": t.model}
    return {}


def _context(recipe: Recipe, work: Path, log) -> Context:
    """Data, task, teacher and the recipe's student (if any), checked against each other."""
    torch.manual_seed(recipe.seed)
    data = load_data(recipe.data, recipe.seed, defaults=_data_defaults(recipe))
    task = get_task(recipe.task)
    teacher, origin = load_teacher(recipe, data, log=log)
    # Training a teacher on first use draws from the global RNG and loading a cached one does not, so the
    # student's initialisation must not depend on which happened.
    torch.manual_seed(recipe.seed)
    student, genome = build_student(recipe, data)
    if student is not None:
        s_width, t_width = check_fits(student, data, "student", task), check_fits(teacher, data, "teacher", task)
        if s_width != t_width and recipe.task == "classification":
            raise UserError(f"the student outputs {s_width} classes and the teacher {t_width}: "
                            "distillation needs the same classes")
    return Context(recipe, work, data, teacher, origin, student, genome, task=task, log=log)


def follower_rank() -> int:
    """This process's global rank when a launcher started it to join another process's run: Lightning's
    plain ``ddp`` re-runs the command for each extra device (LOCAL_RANK), torchrun and SLURM start one
    per device (RANK), a multi-node job one per node (NODE_RANK). 0 for the process that leads."""
    env = os.environ
    if env.get("RANK", "").isdigit():
        return int(env["RANK"])
    local, node = env.get("LOCAL_RANK", "0"), env.get("NODE_RANK", "0")
    return max(int(local) if local.isdigit() else 0, int(node) if node.isdigit() else 0)


def _follow(recipe: Recipe, work: Path, rank: int, log, wait_s: float = 24 * 3600) -> None:
    """A follower rank: wait for the leader's records of the stages before distillation, rebuild what
    they made (the searched or pruned student) from them, join the distillation, then leave
    everything else, the bundle included, to rank 0. It never creates, refuses or deletes the run
    directory, so --force and --resume on the re-run command line do no harm. Several nodes need the
    run directory on a disk they share."""
    from .distill.train import fit

    before = STAGE_ORDER[:STAGE_ORDER.index("distill")]
    markers = [work / "stages" / f"{n}.json" for n in before]
    deadline = time.time() + wait_s
    while not all(m.is_file() for m in markers):
        if time.time() > deadline:
            raise UserError(f"rank {rank}: rank 0's records of {', '.join(before)} never appeared in {work}")
        time.sleep(1.0)
    ctx = _context(recipe, work, log)
    for name, marker in zip(before, markers):
        STAGES[name][1](ctx, StageRecord.from_dict(json.loads(marker.read_text())))
    log(f"rank {rank}: joining the distillation of {work}; rank 0 writes the bundle")
    fit(ctx.student, ctx.teacher, ctx.data, recipe.distill, recipe.data, ctx.scratch / "checkpoints",
        seed=recipe.seed, log=log, val_metric=ctx.task.val_metric)
    return None


class RunLock:
    """An OS lock (flock) on ``<out>.lock`` held while a run uses ``<out>.partial``: a second run, --resume
    or --force on the same directory refuses at once, naming the holder. The kernel drops the lock when
    its process dies, so a run killed with -9 leaves it free for --resume. The file holds the holder's
    pid and start time, for the message."""

    def __init__(self, out: Path):
        self.path = out.with_name(out.name + ".lock")
        self.fd: int | None = None

    def acquire(self, work: Path) -> "RunLock":
        import fcntl

        self.path.parent.mkdir(parents=True, exist_ok=True)
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                held = os.read(fd, 200).decode(errors="replace").split()
                os.close(fd)
                who = f"pid {held[0]}, started {held[1]}" if len(held) >= 2 else "another process"
                raise UserError(f"a run ({who}) is using {work}; wait for it to finish, or stop it first") from None
            try:
                if os.stat(self.path).st_ino == os.fstat(fd).st_ino:
                    break  # the file we locked is still the lock file (a finishing run unlinks it)
            except FileNotFoundError:
                pass
            os.close(fd)
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()} {now()}\n".encode())
        self.fd = fd
        return self

    def release(self) -> None:
        if self.fd is not None:
            self.path.unlink(missing_ok=True)  # while still held: a waiting run then makes a fresh file
            os.close(self.fd)
            self.fd = None


def run(recipe: Recipe | str | Path | dict | None = None, out_dir: str | Path | None = None, *,
        overrides=(), resume: bool = False, force: bool = False, log: Callable[[str], None] | None = None) -> Path:
    """Run every stage of ``recipe`` and write the bundle; return the bundle's path."""
    source = str(recipe) if isinstance(recipe, (str, Path)) else None
    recipe = load_recipe(recipe, overrides)
    log = log or (lambda s: print(s, file=sys.stderr))
    out = Path(out_dir or Path("runs") / recipe.name)
    work = out.with_name(out.name + ".partial")
    rank = follower_rank()
    if rank:
        return _follow(recipe, work, rank, log)
    lock = RunLock(out).acquire(work)  # before looking at the directories: another run may be changing them
    try:
        return _run(recipe, source, out, work, overrides, resume, force, log)
    finally:
        lock.release()


def _run(recipe: Recipe, source, out: Path, work: Path, overrides, resume: bool, force: bool, log) -> Path:
    if out.exists() and not force:
        raise UserError(f"{out} already exists: pass --force to replace it, or --out to write elsewhere")
    if work.exists() and not resume:
        if not force:
            raise UserError(f"an unfinished run is in {work}: pass --resume to continue it, or --force to start over")
        shutil.rmtree(work)
    run_json = {"recipe": recipe.model_dump(mode="json")}
    if resume and (work / "run.json").is_file():
        before = json.loads((work / "run.json").read_text())
        if before.get("recipe") != run_json["recipe"]:
            raise UserError(f"--resume: the recipe differs from the one that started {work}; "
                            "use the same recipe, or --force to start over")
    for target in recipe.targets:
        load_profile(target)  # an unknown device fails now, before any work
    if recipe.search is not None:
        from .search.latency import load_predictors

        load_predictors(recipe)  # so does a missing or foreign search.predictor file
    fresh = not work.exists()
    work.mkdir(parents=True, exist_ok=True)
    for stray in work.rglob(".*.tmp"):  # a write cut short by a crash; its target was never replaced
        stray.unlink()
    write_json(work / "run.json", run_json)
    t_run = time.time()
    try:
        ctx = _context(recipe, work, log)
        parent = None
        for name in STAGE_ORDER:
            if name not in STAGES:
                continue
            stage, restore = STAGES[name]
            marker = work / "stages" / f"{name}.json"
            if resume and marker.is_file():
                rec = StageRecord.from_dict(json.loads(marker.read_text()))
                restore(ctx, rec)
                log(f"[{name}] done earlier ({rec.seconds:.1f} s), resumed from its record")
            else:
                log(f"[{name}]")
                t0, started = time.time(), now()
                torch.manual_seed(recipe.seed)
                rec = stage(ctx)
                rec.seconds, rec.started, rec.parent = round(time.time() - t0, 3), started, parent
                write_json(marker, rec.to_dict())
                hold("stage")  # tests only (COMPRESSOR_HOLD): act between stages on any host
            ctx.records[name] = rec
            if not rec.metrics.get("skipped"):  # a stage with no recipe section is nobody's parent
                parent = name
        bundle = _finalize(ctx, out, force)
    except BaseException:
        done = list((work / "stages").glob("*.json")) if work.exists() else []
        if fresh and not done:
            shutil.rmtree(work, ignore_errors=True)
        elif work.exists():
            again = " ".join(["compress run", *([source] if source else []), *(f"--set {o}" for o in overrides),
                              f"--out {out}", "--resume"])
            log(f"the finished stages are kept in {work}; `{again}` continues")
        raise
    log(f"bundle written to {bundle} in {time.time() - t_run:.0f} s")
    return bundle
