"""The quantize stage: quantized distillation (QAT with the teacher as the loss) and post-training quantization.

Modes (recipe ``quantize.mode``):

    ptq-ort   ONNX Runtime static QDQ of the fp32 student ONNX, calibrated on training samples: the fast path.
    ptq-nncf  NNCF post-training quantization of the PyTorch student, exported as QDQ.
    qat-kd    bits 8: NNCF fake quantization fine-tuned with the distillation losses against the teacher
              (Polino et al.'s quantized distillation), exported as standard QDQ.
              bits 2-4: Polino's bucketed uniform weight quantization (shadow fp weights, straight-through
              gradient), fine-tuned the same way; the file stores 4-bit codes: Linear layers whose
              in_features the bucket divides as ONNX Runtime's MatMulNBits, the rest folded at load.
    none      only the fp32 student ships.

The student in ``ctx.student`` stays fp32 (the export stage ships it too); this stage writes its own file,
``model/student.int8.onnx`` (or ``student.w<b>.onnx``), checks it, and measures its accuracy in ONNX Runtime.
NNCF, torchao and OpenVINO are optional and imported only here, when a mode needs them.
"""
from __future__ import annotations

import copy
import re
import warnings
from pathlib import Path

import torch
from torch import nn

from .bundle import StageRecord
from .errors import StageError, UserError

# Fewer calibration samples than this give activation ranges that swing with the sample.
MIN_CALIBRATION = 32

# Layers the int8 quantizers (ORT, NNCF) and Polino's weight quantizer handle. Norms stay float (folded
# or cheap); any other layer with its own weights is one the quantizers have no rule for.
QUANTIZABLE = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.Linear)
FLOAT_OK = (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm, nn.Embedding)


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


def _export(ctx, model, path: Path, precision: str = "fp32"):
    """The student's ONNX export (inputs and dynamic axes as the export stage writes them)."""
    from exporters.onnx import export_onnx

    from .tasks import as_tuple, onnx_io

    x = ctx.example(2)
    return export_onnx(model, as_tuple(x), path, opset=max(ctx.recipe.export.opset, 13), precision=precision,
                       **onnx_io(x, ctx.task.output, ctx.recipe.export.dynamic_batch))


def calibration_inputs(ctx, spec):
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


def float_layers(model: nn.Module, spec, log=print) -> tuple[list[str], list[str]]:
    """(module paths kept in float, of which those the quantizer cannot handle). Raises on unknown paths,
    or on an unhandled layer when ``allow_float`` is off."""
    names = dict(model.named_modules())
    weighted = [n for n, m in names.items() if n and isinstance(m, QUANTIZABLE)]
    keep = list(spec.keep_float) if spec.keep_float is not None else \
        ([weighted[0], weighted[-1]] if spec.bits < 8 and weighted else [])
    unknown = [p for p in keep if p not in names]
    if unknown:
        raise UserError(f"quantize.keep_float: no module {', '.join(map(repr, unknown))} in the student "
                        f"(its layers: {', '.join(weighted[:12])}{' ...' if len(weighted) > 12 else ''})")
    unhandled = []
    for n, m in names.items():
        if not n or isinstance(m, QUANTIZABLE + FLOAT_OK) or any(n == k or n.startswith(k + ".") for k in keep):
            continue
        if any(True for _ in m.parameters(recurse=False)):
            unhandled.append(n)
            if not spec.allow_float:
                raise UserError(f"quantize: layer {n!r} ({type(m).__name__}) has weights the {spec.mode} "
                                "quantizer cannot handle; add it to quantize.keep_float or set "
                                "quantize.allow_float: true")
            log(f"warning: quantize: layer {n!r} ({type(m).__name__}) cannot be quantized; kept in float")
    return keep + unhandled, unhandled


class _Wrap(nn.Module):
    """nncf.quantize fails on a top-level nn.Sequential: wrap it (paths gain a 'net.' prefix)."""

    def __init__(self, net):
        super().__init__()
        self.net = net

    def forward(self, x):
        return self.net(x)


def fold_batchnorm(model: nn.Module, log=print) -> nn.Module:
    """A copy with each Conv->BatchNorm folded into the Conv (BN replaced by Identity), so the quantized
    weights are the ones that ship and TensorRT sees Q/DQ right on the Conv. torch.fx finds the pairs, but
    the copy keeps the user's own module class and paths (NNCF takes a GraphModule down another backend).
    Unchanged, with a note, when symbolic tracing cannot follow the model."""
    from torch.nn.utils.fusion import fuse_conv_bn_eval

    model = copy.deepcopy(model).eval()
    if not _bn_count(model):
        return model  # nothing to fold (Transformers use LayerNorm)
    try:
        graph = torch.fx.symbolic_trace(model).graph
    except Exception as e:
        log(f"quantize: BatchNorm not folded (torch.fx cannot trace {type(model).__name__}: {type(e).__name__})")
        return model
    mods = dict(model.named_modules())
    calls = [n.target for n in graph.nodes if n.op == "call_module"]
    convs = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
    for node in graph.nodes:
        src = node.args[0] if node.args else None
        if not (node.op == "call_module" and isinstance(mods.get(node.target), nn.modules.batchnorm._BatchNorm)
                and getattr(src, "op", None) == "call_module" and isinstance(mods.get(src.target), convs)
                and len(src.users) == 1 and calls.count(src.target) == 1 and calls.count(node.target) == 1):
            continue
        for path, new in ((src.target, fuse_conv_bn_eval(mods[src.target], mods[node.target])),
                          (node.target, nn.Identity())):
            parent, _, name = path.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, name, new)
    return model


def _bn_count(model: nn.Module) -> int:
    return sum(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


def qat_fit(model, ctx, spec, what: str) -> dict:
    """Fine-tune ``model`` with the recipe's distillation losses against the teacher (fit() reused)."""
    from .distill.train import fit

    d = ctx.recipe.distill.model_copy(update={"epochs": spec.epochs, "lr": spec.lr})
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


def _parity(path: Path, reference, x, tol: float, what: str, reduced: bool = True) -> dict:
    """ORT (and OpenVINO, when installed) against ``reference`` outputs. Against the fake-quantized model,
    raise when the worst difference exceeds ``tol`` times the largest |output|: runtimes run int8 kernels
    whose requantization rounds differently from float fake quant (on the quickstart ~1% of the logit
    range, while int8 vs fp32 differ by ~10%). Against fp32 (ORT PTQ has no fake-quant model) it only reports.

    A file with full-range int8 weights (``reduced`` False) made on a host whose int8 kernels saturate, for
    targets that do not: both runtimes would be off here and right there. The enforced check then runs
    ORT on the graph as written (optimizations off: DequantizeLinear and the float op, no integer kernel),
    reports what the integer kernels gave beside it, and does not run OpenVINO."""
    import numpy as np

    from devices.bench_onnxruntime import int8_saturates
    from exporters.qdq import run_onnxruntime, run_openvino

    from .tasks import size, to_numpy

    ref = reference if isinstance(reference, np.ndarray) else reference.detach().numpy()
    scale = float(np.abs(ref).max()) or 1.0
    out = {"against": what, "tolerance": f"{tol} x max|output| = {tol * scale:.3g}", "samples": size(x)}
    enforced = what != "fp32 PyTorch"
    runtimes = (("onnxruntime", run_onnxruntime, enforced), ("openvino", run_openvino, enforced))
    if enforced and not reduced and int8_saturates():
        out["note"] = ("8-bit weights on a host whose int8 kernels saturate (x86 without VNNI): ONNX Runtime "
                       "checked with graph optimizations off, OpenVINO not run")
        runtimes = (("onnxruntime_integer_kernels", run_onnxruntime, False),
                    ("onnxruntime", lambda p, v: run_onnxruntime(p, v, optimized=False), True))
    for rt, fn, enforce in runtimes:
        try:
            got = fn(path, to_numpy(x))
        except Exception as e:
            raise StageError("quantize", f"{rt} cannot run {path.name}: {type(e).__name__}: "
                             f"{str(e).splitlines()[0][:200]}") from None
        if got is None:
            out[rt] = "not installed (skipped)"
            continue
        diff = float(np.abs(got - ref).max())
        out[rt] = {"max_abs": diff, "max_rel_to_range": diff / scale,
                   "top1_agreement": float((got.argmax(-1) == ref.argmax(-1)).mean())}
        if enforce and diff > tol * scale:
            raise StageError("quantize", f"{rt} output of {path.name} differs from the {what} model by "
                             f"{diff:.3g}, {diff / scale:.1%} of the output range (quantize.parity_tol {tol})")
    return out


# ---------------------------------------------------------------------------------------- the modes

def ptq_ort(ctx, spec, calib, act, keep, reduce_range: bool = False) -> tuple[dict, Path]:
    from exporters.qdq import quantize_dynamic, quantize_static

    from .tasks import to_numpy

    fp32 = ctx.scratch / "quantize" / "student.fp32.onnx"
    _export(ctx, ctx.student, fp32)
    out = ctx.work / "model" / "student.int8.onnx"
    if spec.mode == "ptq-dynamic":
        return quantize_dynamic(fp32, out, keep_float=keep, reduce_range=reduce_range), out
    info = quantize_static(fp32, out, to_numpy(calib), activations=act, keep_float=keep, reduce_range=reduce_range)
    return info, out


def _is_transformer(model: nn.Module) -> bool:
    return any(isinstance(m, (nn.MultiheadAttention, nn.TransformerEncoderLayer)) or
               type(m).__name__.endswith(("SelfAttention", "Attention")) for m in model.modules())


def _nncf_quantize(model, calib, spec, act, keep, ctx, reduce_range: bool = False):
    import os

    # NNCF compiles a C++ extension on first use (~30 s idle) and gives up after 60 s: on a busy
    # machine that is not enough. Ten minutes, unless the user set their own.
    os.environ.setdefault("NNCF_EXTENSION_LOAD_TIMEOUT", "600")
    try:
        import nncf
    except ImportError:
        raise UserError(f"quantize.mode {spec.mode} needs NNCF: pip install 'compressor[quant]' "
                        "(nncf and torchao), or use quantize.mode: ptq-ort") from None
    if isinstance(model, nn.Sequential):
        model = _Wrap(model)
        keep = [f"net.{k}" for k in keep]
    from .tasks import size, take

    batches = [take({k: v[i:] for k, v in calib.items()} if isinstance(calib, dict) else calib[i:], 32)
               for i in range(0, size(calib), 32)]
    # NNCF's node names are module paths with '/' (stem/0/conv2d/0): ignore everything under a kept path.
    ignored = nncf.IgnoredScope(patterns=[f"^{re.escape(k.replace('.', '/'))}/.*" for k in keep], validate=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            # Transformers get NNCF's own scheme (no quantizers on the softmax/LayerNorm paths).
            kind = {"model_type": nncf.ModelType.TRANSFORMER} if _is_transformer(model) else {}
            if reduce_range:  # 7-bit weights everywhere (NNCF's default fixes only the first layer)
                from nncf.quantization.advanced_parameters import AdvancedQuantizationParameters, OverflowFix

                kind["advanced_parameters"] = AdvancedQuantizationParameters(overflow_fix=OverflowFix.ENABLE)
            q = nncf.quantize(model.eval(), nncf.Dataset(batches), subset_size=len(batches), ignored_scope=ignored,
                              **kind)
        except Exception as e:
            raise StageError("quantize", f"nncf.quantize failed on {type(model).__name__}: {type(e).__name__}: "
                             f"{str(e).splitlines()[0][:300]}") from None
    if act == "int8":
        # TensorRT wants signed int8 with zero point 0 everywhere; NNCF makes post-ReLU quantizers unsigned,
        # and its HW configs reject signedness_to_force. Flipping them keeps each range (the symmetric
        # scale is the range's end) at one bit less resolution, which QAT then trains with.
        from nncf.torch.quantization.layers import SymmetricQuantizer

        for mod in q.modules():
            if isinstance(mod, SymmetricQuantizer) and not mod.signed:
                mod.signed = True
    return q


def _nncf_export(q, ctx, spec):
    """nncf.strip(NATIVE) turns NNCF's quantizers into torch fake-quant ops, which the TorchScript
    exporter writes as standard QuantizeLinear/DequantizeLinear; without strip it writes a custom
    FakeQuantize op ORT rejects, and the dynamo exporter fails on them."""
    import nncf

    from exporters.qdq import fold_weight_quantizers

    from .tasks import take

    x = ctx.example(2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            stripped = nncf.strip(q.eval(), strip_format=nncf.StripFormat.NATIVE, example_input=take(x, 1))
        except ImportError as e:
            raise UserError(f"nncf.strip needs torchao ({e}): pip install 'compressor[quant]'") from None
    out = ctx.work / "model" / "student.int8.onnx"
    _export(ctx, stripped, out, precision="int8")
    fold_weight_quantizers(out)
    return stripped, out


def nncf_int8(ctx, spec, calib, act, keep, reduce_range: bool = False) -> tuple[dict, Path, nn.Module]:
    model = fold_batchnorm(ctx.student, ctx.log) if spec.fold_bn else copy.deepcopy(ctx.student).eval()
    info = {"tool": "nncf", "activations": act, "bn_folded": _bn_count(model) == 0,
            "weights": "int8 symmetric per-channel" + (", 7-bit range (overflow fix)" if reduce_range else "")}
    q = _nncf_quantize(model, calib, spec, act, keep, ctx, reduce_range)
    info["ptq_fake_quant_accuracy"] = _evaluate(q, ctx)
    if spec.mode == "qat-kd":
        ctx.log(f"quantize: NNCF int8 after calibration {info['ptq_fake_quant_accuracy']:.4f}; "
                f"fine-tuning {spec.epochs} epochs against the teacher")
        info["qat"] = qat_fit(q, ctx, spec, "nncf")
    info["fake_quant_accuracy"] = _evaluate(q, ctx)
    import nncf

    info["nncf"] = nncf.__version__
    stripped, out = _nncf_export(q, ctx, spec)
    return info, out, stripped


# ------------------------------------------------------- Polino: bucketed uniform weight quantization

def _buckets(w: torch.Tensor, bucket: int) -> torch.Tensor:
    """``w`` flattened into rows of ``bucket`` values; the last row is padded with the last value, so the
    padding never widens the last bucket's range."""
    flat = w.reshape(-1)
    pad = (-flat.numel()) % bucket
    if pad:
        flat = torch.cat([flat, flat[-1:].expand(pad)])
    return flat.view(-1, bucket)


def integer_grid(w: torch.Tensor, bits: int, bucket: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per bucket of ``w`` (flattened, padded as ``bucket_quantize``): (scale, zero point), each (n_buckets, 1).

    Asymmetric b-bit quantization with an integer zero point: scale = (max - min) / (2^b - 1), zp =
    clamp(round(-min / scale), 0, 2^b - 1). The range is first widened to hold 0 (min <= 0 <= max), as
    ONNX Runtime's own block quantizer does: for a bucket of only positive (or only negative) values the
    zero point would otherwise be clamped and the top of the range clipped. Buckets that straddle 0 (almost
    all of a trained layer's) are quantized over exactly their own range."""
    b = _buckets(w, bucket)
    lo = b.min(1, keepdim=True).values.clamp_max(0)
    hi = b.max(1, keepdim=True).values.clamp_min(0)
    levels = 2 ** bits - 1
    scale = ((hi - lo) / levels).clamp_min(1e-12)
    zp = torch.round(-lo / scale).clamp(0, levels)
    return scale, zp


def bucket_quantize(w: torch.Tensor, bits: int, bucket: int = 256, zero_point: str = "float") -> torch.Tensor:
    """Polino et al.: flatten, buckets of ``bucket``. ``zero_point="float"`` is Polino's own: per bucket
    alpha = max - min, beta = min, v = (w - beta) / alpha rounded to 2^b levels, w_q = alpha * v_q + beta.
    ``"integer"``: q = clamp(round(w / scale) + zp, 0, 2^b - 1), w_q = (q - zp) * scale with the scale and
    integer zero point of ``integer_grid`` (what MatMulNBits' uint8 zero points compute)."""
    b = _buckets(w, bucket)
    levels = 2 ** bits - 1
    if zero_point == "integer":
        scale, zp = integer_grid(w, bits, bucket)
        q = (torch.round(b / scale) + zp).clamp(0, levels)
        return ((q - zp) * scale).reshape(-1)[:w.numel()].view_as(w)
    if zero_point != "float":
        raise ValueError(f"zero_point {zero_point!r}: use integer or float")
    lo = b.min(1, keepdim=True).values
    alpha = (b.max(1, keepdim=True).values - lo).clamp_min(1e-12)
    q = torch.round((b - lo) / alpha * levels) / levels * alpha + lo
    return q.reshape(-1)[:w.numel()].view_as(w)


class BucketQuant(nn.Module):
    """A parametrization: the module keeps the fp32 shadow weight (``parametrizations.weight.original``),
    the forward sees the quantized one, and the gradient passes straight through to the shadow weight."""

    def __init__(self, bits: int, bucket: int, zero_point: str = "float"):
        super().__init__()
        self.bits, self.bucket, self.zero_point = bits, bucket, zero_point

    def forward(self, w):
        return w + (bucket_quantize(w, self.bits, self.bucket, self.zero_point) - w).detach()

    def grid(self, w) -> dict | None:
        """For integer zero points, the per-bucket {"scales", "zero_points"} (numpy, flattened bucket order)
        of the shadow weight ``w``: what the exporter writes. None for float zero points: the exporter
        reads Polino's alpha and beta back from the quantized weight (its min and max are on the grid)."""
        if self.zero_point != "integer":
            return None
        import numpy as np

        with torch.no_grad():
            scale, zp = integer_grid(w.detach(), self.bits, self.bucket)
        return {"scales": scale.reshape(-1).cpu().numpy().astype(np.float32),
                "zero_points": zp.reshape(-1).cpu().numpy().astype(np.uint8)}


def compressed_bits(model: nn.Module, quantized: dict[str, tuple[int, int]], zero_point: str = "float") -> int:
    """b bits per quantized weight + per bucket two fp32 numbers (alpha, beta; float zero points) or an fp32
    scale and a b-bit zero point (integer zero points); 32 bits for the rest."""
    total = 0
    for name, p in model.named_parameters():
        mod = name.rsplit(".", 1)[0]
        if name.endswith("weight") and mod in quantized:
            bits, bucket = quantized[mod]
            total += p.numel() * bits + -(-p.numel() // bucket) * (64 if zero_point == "float" else 32 + bits)
        else:
            total += p.numel() * 32
    return total + sum(b.numel() * b.element_size() * 8 for b in model.buffers())


def polino(ctx, spec, keep) -> tuple[dict, Path, nn.Module]:
    from torch.nn.utils import parametrize

    from exporters import ExportError
    from exporters.qdq import pack_w4

    from .tasks import call

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


# 4-bit codes times a float scale, plus a float offset: the file and the fake-quantized model compute the same
# weights up to fp32 rounding; what differs is the summation order of ORT's kernels (measured ~1e-7 relative).
W4_ATOL, W4_RTOL = 1e-4, 1e-3


def w4_parity(path: Path, reference, x, atol: float = W4_ATOL, rtol: float = W4_RTOL) -> dict:
    """ONNX Runtime's output of the 4-bit file against the fake-quantized PyTorch model's (``reference``,
    computed with the BucketQuant parametrization on) on the batch ``x``; raises beyond |d| <= atol + rtol|ref|."""
    import numpy as np

    from exporters.qdq import run_onnxruntime

    from .tasks import size, to_numpy

    ref = reference if isinstance(reference, np.ndarray) else \
        (reference[0] if isinstance(reference, (tuple, list)) else reference).detach().cpu().numpy()
    try:
        got = run_onnxruntime(path, to_numpy(x))
    except Exception as e:
        raise StageError("quantize", f"onnxruntime cannot run {path.name}: {type(e).__name__}: "
                         f"{str(e).splitlines()[0][:200]}") from None
    diff = np.abs(got - ref)
    out = {"against": "fake-quantized PyTorch (BucketQuant)", "runtime": "onnxruntime CPU", "samples": size(x),
           "max_abs": float(diff.max()), "max_rel_to_range": float(diff.max() / (np.abs(ref).max() or 1.0)),
           "tolerance": f"|ORT - PyTorch| <= {atol} + {rtol} x |PyTorch|"}
    if not np.all(diff <= atol + rtol * np.abs(ref)):
        raise StageError("quantize", f"4-bit ONNX {path.name} differs from the fake-quantized model by up to "
                         f"{out['max_abs']:.3g} ({out['tolerance']})")
    return out


# ------------------------------------------------------------------------------------- the stage

def stage(ctx) -> StageRecord:
    from exporters.onnx import describe
    from exporters.qdq import check_qdq

    from .tasks import call

    spec = ctx.recipe.quantize
    config = spec.model_dump(mode="json")
    if spec.mode == "none":
        return StageRecord("quantize", config=config, metrics={"mode": "none", "skipped": "quantize.mode is none"})
    keep, unhandled = float_layers(ctx.student, spec, ctx.log)
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
        if isinstance(ctx.student, nn.Sequential) and spec.mode not in ("ptq-ort", "ptq-dynamic"):
            keep = keep + [f"net.{k}" for k in keep]  # NNCF ran on the wrapped model (_Wrap)
        try:
            checks = {} if spec.mode == "ptq-dynamic" else check_qdq(out, keep_float=keep)
        except Exception as e:
            raise StageError("quantize", str(e)) from None
        info["parity"] = _parity(out, ref, held_out, spec.parity_tol, what, reduced)
        precision = "int8"
    info.update(float_layers=keep, unhandled_layers=unhandled)
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
    return StageRecord("quantize", config=config, metrics=metrics, outputs={"student": art.to_dict()})


def restore(ctx, rec: StageRecord) -> None:
    from exporters.artifact import Artifact

    if "student" not in rec.outputs:
        return
    art = Artifact.from_dict(rec.outputs["student"])
    if art.precision == "int8" or art.extra.get("matmulnbits"):
        ctx.artifacts.append(art)
    q = {k: v for k, v in rec.metrics.items() if k.startswith("onnx_")} | {"mode": rec.config["mode"]}
    if "fake_quant_accuracy" in rec.metrics:
        q["fake_quant_accuracy"] = rec.metrics["fake_quant_accuracy"]
    ctx.quality[f"student_{art.precision}"] = q
