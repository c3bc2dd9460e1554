"""ONNX Runtime's post-training quantization of an fp32 ONNX file: static QDQ (calibrated) and dynamic."""
from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path

from ..artifact import ExportError
from .graph import _FLOAT, _in_scope, index_math, module_path
from .run import _length, _named


class _Reader:
    """CalibrationDataReader over arrays of inputs (one, or a dict by input name), fed in batches
    (ORT calls get_next until None)."""

    def __init__(self, names: list[str], inputs, batch: int = 32):
        feeds = _named(names, inputs)
        n = _length(inputs)
        self.batches = [{k: v[i:i + batch] for k, v in feeds.items()} for i in range(0, n, batch)]
        self.i = 0

    def get_next(self):
        if self.i >= len(self.batches):
            return None
        self.i += 1
        return self.batches[self.i - 1]

    def rewind(self):
        self.i = 0


@contextlib.contextmanager
def _prepared(fp32, out, keep_float):
    """Run an ONNX Runtime quantizer in a temporary working directory (it and its calibrator leave
    large files there): yields (pre-processed model's path, its graph, output path, nodes kept float), then
    moves the output to ``out`` (a temporary name, then a rename). Paths are resolved first, so relative ones
    still mean the caller's directory."""
    import onnx
    from onnxruntime.quantization.shape_inference import quant_pre_process

    fp32, out = Path(fp32).resolve(), Path(out).resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    cwd = os.getcwd()
    with tempfile.TemporaryDirectory(prefix="compressor-ptq-") as tmp:
        os.chdir(tmp)
        try:
            pre = Path(tmp) / "pre.onnx"
            # Pre-processing folds BatchNorm into Conv (else ORT keeps a float Conv: no QLinearConv fusion)
            # and infers shapes; symbolic shape inference fails on some exported graphs, so skip it.
            quant_pre_process(str(fp32), str(pre), skip_symbolic_shape=True)
            graph = onnx.load(str(pre))
            excluded = [n.name for n in graph.graph.node if keep_float and _in_scope(module_path(n.name), keep_float)]
            missing = [k for k in keep_float if not any(_in_scope(module_path(n), [k]) for n in excluded)]
            if missing:
                why = (f"the node names of {fp32.name} carry no module paths (torch.export's names; the TorchScript "
                       "exporter keeps them)" if not any(module_path(n.name) for n in graph.graph.node) else
                       f"no node of {fp32.name} belongs to it (a module the exporter folded away, or one its node "
                       "names do not show)")
                raise ExportError(f"cannot keep {', '.join(missing)} in float: {why}")
            tmp_out = Path(tmp) / "int8.onnx"
            yield pre, graph.graph, tmp_out, excluded
            part = out.with_name(f".{out.name}.tmp")
            shutil.copyfile(tmp_out, part)
            os.replace(part, out)
        finally:
            os.chdir(cwd)


def quantize_static(fp32: str | Path, out: str | Path, calibration, *, activations: str = "uint8",
                    keep_float=(), per_channel: bool = True, reduce_range: bool = False) -> dict:
    """ONNX Runtime static QDQ quantization of ``fp32`` into ``out``; returns what it did.

    int8 per-channel symmetric weights always. Activations: ``uint8`` (asymmetric; what ONNX Runtime's
    x86 kernels run fastest) or ``int8`` (symmetric, zero point 0: what TensorRT requires). Nodes that
    belong to a module path in ``keep_float`` stay in float. ``reduce_range``: weights use 7 bits of the
    int8 range, for x86 CPUs without VNNI, whose u8 x s8 kernels otherwise saturate
    (devices.bench_onnxruntime.int8_saturates). Runs in a temporary directory because the quantizer (and
    its calibrator) leave large intermediate files in the working directory.
    """
    import onnxruntime as ort
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType
    from onnxruntime.quantization import quantize_static as ort_quantize_static

    if activations not in ("uint8", "int8"):
        raise ExportError(f"activations {activations!r}: use uint8 or int8")
    names = [i.name for i in ort.InferenceSession(str(fp32), providers=["CPUExecutionProvider"]).get_inputs()]
    with _prepared(fp32, out, keep_float) as (pre, graph, tmp_out, excluded):
        index = [n for n in index_math(graph) if n not in excluded]
        wide = [n for n in outliers(pre, graph, names, calibration) if n not in excluded + index]
        ort_quantize_static(
            str(pre), str(tmp_out), _Reader(names, calibration), quant_format=QuantFormat.QDQ,
            per_channel=per_channel, reduce_range=reduce_range, weight_type=QuantType.QInt8,
            activation_type=QuantType.QUInt8 if activations == "uint8" else QuantType.QInt8,
            nodes_to_exclude=excluded + index + wide, calibrate_method=CalibrationMethod.MinMax,
            # int8 mode is TensorRT's: zero points 0 and biases left float (it fuses them itself).
            extra_options={"ActivationSymmetric": activations == "int8", "WeightSymmetric": True,
                           "QuantizeBias": activations != "int8"})
    return {"tool": "onnxruntime.quantization.quantize_static", "onnxruntime": ort.__version__,
            "activations": activations, "weights": _weights(per_channel, reduce_range),
            "calibration_samples": _length(calibration), "calibration_method": "MinMax",
            "nodes_kept_float": excluded, **({"index_math_kept_float": index} if index else {}),
            **({"outliers_kept_float": wide} if wide else {})}


def outliers(pre: Path, graph, names: list[str], calibration, limit: float = 1e4, samples: int = 8) -> list[str]:
    """Nodes that make or read a float tensor reaching |v| >= ``limit`` (or not finite) on the first calibration
    samples: an attention mask's -inf or finfo.min (a causal decoder's, built in the graph), BERT's -10000, and
    the scores they are added to before the Softmax. One 8-bit grid cannot hold them and the values beside them
    (a Llama classifier's int8 accuracy fell from 0.99 to 0.49: the mask's scale came out infinite), so they
    stay float; the Softmax after them quantizes nothing a MatMul after it does not."""
    import numpy as np
    import onnx
    import onnxruntime as ort

    typed = {v.name: v for v in graph.value_info if v.type.tensor_type.elem_type in _FLOAT}
    known = {o.name for o in graph.output}
    extra = [typed[o] for n in graph.node for o in n.output if o in typed and o not in known]
    model = onnx.load(str(pre))
    model.graph.output.extend(extra)
    feeds = {k: v[:samples] for k, v in _named(names, calibration).items()}
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    outs = sess.get_outputs()
    del model
    big = set()
    for o, v in zip(outs, sess.run(None, feeds)):
        v = np.asarray(v)
        if v.dtype.kind == "f" and v.size and not (np.isfinite(v).all() and np.abs(v).max() < limit):
            big.add(o.name)
    return [n.name for n in graph.node if big & {*n.input, *n.output}]


def _weights(per_channel: bool, reduce_range: bool) -> str:
    return ("int8 symmetric " + ("per-channel" if per_channel else "per-tensor")
            + (", 7-bit range (reduce_range)" if reduce_range else ""))


def quantize_dynamic(fp32: str | Path, out: str | Path, *, keep_float=(), per_channel: bool = True,
                     reduce_range: bool = False) -> dict:
    """ONNX Runtime dynamic quantization: int8 weights (per channel), activations quantized at run time
    from each tensor's own range, so no calibration data. What Optimum's ORTQuantizer does for
    Transformers on CPUs (avx512_vnni config); its MatMulInteger kernels run in ONNX Runtime, not in
    TensorRT. Run in a temporary directory, as the static quantizer; ``reduce_range`` as there."""
    import onnxruntime as ort
    from onnxruntime.quantization import QuantType
    from onnxruntime.quantization import quantize_dynamic as ort_quantize_dynamic

    with _prepared(fp32, out, keep_float) as (pre, _, tmp_out, excluded):
        ort_quantize_dynamic(str(pre), str(tmp_out), per_channel=per_channel, reduce_range=reduce_range,
                             weight_type=QuantType.QInt8, nodes_to_exclude=excluded)
    return {"tool": "onnxruntime.quantization.quantize_dynamic", "onnxruntime": ort.__version__,
            "activations": "dynamic (uint8, range per tensor at run time)",
            "weights": _weights(per_channel, reduce_range), "nodes_kept_float": excluded}
