"""profile: each target device measures the bundle's files (or, labelled so, estimates them) at the
recipe's batch sizes; attained GFLOP/s against the device's peak; speedups of the student over the teacher."""
from __future__ import annotations

from devices import DeviceError, Measurement, get_device, load_profile
from devices.peak import gemm_peak_gflops
from exporters.artifact import Artifact

from ..bundle import StageRecord
from ..context import Context
from ..models import count_flops, count_params

name = "profile"
needs = ("student", "teacher", "artifacts", "reference", "data")


def skip(ctx: Context) -> str | None:
    return None if ctx.recipe.targets else "the recipe names no targets"


def run(ctx: Context) -> StageRecord:
    spec = ctx.recipe.profile
    metrics, unavailable, not_measured, saturated = {}, {}, {}, {}
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
            unavailable[target] = why
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
                    unavailable[target] = f"{art.path}: {e}"
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
    return StageRecord(name, config=spec.model_dump(mode="json"),
                       metrics={**metrics, "unavailable": unavailable, "peak_gflops": peaks, "flops": flops,
                                "params": params, **({"not_measured": not_measured} if not_measured else {}),
                                **({"int8_saturates": saturated} if saturated else {})},
                       outputs={"measurements": [m.to_dict() for m in ctx.measurements]})


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


def restore(ctx: Context, rec: StageRecord) -> None:
    ctx.measurements = [Measurement.from_dict(d) for d in rec.outputs["measurements"]]
