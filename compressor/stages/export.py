"""export: the student (and the teacher, for comparison) to ONNX, checked against PyTorch with ONNX
Runtime on held-out inputs, then the files each non-ONNX-Runtime target runs (OpenVINO IR, TensorRT
engine and trtexec script, int8 TFLite and Vela)."""
from __future__ import annotations

from pathlib import Path

from devices import load_profile
from exporters.artifact import Artifact

from ..bundle import StageRecord
from ..context import Context
from ..errors import StageError
from ..files import atomic_write
from ..models import HF_BUILDERS, is_hf_dir
from ..tasks import as_tuple, onnx_io

name = "export"
needs = ("student", "teacher", "data", "task", "artifacts", "teacher_onnx")


def skip(ctx: Context) -> str | None:
    return None  # every run exports


def run(ctx: Context) -> StageRecord:
    metrics, outputs = {}, {}
    for role, model, path in (("student", ctx.student, ctx.work / "model" / "student.onnx"),
                              ("teacher", ctx.teacher, ctx.scratch / "teacher.onnx")):
        # The teacher's file is analyze's, unless this run resumed after analyze.
        given = ctx.teacher_onnx if role == "teacher" and ctx.teacher_onnx else None
        try:
            art = shipped_onnx(ctx, model, path, role, given=given)
        except Exception as e:
            raise StageError("export", f"{role}: {e}") from None
        check = art.extra["parity"]
        art.path = path.relative_to(ctx.work).as_posix()
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
    return StageRecord(name, config=ctx.recipe.export.model_dump(mode="json"), metrics=metrics, outputs=outputs)


def shipped_onnx(ctx: Context, model, path: Path, role: str, *, given: Artifact | None = None,
                 opset: int | None = None) -> Artifact:
    """``model``'s ONNX file as the bundle ships it, checked against PyTorch on held-out inputs
    (``extra["parity"]``): ``given`` (a file exported before), else Optimum's for a Hugging Face classifier
    where Optimum takes it, else exporters.onnx.export_checked (TorchScript, torch.export where the trace
    does not match). ``opset``: instead of the recipe's."""
    from exporters.onnx import export_checked

    spec = ctx.recipe.export
    opset = opset or spec.opset
    x = ctx.example(2)
    return export_checked(model, as_tuple(x), path, ctx.example(spec.parity.samples), atol=spec.parity.atol,
                          rtol=spec.parity.rtol, log=lambda s: ctx.log(f"export: {role}: {s}"),
                          given=given or export_hf(ctx, model, x, path, role, opset), opset=opset,
                          dynamic_batch=spec.dynamic_batch, role=role, **onnx_io(x, ctx.task.output, spec.dynamic_batch))


def export_model(ctx: Context, model, path: Path, role: str, opset: int | None = None) -> Artifact:
    """``model``'s ONNX file, unchecked (analyze's teacher, for its FLOPs and for the export stage to check):
    Optimum's for a Hugging Face classifier where Optimum takes it, else torch.onnx.export. ``opset``: instead
    of the recipe's (ONNX Runtime's per-channel QDQ needs 13)."""
    from exporters.onnx import export_onnx

    spec = ctx.recipe.export
    opset = opset or spec.opset
    x = ctx.example(2)
    return export_hf(ctx, model, x, path, role, opset) or export_onnx(
        model, as_tuple(x), path, opset=opset, dynamic_batch=spec.dynamic_batch, role=role,
        **onnx_io(x, ctx.task.output, spec.dynamic_batch))


def export_hf(ctx: Context, model, x, path: Path, role: str, opset: int | None = None) -> Artifact | None:
    """A Hugging Face classifier through Optimum's exporter, where Optimum supports it and the data gives
    every input it takes; None (and a log line) where not: torch.onnx.export then runs as for any model."""
    from exporters import ExportError
    from exporters.onnx import export_optimum

    from ..intake import is_adapted, is_hf_model, unadapted

    if ctx.recipe.task != "classification" or not (is_hf_model(model) and is_adapted(model)):
        return None
    from ..hf import classifier_kind

    kind = classifier_kind(type(model).__name__)
    if kind is None or not ctx.recipe.export.dynamic_batch:
        return None
    task = kind[0]
    example = x if isinstance(x, dict) else {"pixel_values": x}
    try:
        with unadapted(model):
            return export_optimum(model, path, task=task, example_inputs=example,
                                  opset=opset or ctx.recipe.export.opset, role=role)
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
    from ..hf import tokenizer_files

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


def restore(ctx: Context, rec: StageRecord) -> None:
    ctx.artifacts.append(Artifact.from_dict(rec.outputs["student"]))  # after the quantize stage's int8 file
    ctx.reference = [Artifact.from_dict(rec.outputs["teacher"])]
    key = f"onnx_{ctx.metric}"
    ctx.quality.setdefault("student", {})[key] = rec.metrics["student"][key]
    ctx.artifacts += [Artifact.from_dict(d) for d in rec.outputs.get("targets", [])]
