"""quantize: quantized distillation (QAT with the teacher as the loss) and post-training quantization.

Modes (recipe ``quantize.mode``):

    ptq-ort      ONNX Runtime static QDQ of the fp32 student ONNX, calibrated on training samples: the fast path.
    ptq-dynamic  ONNX Runtime dynamic int8 (per-channel weights, activations quantized at run time).
    ptq-nncf     NNCF post-training quantization of the PyTorch student, exported as QDQ.
    qat-kd       bits 8: NNCF fake quantization fine-tuned with the distillation losses against the teacher
                 (Polino et al.'s quantized distillation), exported as standard QDQ.
                 bits 2-4: Polino's bucketed uniform weight quantization (shadow fp weights, straight-through
                 gradient), fine-tuned the same way; the file stores 4-bit codes: Linear layers whose
                 in_features the bucket divides as ONNX Runtime's MatMulNBits, the rest folded at load.
    none         only the fp32 student ships (the stage is skipped).

The student in ``ctx.student`` stays fp32 (the export stage ships it too); this stage writes its own file,
``model/student.int8.onnx`` (or ``student.w<b>.onnx``), checks it, and measures its quality in ONNX Runtime.
"""
from __future__ import annotations

import copy
from pathlib import Path

import torch
from torch import nn

from exporters.artifact import Artifact

from ..bundle import StageRecord
from ..context import Context
from ..errors import StageError, UserError
from ..polino import BucketQuant, compressed_bits, w4_parity
from ..quantize import ORT_MODES, QUANTIZABLE, _bn_count, float_layers, fold_batchnorm, nncf_quantize, nncf_strip, parity
from ..tasks import as_tuple, call, onnx_io, take, to_numpy

name = "quantize"
needs = ("student", "teacher", "data", "task", "artifacts", "quality")

# Fewer calibration samples than this give activation ranges that swing with the sample.
MIN_CALIBRATION = 32


# ------------------------------------------------------------------------------------------ helpers

def activation_type(spec, targets: list[str]) -> tuple[str, str]:
    """(uint8 | int8, why). uint8 activations ran 1.8x faster than fp32 in ORT on x86, int8 slower; but
    TensorRT (and NPUs) need symmetric int8 with zero point 0, which every runtime accepts."""
    if spec.activations != "auto":
        return spec.activations, "set in the recipe"
    from devices import load_profile

    for t in targets:
        p = load_profile(t)
        forced = p.options.get("int8_activations")
        if forced in ("uint8", "int8"):
            return forced, f"{t} profile options.int8_activations"
        if p.kind != "cpu" or p.runtime == "tensorrt":
            return "int8", f"{t} is a {p.kind} ({p.runtime}): symmetric int8 activations"
    return "uint8", "CPU targets: uint8 activations run fastest in ONNX Runtime on x86"


def runs_openvino(targets: list[str]) -> bool:
    """Whether a target runs the int8 file in OpenVINO (then OpenVINO must run it and agree)."""
    from devices import load_profile

    return any(load_profile(t).runtime == "openvino" for t in targets)


def weight_range(spec, targets: list[str]) -> tuple[bool, str]:
    """(reduced, why): whether int8 weights keep to 7 bits. x86 CPUs without VNNI run u8 x s8 products
    through vpmaddubsw, which sums pairs in int16 and saturates on full-range weights, in ONNX Runtime and
    OpenVINO alike; 7-bit weights cannot overflow (ORT's reduce_range, NNCF's overflow fix)."""
    if spec.reduce_range != "auto":
        return spec.reduce_range, "set in the recipe"
    from devices import load_profile
    from devices.bench_onnxruntime import int8_saturates

    for t in targets:
        p = load_profile(t)
        if p.kind != "cpu":
            continue
        said = p.options.get("int8_saturates")
        if said is not None:
            if said:
                return True, f"{t} profile options.int8_saturates"
        elif p.local and int8_saturates():
            return True, f"{t} is this host, an x86 CPU without VNNI: its int8 kernels saturate on 8-bit weights"
    return False, "no CPU target whose int8 kernels saturate"


def _export(ctx: Context, model, path: Path, precision: str = "fp32"):
    """The student's ONNX export (inputs and dynamic axes as the export stage writes them)."""
    from exporters.onnx import export_onnx

    x = ctx.example(2)
    return export_onnx(model, as_tuple(x), path, opset=max(ctx.recipe.export.opset, 13), precision=precision,
                       **onnx_io(x, ctx.task.output, ctx.recipe.export.dynamic_batch))


def calibration_inputs(ctx: Context, spec):
    """Training samples for calibration: quantize.calibration of them, at least MIN_CALIBRATION."""
    n_train = len(ctx.data.train)
    n = min(spec.calibration, n_train)
    if n < MIN_CALIBRATION:
        have = f"quantize.calibration is {spec.calibration}" if spec.calibration < MIN_CALIBRATION else \
            f"the train split has only {n_train} samples"
        raise UserError(f"quantize: calibration set too small ({have}); at least {MIN_CALIBRATION} samples "
                        "are needed for stable activation ranges")
    if n < spec.calibration:
        ctx.log(f"quantize: calibration uses all {n} training samples ({spec.calibration} asked)")
    return ctx.data.tensors("train", limit=n)[0], n


def qat_fit(model, ctx, spec, what: str) -> dict:
    """Fine-tune ``model`` with the recipe's distillation losses against the teacher (fit() reused)."""
    from ..distill.train import fit

    # dense token tables: NNCF fake-quantizes an embedding's weight, whose quantizer's backward is no sparse kernel
    d = ctx.recipe.distill.model_copy(update={"epochs": spec.epochs, "lr": spec.lr, "lazy_embeddings": False})
    if d.trainer.precision == "auto":  # fake quantization trains in fp32: its grid is an fp32 grid
        d = d.model_copy(update={"trainer": d.trainer.model_copy(update={"precision": "32-true"})})
    for m in model.modules():
        # A Hugging Face speech feature encoder (Wav2Vec2's, HuBERT's) sets requires_grad on its input in training,
        # which NNCF's input quantizer has made a non-leaf ('you can only change requires_grad flags of leaf
        # variables'). The flag only serves gradient checkpointing; its weights still train.
        if getattr(m, "_requires_grad", None) is True and callable(getattr(m, "_freeze_parameters", None)):
            m._requires_grad = False
    try:
        return fit(model, ctx.teacher, ctx.data, d, ctx.recipe.data, ctx.scratch / f"qat-{what}",
                   seed=ctx.recipe.seed, log=ctx.log, val_metric=ctx.task.val_metric)
    except StageError as e:  # fit reports NaN as a distill error: it is this stage's
        raise StageError("quantize", f"{what} fine-tuning stopped: {str(e).split(': ', 1)[-1]}") from None


def _quality_onnx(path: Path, ctx) -> dict:
    """The task's metrics (accuracy, or agreement with the teacher and probe accuracy) of an ONNX file in
    ONNX Runtime, keyed onnx_<metric> as the export stage keys the fp32 file's."""
    return {f"onnx_{k}": v for k, v in ctx.task.score_onnx(path, ctx.data).items()}


def _evaluate(model, ctx) -> float:
    return ctx.score(model)[ctx.metric]


# ---------------------------------------------------------------------------------------- the modes

def ptq_ort(ctx, spec, calib, act, keep, reduce_range: bool = False) -> tuple[dict, Path]:
    from exporters.qdq import quantize_dynamic, quantize_static

    from .export import shipped_onnx

    fp32 = ctx.scratch / "quantize" / "student.fp32.onnx"
    # The export stage's file (Optimum's where it takes the model; checked against PyTorch on another batch, and
    # exported again with torch.export where the trace baked the example's batch in), at opset 13 or later for
    # per-channel QDQ.
    shipped_onnx(ctx, ctx.student, fp32, "student", opset=max(ctx.recipe.export.opset, 13))
    out = ctx.work / "model" / "student.int8.onnx"
    if spec.mode == "ptq-dynamic":
        return quantize_dynamic(fp32, out, keep_float=keep, reduce_range=reduce_range), out
    info = quantize_static(fp32, out, to_numpy(calib), activations=act, keep_float=keep, reduce_range=reduce_range)
    return info, out


def _nncf_export(q, ctx: Context):
    """The fake-quantized model, stripped to torch fake-quant ops, as standard QDQ in model/student.int8.onnx."""
    from exporters.qdq import fold_weight_quantizers, requantize_moved

    stripped = nncf_strip(q, take(ctx.example(2), 1))
    out = ctx.work / "model" / "student.int8.onnx"
    _export(ctx, stripped, out, precision="int8")
    fold_weight_quantizers(out)
    requantize_moved(out)  # a concat's or chunk's shared quantizer: the consumer fuses in ONNX Runtime too
    return stripped, out


def nncf_int8(ctx, spec, calib, act, keep, reduce_range: bool = False) -> tuple[dict, Path, nn.Module]:
    from ..plain import plain_layers
    from ..structural.plan import fold_parametrizations, folded_said

    model = copy.deepcopy(ctx.student).eval()
    # NNCF sees no constant weight behind a parametrization (weight_norm): it put no quantizer on those convs
    folded = fold_parametrizations(model)
    if folded:
        ctx.log(f"quantize: {folded_said(folded)}")
    # nor behind a layer's own forward (Falcon's x @ weight.T, BiT's weight standardisation)
    if plain := plain_layers(model, ctx.example(2)):
        ctx.log(f"quantize: {len(plain)} layers that compute their own weight made the plain layers they compute "
                f"({', '.join(plain[:4])}{' ...' if len(plain) > 4 else ''}), so NNCF quantizes them")
    if spec.fold_bn:
        model = fold_batchnorm(model, ctx.log)
    info = {"tool": "nncf", "activations": act, "bn_folded": _bn_count(model) == 0,
            "weights": "int8 symmetric per-channel" + (", 7-bit range (overflow fix)" if reduce_range else "")}
    q = nncf_quantize(model, calib, spec, act, keep, reduce_range)
    info["ptq_fake_quant_accuracy"] = _evaluate(q, ctx)
    if spec.mode == "qat-kd":
        ctx.log(f"quantize: NNCF int8 after calibration {info['ptq_fake_quant_accuracy']:.4f}; "
                f"fine-tuning {spec.epochs} epochs against the teacher")
        info["qat"] = qat_fit(q, ctx, spec, "nncf")
    info["fake_quant_accuracy"] = _evaluate(q, ctx)
    import nncf

    info["nncf"] = nncf.__version__
    stripped, out = _nncf_export(q, ctx)
    return info, out, stripped


def polino(ctx, spec, keep) -> tuple[dict, Path, nn.Module]:
    from torch.nn.utils import parametrize

    from exporters import ExportError
    from exporters.qdq import pack_w4

    model = fold_batchnorm(ctx.student, ctx.log) if spec.fold_bn else copy.deepcopy(ctx.student).eval()
    layers = {n: (spec.bits, spec.bucket) for n, m in model.named_modules()
              if isinstance(m, QUANTIZABLE) and not any(n == k or n.startswith(k + ".") for k in keep)}
    if not layers:
        raise UserError("quantize: no Conv/Linear layer is left to quantize after quantize.keep_float")
    mods = dict(model.named_modules())
    for n in layers:
        parametrize.register_parametrization(mods[n], "weight", BucketQuant(spec.bits, spec.bucket, spec.zero_point))
    info = {"tool": "polino-bucketed", "bits": spec.bits, "bucket": spec.bucket, "zero_point": spec.zero_point,
            "layers": len(layers),
            "bn_folded": _bn_count(model) == 0, "before_finetune_accuracy": _evaluate(model, ctx)}
    ctx.log(f"quantize: {spec.bits}-bit bucketed weights on {len(layers)} layers, accuracy before fine-tuning "
            f"{info['before_finetune_accuracy']:.4f}; fine-tuning {spec.epochs} epochs against the teacher")
    info["qat"] = qat_fit(model, ctx, spec, f"w{spec.bits}")
    info["fake_quant_accuracy"] = _evaluate(model, ctx)
    held_out = ctx.example(64)  # a real batch through the fake-quantized model (the BucketQuant forward)
    with torch.no_grad():
        reference = call(model.eval(), held_out)
    # Integer zero points: the grid (scale, zero point per bucket) comes from the shadow weight, before baking;
    # the quantized weight alone does not give it back (its min and max need not be on levels 0 and 2^b - 1).
    grids = {n: mods[n].parametrizations.weight[0].grid(mods[n].parametrizations.weight.original) for n in layers}
    for n in layers:  # bake the quantized values into plain weights
        parametrize.remove_parametrizations(mods[n], "weight", leave_parametrized=True)
    fp32_bits = sum(p.numel() for p in model.parameters()) * 32 + \
        sum(b.numel() * b.element_size() * 8 for b in model.buffers())
    info["size"] = {"fp32_bytes": fp32_bits // 8,
                    "compressed_bytes": compressed_bits(model, layers, spec.zero_point) // 8}
    info["size"]["ratio"] = info["size"]["fp32_bytes"] / info["size"]["compressed_bytes"]
    grid = ctx.scratch / "quantize" / f"student.w{spec.bits}-grid.onnx"
    _export(ctx, model, grid)
    out = ctx.work / "model" / f"student.w{spec.bits}.onnx"
    # Linear layers whose buckets are K-blocks become MatMulNBits (ORT computes with the 4-bit codes); the
    # rest keep 4-bit codes that ORT folds to fp32 at session start. The record says which and why.
    weights = {n: {"weight": mods[n].weight.detach().cpu().numpy(), "bits": b, "bucket": k,
                   "kind": type(mods[n]).__name__, **({"grid": grids[n]} if grids[n] else {})}
               for n, (b, k) in layers.items()}
    try:
        info["export"] = pack_w4(grid, out, weights)
    except ExportError as e:
        raise StageError("quantize", f"4-bit ONNX: {e}") from None
    nbits, folded = info["export"]["matmulnbits"], info["export"]["folded"]
    ctx.log(f"quantize: {len(nbits)} of {len(layers)} layers as MatMulNBits"
            + (f"; folded at load: {', '.join(f'{n} ({why})' for n, why in folded.items())}" if folded else ""))
    info["parity"] = w4_parity(out, reference, held_out)
    return info, out, model


# ------------------------------------------------------------------------------------- the stage

def skip(ctx: Context) -> str | None:
    return "quantize.mode is none" if ctx.recipe.quantize.mode == "none" else None


def run(ctx: Context) -> StageRecord:
    from exporters.onnx import describe
    from exporters.qdq import check_qdq

    spec = ctx.recipe.quantize
    config = spec.model_dump(mode="json")
    keep, own = float_layers(ctx.student, spec, ctx.log)
    (ctx.scratch / "quantize").mkdir(parents=True, exist_ok=True)
    held_out = ctx.example(64)
    if spec.bits < 8:
        info, out, model = polino(ctx, spec, keep)
        precision, checks = f"w{spec.bits}", {}
    else:
        if spec.mode == "ptq-dynamic":  # ranges come from each tensor at run time: nothing to calibrate
            calib, act, why = None, "dynamic", "ptq-dynamic quantizes activations at run time"
            ctx.log("quantize: ptq-dynamic, int8 per-channel weights, activations quantized at run time")
        else:
            calib, n = calibration_inputs(ctx, spec)
            act, why = activation_type(spec, ctx.recipe.targets)
            ctx.log(f"quantize: {spec.mode}, {n} calibration samples, {act} activations ({why})")
        reduced, reduced_why = weight_range(spec, ctx.recipe.targets)
        if reduced:
            ctx.log(f"quantize: 7-bit int8 weights ({reduced_why})")
        if spec.mode in ("ptq-ort", "ptq-dynamic"):
            info, out = ptq_ort(ctx, spec, calib, act, keep, reduced)
            with torch.no_grad():
                ref, what = call(ctx.student.eval(), held_out), "fp32 PyTorch"
        else:
            info, out, model = nncf_int8(ctx, spec, calib, act, keep, reduced)
            with torch.no_grad():
                ref, what = call(model.eval(), held_out), "fake-quantized PyTorch"
        info.update(activations_why=why, reduce_range=reduced, reduce_range_why=reduced_why)
        if isinstance(ctx.student, nn.Sequential) and spec.mode not in ORT_MODES:
            keep, own = keep + [f"net.{k}" for k in keep], own + [f"net.{k}" for k in own]  # NNCF ran wrapped (_Wrap)
        try:
            checks = {} if spec.mode == "ptq-dynamic" else check_qdq(out, keep_float=keep, own=own)
        except Exception as e:
            raise StageError("quantize", str(e)) from None
        info["parity"] = parity(out, ref, held_out, spec.parity_tol, what, reduced,
                                openvino=runs_openvino(ctx.recipe.targets), log=ctx.log)
        precision = "int8"
    info.update(float_layers=keep, own_weights=own)
    quality = _quality_onnx(out, ctx)
    acc = quality[f"onnx_{ctx.metric}"]
    art = describe(out, precision=precision, role="student", parent="quantize")
    art.path = out.relative_to(ctx.work).as_posix()
    art.extra.update(mode=spec.mode, bits=spec.bits, checks=checks, parity=info.get("parity"),
                     **({"reduce_range": info["reduce_range"]} if "reduce_range" in info else {}))
    nbits = info.get("export", {}).get("matmulnbits")
    if nbits:
        art.extra.update(matmulnbits=len(nbits), folded=info["export"]["folded"], note=info["export"]["note"])
    metrics = {**info, "checks": checks, **quality, "bytes": art.bytes}
    # Device profiles list compute precisions. A w<b> file with MatMulNBits computes with its 4-bit weights
    # in ONNX Runtime and is measured where a profile lists its precision (local-cpu: w4); one with only
    # folded weights computes in fp32 (ORT folds them at load): it ships, but is not a precision of its own.
    if precision == "int8" or nbits:
        ctx.artifacts.append(art)
    ctx.quality[f"student_{precision}"] = {**quality, "mode": spec.mode,
                                           **({"fake_quant_accuracy": info["fake_quant_accuracy"]}
                                              if "fake_quant_accuracy" in info else {})}
    ctx.log(f"quantize: {art.path} ({art.bytes / 1e6:.3f} MB), ONNX Runtime {ctx.metric} {acc:.4f}"
            + (f", {checks['quantized_nodes']} quantized compute nodes" if checks else ""))
    fp32 = (ctx.quality.get("student") or {}).get(ctx.metric)
    if fp32 and acc < fp32 - 0.05 * abs(fp32):  # no parity bound holds an ORT file to fp32: say so here
        ctx.log(f"quantize: warning: {ctx.metric} {acc:.4f} in {precision} against {fp32:.4f} in fp32; keep the "
                "layers that lose it in float (quantize.keep_float) or fine-tune in int8 (quantize.mode: qat-kd)")
    return StageRecord(name, config=config, metrics=metrics, outputs={"student": art.to_dict()})


def restore(ctx: Context, rec: StageRecord) -> None:
    if "student" not in rec.outputs:
        return
    art = Artifact.from_dict(rec.outputs["student"])
    if art.precision == "int8" or art.extra.get("matmulnbits"):
        ctx.artifacts.append(art)
    q = {k: v for k, v in rec.metrics.items() if k.startswith("onnx_")} | {"mode": rec.config["mode"]}
    if "fake_quant_accuracy" in rec.metrics:
        q["fake_quant_accuracy"] = rec.metrics["fake_quant_accuracy"]
    ctx.quality[f"student_{art.precision}"] = q
