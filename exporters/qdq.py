"""INT8 (and low-bit) ONNX in the standard QuantizeLinear/DequantizeLinear (QDQ) form.

File -> file, like every exporter (it never imports compressor):

- ``quantize_static``: ONNX Runtime's post-training static quantization of an fp32 ONNX file.
- ``check_qdq``: the graph rules ONNX Runtime, OpenVINO and TensorRT's explicit quantization share:
  only standard Q/DQ (no custom FakeQuantize op), Q/DQ on the inputs of every Conv/Gemm/MatMul that is
  not deliberately kept in float, per-channel weight scales.
- ``pack_bucketed``: rewrite fp32 weights that lie on Polino's bucketed b-bit grid as 4-bit codes
  (UINT4 DequantizeLinear, opset 21) so the file shrinks; ONNX Runtime dequantizes them at load time.
- ``pack_w4``: the same weights as com.microsoft.MatMulNBits where a Linear's buckets are K-blocks (ORT
  computes with the 4-bit codes), ``pack_bucketed`` for the rest, with the reason per layer.
- ``run_onnxruntime`` / ``run_openvino``: outputs of a file on a batch, for parity checks.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections import Counter
from pathlib import Path

from .artifact import ExportError

COMPUTE_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")


def module_path(node_name: str) -> str:
    """The PyTorch module path of a node exported by the TorchScript exporter.

    Node names look like ``/stages/stages.0/stages.0.0/conv1/Conv``: a segment with dots is a full path
    from the root, one without is a child of the previous segment; the last segment is the op.
    """
    parts: list[str] = []
    for seg in node_name.strip("/").split("/")[:-1]:
        parts = seg.split(".") if "." in seg else [*parts, seg]
    return ".".join(parts)


def _in_scope(path: str, scopes) -> bool:
    return any(path == s or path.startswith(s + ".") for s in scopes)


def _named(names: list[str], x) -> dict:
    """Feeds for inputs ``names``: ``x`` is one array (a single-input model) or a dict by input name."""
    if isinstance(x, dict):
        missing = [n for n in names if n not in x]
        if missing:
            raise ExportError(f"no data for the model input(s) {', '.join(missing)} (have {', '.join(x)})")
        return {n: x[n] for n in names}
    return {names[0]: x}


def _length(x) -> int:
    return len(next(iter(x.values()))) if isinstance(x, dict) else len(x)


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
    large files there): yields (pre-processed model, output path, nodes kept float), then moves the
    output to ``out`` (a temporary name, then a rename). Paths are resolved first, so relative ones
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
            tmp_out = Path(tmp) / "int8.onnx"
            yield pre, tmp_out, excluded
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
    with _prepared(fp32, out, keep_float) as (pre, tmp_out, excluded):
        ort_quantize_static(
            str(pre), str(tmp_out), _Reader(names, calibration), quant_format=QuantFormat.QDQ,
            per_channel=per_channel, reduce_range=reduce_range, weight_type=QuantType.QInt8,
            activation_type=QuantType.QUInt8 if activations == "uint8" else QuantType.QInt8,
            nodes_to_exclude=excluded, calibrate_method=CalibrationMethod.MinMax,
            # int8 mode is TensorRT's: zero points 0 and biases left float (it fuses them itself).
            extra_options={"ActivationSymmetric": activations == "int8", "WeightSymmetric": True,
                           "QuantizeBias": activations != "int8"})
    return {"tool": "onnxruntime.quantization.quantize_static", "onnxruntime": ort.__version__,
            "activations": activations, "weights": _weights(per_channel, reduce_range),
            "calibration_samples": _length(calibration), "calibration_method": "MinMax",
            "nodes_kept_float": excluded}


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

    with _prepared(fp32, out, keep_float) as (pre, tmp_out, excluded):
        ort_quantize_dynamic(str(pre), str(tmp_out), per_channel=per_channel, reduce_range=reduce_range,
                             weight_type=QuantType.QInt8, nodes_to_exclude=excluded)
    return {"tool": "onnxruntime.quantization.quantize_dynamic", "onnxruntime": ort.__version__,
            "activations": "dynamic (uint8, range per tensor at run time)",
            "weights": _weights(per_channel, reduce_range), "nodes_kept_float": excluded}


def _producer(graph) -> dict:
    return {o: n for n in graph.node for o in n.output}


# Ops that only move values: a DQ before them still feeds the next op exact quantized values, and ORT and
# TensorRT both move Q/DQ across them (NNCF puts the head's quantizer before Flatten).
SHAPE_OPS = ("Flatten", "Reshape", "Transpose", "Squeeze", "Unsqueeze", "Identity")


def _dequantized(name: str, prod: dict):
    """The DequantizeLinear node feeding ``name`` (through shape-only ops), or None."""
    n = prod.get(name)
    while n is not None and n.op_type in SHAPE_OPS:
        n = prod.get(n.input[0])
    return n if n is not None and n.op_type == "DequantizeLinear" else None


def _constant(name: str, prod: dict, inits: dict) -> bool:
    """Whether ``name`` is a weight: an initializer or Constant, possibly through DQ and shape-only ops."""
    seen = 0
    while seen < 16:
        if name in inits:
            return True
        n = prod.get(name)
        if n is None:
            return False
        if n.op_type == "Constant":
            return True
        if n.op_type not in (*SHAPE_OPS, "DequantizeLinear", "QuantizeLinear"):
            return False
        name, seen = n.input[0], seen + 1
    return False


def check_qdq(path: str | Path, keep_float=()) -> dict:
    """Check the QDQ graph rules; raise ExportError on a violation, return a summary.

    A Conv/Gemm/MatMul whose inputs are not both dequantized is allowed only when its module path is in
    ``keep_float``, or when it is a MatMul of two activations (attention), and is then listed as float. ``tensorrt_ready`` says whether every Q/DQ is int8 with
    zero point 0 (TensorRT's explicit quantization rejects uint8 and non-zero zero points).
    """
    import numpy as np
    import onnx
    from onnx import numpy_helper

    m = onnx.load(str(path))
    g = m.graph
    ops = Counter(n.op_type for n in g.node)
    custom = sorted({f"{n.domain}::{n.op_type}" for n in g.node if n.domain not in ("", "ai.onnx")})
    fake = sorted({n.op_type for n in g.node if "fakequant" in n.op_type.lower()})
    if custom or fake:
        raise ExportError(f"{Path(path).name} holds non-standard quantization ops {', '.join(custom + fake)}: "
                          "ONNX Runtime, OpenVINO and TensorRT accept only QuantizeLinear/DequantizeLinear")
    if not ops.get("DequantizeLinear"):
        raise ExportError(f"{Path(path).name} has no DequantizeLinear: it is not quantized")
    prod = _producer(g)
    inits = {t.name: t for t in g.initializer}
    quantized, floating, bad, per_channel = [], [], [], []
    for n in g.node:
        if n.op_type not in COMPUTE_OPS:
            continue
        dq = [_dequantized(i, prod) for i in n.input[:2]]
        where = module_path(n.name) or n.name
        if all(dq):
            quantized.append(where)
            scale = inits.get(_dequantized(n.input[1], prod).input[1])
            per_channel.append(scale is not None and int(np.prod(scale.dims)) > 1)
        elif keep_float and _in_scope(where, keep_float):
            floating.append(where)
        elif n.op_type == "MatMul" and not any(_constant(i, prod, inits) for i in n.input[:2]):
            # Two activations (attention scores Q K^T, then P V): no weight to quantize. NNCF's transformer
            # scheme and TensorRT's explicit quantization both leave them to the float (or fp16) kernels.
            floating.append(f"{where} (activation x activation MatMul)")
        else:
            bad.append(f"{n.op_type} {where} (inputs {'/'.join('DQ' if d else 'float' for d in dq)})")
    if bad:
        raise ExportError(f"{Path(path).name}: {len(bad)} compute node(s) without Q/DQ on their inputs: "
                          f"{'; '.join(bad[:5])}")
    zero_points, types = [], set()
    for n in g.node:
        if n.op_type in ("QuantizeLinear", "DequantizeLinear") and len(n.input) > 2 and n.input[2] in inits:
            zp = inits[n.input[2]]
            types.add(onnx.TensorProto.DataType.Name(zp.data_type).lower())
            zero_points.append(bool(np.all(numpy_helper.to_array(zp) == 0)))
    return {"ops": dict(sorted(ops.items())), "quantized_nodes": len(quantized), "float_nodes": floating,
            "per_channel_weights": bool(per_channel) and all(per_channel), "qdq_types": sorted(types),
            # int32 Q/DQ are quantized biases: constant-foldable (polygraphy surgeon sanitize --fold-constants).
            "tensorrt_ready": types - {"int32"} <= {"int8"} and all(zero_points),
            "opset": next((o.version for o in m.opset_import if o.domain in ("", "ai.onnx")), None)}


def fold_weight_quantizers(path: str | Path) -> dict:
    """Replace each QuantizeLinear of a constant (a weight) by its int8 result, in place.

    The TorchScript exporter writes fake-quantized weights as fp32 initializer -> QuantizeLinear ->
    DequantizeLinear, so the file stays fp32-sized. Storing the int8 values (what ORT's own quantizer
    writes) is the same graph numerically (np.rint rounds half to even, as QuantizeLinear does) at about a
    quarter of the weight bytes.
    """
    import numpy as np
    import onnx
    from onnx import helper, numpy_helper

    path = Path(path)
    m = onnx.load(str(path))
    g = m.graph
    inits = {t.name: t for t in g.initializer}
    prod = _producer(g)

    def const(name):
        n = prod.get(name)
        while n is not None and n.op_type == "Identity":
            name, n = n.input[0], prod.get(n.input[0])
        return inits.get(name) if n is None else None

    before, folded = path.stat().st_size, 0
    for n in list(g.node):
        if n.op_type != "QuantizeLinear" or len(n.input) < 3:
            continue
        w, s, z = (const(i) for i in n.input[:3])
        if w is None or s is None or z is None:
            continue
        x, scale, zp = (numpy_helper.to_array(t) for t in (w, s, z))
        axis = next((a.i for a in n.attribute if a.name == "axis"), 1)
        if scale.size > 1:  # per-channel: broadcast along the axis
            shape = [1] * x.ndim
            shape[axis] = -1
            scale, zp = scale.reshape(shape), zp.reshape(shape)
        info = np.iinfo(zp.dtype)
        q = np.clip(np.rint(x / scale) + zp.astype(np.int32), info.min, info.max).astype(zp.dtype)
        g.initializer.append(numpy_helper.from_array(q, n.output[0]))
        g.node.remove(n)
        folded += 1
    # Drop what nothing reads any more: the Identity copies of zero points, the fp32 weights.
    while True:
        used = {i for n in g.node for i in n.input} | {o.name for o in g.output}
        dead = [n for n in g.node if not any(o in used for o in n.output)]
        if not dead:
            break
        for n in dead:
            g.node.remove(n)
    used = {i for n in g.node for i in n.input} | {o.name for o in g.output}
    for t in [t for t in g.initializer if t.name not in used]:
        g.initializer.remove(t)
    part = path.with_name(f".{path.name}.tmp")
    onnx.save(m, str(part))
    onnx.checker.check_model(str(part), full_check=True)
    os.replace(part, path)
    return {"weights_folded": folded, "bytes_before": before, "bytes": path.stat().st_size}


def run_onnxruntime(path: str | Path, x, optimized: bool = True):
    """Outputs through ONNX Runtime's CPU provider. ``optimized=False`` turns graph optimizations off: a QDQ
    graph then runs as written (DequantizeLinear, then the float op), with no integer kernel."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    if not optimized:
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    return sess.run(None, _named([i.name for i in sess.get_inputs()], x))[0]


def run_openvino(path: str | Path, x):
    """Outputs through OpenVINO's CPU plugin in f32 inference precision; None when openvino is absent.

    The precision hint matters: on AMX CPUs OpenVINO otherwise runs bf16 and the comparison would
    measure bf16 rounding, not the int8 graph.
    """
    try:
        import openvino as ov
    except ImportError:
        return None
    compiled = ov.Core().compile_model(str(path), "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    feeds = _named([i.get_any_name() for i in compiled.inputs], x)
    return compiled.create_infer_request().infer(feeds)[compiled.output(0)]


def _pack4(codes) -> bytes:
    """Two 4-bit codes per byte, the first in the low nibble (ONNX's INT4/UINT4 raw layout). Raw bytes,
    not helper.make_tensor's int32 list: that stores each packed byte as a protobuf varint."""
    import numpy as np

    flat = codes.reshape(-1).astype(np.uint8)
    if flat.size % 2:
        flat = np.append(flat, np.uint8(0))
    return (flat[0::2] | (flat[1::2] << 4)).astype(np.uint8).tobytes()


def _integer_codes(b, grid: dict, bits: int, what: str):
    """Codes of the bucket rows ``b`` (n_buckets, bucket) on an integer-zero-point grid {"scales",
    "zero_points"} (one per bucket): (codes uint8, scale fp32, zero point uint8, worst distance to the grid
    in steps). The weights were computed as (q - zp) * scale, so w / scale + zp is within an ulp of q."""
    import numpy as np

    scale = np.asarray(grid["scales"], np.float32).reshape(-1)
    zp = np.asarray(grid["zero_points"]).reshape(-1)
    levels = 2 ** bits - 1
    if scale.size != len(b) or zp.size != len(b):
        raise ExportError(f"{what}: the grid has {scale.size} scales and {zp.size} zero points for {len(b)} buckets")
    if zp.min() < 0 or zp.max() > levels or not np.array_equal(zp, np.rint(zp)):
        raise ExportError(f"{what}: zero points must be integers in 0..{levels}")
    zp = zp.astype(np.uint8)
    codes = np.clip(np.rint(b / scale[:, None]) + zp[:, None], 0, levels).astype(np.uint8)
    back = (codes.astype(np.float32) - zp[:, None].astype(np.float32)) * scale[:, None]
    worst = float(np.abs(back - b).max() / max(float(scale.max()), 1e-12))
    return codes, scale, zp, worst


def pack_bucketed(fp32: str | Path, out: str | Path, weights: dict) -> dict:
    """Store Polino-quantized weights as 4-bit codes: ``weights`` maps initializer name -> (bits, bucket),
    or (bits, bucket, True) for an initializer that holds the weight transposed (a Linear exported as
    MatMul: the buckets run over the module's own (out, in) layout, then a Transpose rebuilds it), or
    (bits, bucket, transposed, grid) for integer zero points, grid = {"scales", "zero_points"} per bucket.

    Each listed weight must already lie on its bucketed grid (w = alpha * k / (2^b - 1) + beta per bucket
    of ``bucket`` flattened values). It becomes UINT4 codes (n_buckets x bucket, padded) -> Cast -> Mul
    scale -> Add beta -> reshape back: standard ONNX (opset 21). With integer zero points (w = (q - zp) *
    scale) the zero points are UINT4 too and the chain is Cast -> Sub zp -> Mul scale, the fake quantizer's
    own order of operations, so the folded weight is bit-exact. Not DequantizeLinear: ONNX Runtime never
    constant-folds DQ (it keeps it for QDQ fusion), so a DQ would dequantize on every run (measured 2x
    slower than fp32 on the quickstart); Cast/Mul/Add fold at session start, so the file shrinks and the
    arithmetic is plain fp32. ONNX has no 2- or 3-bit type ORT runs: those use 4-bit containers too (the
    reported compressed size counts b bits).
    """
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper, version_converter

    m = onnx.load(str(fp32))
    opset = next(o.version for o in m.opset_import if o.domain in ("", "ai.onnx"))
    if opset < 21:
        m = version_converter.convert_version(m, 21)
    inits = {t.name: t for t in m.graph.initializer}
    missing = sorted(set(weights) - set(inits))
    if missing:
        raise ExportError(f"pack_bucketed: no initializer named {', '.join(missing)}")
    nodes, packed, worst = [], {}, 0.0
    for name, spec in weights.items():
        bits, bucket, transposed, grid = (*spec, False, None)[:4]
        if bits > 4:
            raise ExportError(f"pack_bucketed: {name} has {bits} bits; only 2-4 are packed")
        w = numpy_helper.to_array(inits[name]).astype(np.float32)
        if transposed:
            w = w.T
        flat = w.reshape(-1)
        pad = (-flat.size) % bucket
        b = np.concatenate([flat, np.full(pad, flat[-1], np.float32)]).reshape(-1, bucket)
        levels = 2 ** bits - 1
        c, s, lo_n, sh = (f"{name}.q{bits}", f"{name}.scale", f"{name}.beta", f"{name}.shape")
        if grid is None:  # Polino's float offset: alpha and beta are the bucket's range and minimum
            lo, hi = b.min(1), b.max(1)
            scale = np.maximum(hi - lo, 1e-12) / levels
            codes = np.clip(np.rint((b - lo[:, None]) / scale[:, None]), 0, levels).astype(np.uint8)
            back = (codes * scale[:, None] + lo[:, None]).reshape(-1)[:flat.size]
            off = float(np.abs(back - flat).max() / max(float(scale.max()), 1e-12))
            offset = [numpy_helper.from_array(lo[:, None].astype(np.float32), lo_n)]
            dq = [helper.make_node("Cast", [c], [f"{name}.k"], to=TensorProto.FLOAT),
                  helper.make_node("Mul", [f"{name}.k", s], [f"{name}.dq"]),
                  helper.make_node("Add", [f"{name}.dq", lo_n], [f"{name}.deq"])]
        else:  # integer zero points: (q - zp) * scale
            codes, scale, zp, off = _integer_codes(b, grid, bits, f"pack_bucketed: {name}")
            z = f"{name}.zp{bits}"
            offset = [helper.make_tensor(z, TensorProto.UINT4, [len(zp), 1], _pack4(zp), raw=True)]
            dq = [helper.make_node("Cast", [c], [f"{name}.k"], to=TensorProto.FLOAT),
                  helper.make_node("Cast", [z], [f"{name}.z"], to=TensorProto.FLOAT),
                  helper.make_node("Sub", [f"{name}.k", f"{name}.z"], [f"{name}.kz"]),
                  helper.make_node("Mul", [f"{name}.kz", s], [f"{name}.deq"])]
        worst = max(worst, off)
        m.graph.initializer.remove(inits[name])
        m.graph.initializer.extend([
            helper.make_tensor(c, TensorProto.UINT4, list(codes.shape), _pack4(codes), raw=True),
            numpy_helper.from_array(scale[:, None].astype(np.float32), s), *offset,
            numpy_helper.from_array(np.array([-1], np.int64), f"{name}.flat"),
            numpy_helper.from_array(np.array([0], np.int64), f"{name}.start"),
            numpy_helper.from_array(np.array([flat.size], np.int64), f"{name}.end"),
            numpy_helper.from_array(np.array(w.shape, np.int64), sh)])
        nodes += [*dq,
                  helper.make_node("Reshape", [f"{name}.deq", f"{name}.flat"], [f"{name}.f"]),
                  helper.make_node("Slice", [f"{name}.f", f"{name}.start", f"{name}.end"], [f"{name}.s"]),
                  helper.make_node("Reshape", [f"{name}.s", sh], [f"{name}.t" if transposed else name])]
        if transposed:
            nodes.append(helper.make_node("Transpose", [f"{name}.t"], [name], perm=[1, 0]))
        packed[name] = {"bits": bits, "bucket": bucket, "buckets": int(len(scale)), "numel": int(flat.size),
                        "zero_point": "float" if grid is None else "integer"}
    if worst > 1e-3:  # in units of a quantization step: the weights were not on the grid
        raise ExportError(f"pack_bucketed: weights are off their {bits}-bit grid by {worst:.3g} steps")
    for n in reversed(nodes):  # producers first, so the graph stays topologically sorted
        m.graph.node.insert(0, n)
    m.ir_version = max(m.ir_version, 10)  # 4-bit tensors need IR 10
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    part = out.with_name(f".{out.name}.tmp")
    onnx.save(m, str(part))
    try:
        onnx.checker.check_model(str(part), full_check=True)
    except onnx.checker.ValidationError as e:
        part.unlink()
        raise ExportError(f"packed 4-bit ONNX fails onnx.checker: {str(e).splitlines()[0]}") from None
    os.replace(part, out)
    kinds = {p["zero_point"] for p in packed.values()}
    storage = " / ".join(("UINT4 codes -> Cast, per-bucket fp32 scale and beta" if k == "float" else
                          "UINT4 codes and UINT4 zero points -> Cast -> Sub -> Mul per-bucket fp32 scale")
                         for k in sorted(kinds) or ["float"])
    return {"packed": packed, "opset": 21, "storage": storage}


# ----------------------------------------------- 4-bit weights that ONNX Runtime computes with: MatMulNBits

NBITS_NOTE = ("com.microsoft.MatMulNBits is an ONNX Runtime contrib op: kernels in the CPU provider (measured "
              "here) and in CUDA/DirectML/WebGPU (not checked here); TensorRT does not take it.")
NBITS_ZP_NOTE = {
    "integer": " Its zero points are uint8 (two 4-bit values per byte), so ORT's CPU kernel prepacks the weight "
               "once at session start (MLAS 4-bit GEMM, fp32 activations).",
    "float": " Its float zero points (Polino's exact offset) turn off ORT's CPU weight prepacking: the CPU kernel "
             "dequantizes the 4-bit weight on every run, then runs an fp32 GEMM."}


def pack_zero_points(zp):
    """(N, k_blocks) integer zero points (0..15) -> MatMulNBits' uint8 layout (N, ceil(k_blocks / 2)): the
    packing of B, block 2j in the low nibble of byte j and block 2j + 1 in its high nibble, an odd row
    padded with a 0 nibble (ORT's own quantizer writes it so, matmul_nbits_quantizer.py)."""
    import numpy as np

    zp = np.asarray(zp, np.uint8)
    if zp.shape[1] % 2:
        zp = np.concatenate([zp, np.zeros((zp.shape[0], 1), np.uint8)], axis=1)
    return (zp[:, 0::2] | (zp[:, 1::2] << 4)).astype(np.uint8)


def unpack_zero_points(packed, k_blocks: int):
    """The inverse of ``pack_zero_points``: (N, ceil(k_blocks / 2)) uint8 -> (N, k_blocks) zero points."""
    import numpy as np

    packed = np.asarray(packed, np.uint8)
    both = np.stack([packed & 0x0F, packed >> 4], axis=-1).reshape(packed.shape[0], -1)
    return both[:, :k_blocks]


def _weight_source(name: str, w, inits: dict, consumers: dict):
    """(initializer name, transposed) of the initializer that holds weight ``w`` (out, in), or None.

    The TorchScript exporter keeps a Linear's weight under its parameter name for Gemm (transB=1) but
    writes a transposed copy under a generated name (onnx::MatMul_123) when the input has more than two
    dimensions; so match by name first, then by value (the weights are on a grid, so equality is exact)."""
    import numpy as np
    from onnx import numpy_helper

    if name in inits and tuple(inits[name].dims) == w.shape:
        return name, False
    for t in inits.values():
        dims = tuple(t.dims)
        if len(dims) != 2 or dims not in (w.shape, w.shape[::-1]) or not consumers.get(t.name):
            continue
        a = numpy_helper.to_array(t)
        if dims == w.shape[::-1] and np.array_equal(a, w.T):
            return t.name, True
        if dims == w.shape and np.array_equal(a, w):
            return t.name, False
    return None


def _nbits_consumer(node, init: str, transposed: bool, inits: dict, n_out: int) -> str | None:
    """Why ``node`` (a consumer of weight ``init``) cannot become a MatMulNBits, or None when it can."""
    import numpy as np
    from onnx import helper

    if node.op_type not in ("MatMul", "Gemm") or list(node.input[1:2]) != [init] or node.input[0] == init:
        return f"the weight feeds a {node.op_type} ({node.name}), not the B input of a MatMul/Gemm"
    if node.op_type == "MatMul":
        return None if transposed else f"{node.name}: MatMul with the weight untransposed"
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    if attrs.get("transA", 0) or attrs.get("alpha", 1.0) != 1.0 or attrs.get("beta", 1.0) != 1.0:
        return f"{node.name}: Gemm with transA/alpha/beta"
    if bool(attrs.get("transB", 0)) == transposed:
        return f"{node.name}: Gemm with transB={attrs.get('transB', 0)} on this layout"
    if len(node.input) > 2 and node.input[2]:
        c = inits.get(node.input[2])
        if c is None or int(np.prod(c.dims)) not in (1, n_out):
            return f"{node.name}: Gemm bias is not a constant of N or 1 values"
    return None


def pack_w4(fp32: str | Path, out: str | Path, layers: dict) -> dict:
    """Write Polino-quantized weights as 4-bit: MatMulNBits where ONNX Runtime can compute with them,
    4-bit codes folded back to fp32 at load time (``pack_bucketed``) everywhere else.

    ``layers`` maps a module path to {"weight": (out, in[, k...]) array already on its grid, "bits", "bucket",
    "kind": the module's class name}. A Linear becomes ``com.microsoft.MatMulNBits`` (bits 4, block_size =
    bucket, K = in, N = out) when its in_features is a multiple of the bucket, so that each Polino bucket
    of 256 consecutive flattened values is exactly one K-block of one output column, the bucket is a power
    of two >= 16 (the op's rule), and every node reading the weight is a MatMul/Gemm taking it as B. Codes
    are packed two per byte, low nibble first along K, in (N, k_blocks, bucket/2); scales = alpha / levels
    and float zero points = -beta / scale, both (N, k_blocks) fp32, so (q - zp) * scale = beta + alpha * q /
    levels. A Gemm's bias becomes the op's bias input. 2- and 3-bit codes sit in 4-bit containers (levels
    2^b - 1, the op's bits stay 4). Returns which layers became MatMulNBits and, for the rest, why not.

    A layer with ``"grid": {"scales", "zero_points"}`` (one per bucket, flattened bucket order: the quantizer's
    integer zero points, w = (q - zp) * scale) gets those scales and uint8 zero points instead, packed as the
    op's spec says for uint8 zero points: the same packing as B, (N, ceil(k_blocks / 2)), two 4-bit values per
    byte, the lower K-block in the low nibble, each row padded to whole bytes. ORT's CPU kernel prepacks such
    a weight; it does not prepack one with float zero points. Folded layers take the grid too.
    """
    import numpy as np
    import onnx
    from onnx import helper, numpy_helper

    fp32, out = Path(fp32), Path(out)
    m = onnx.load(str(fp32))
    g = m.graph
    inits = {t.name: t for t in g.initializer}
    consumers: dict[str, list] = {}
    for n in g.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    nbits, folded, fold_spec, missing, plans, record = {}, {}, {}, {}, [], None
    for path, spec in layers.items():
        w = np.asarray(spec["weight"], np.float32)
        bits, bucket, kind = spec["bits"], spec["bucket"], spec.get("kind", "")
        src = _weight_source(f"{path}.weight", w, inits, consumers)
        if src is None:
            missing[path] = "no initializer in the exported graph equals its weight (left fp32)"
            continue
        init, transposed = src
        why = None
        if w.ndim != 2 or kind not in ("Linear", ""):
            why = f"{kind or 'a ' + str(w.ndim) + '-d weight'}: MatMulNBits is a MatMul (2-d weight) op"
        elif w.shape[1] % bucket:
            why = (f"in_features {w.shape[1]} is not a multiple of the bucket {bucket}: a Polino bucket would "
                   "straddle two output columns, not one K-block")
        elif bucket < 16 or bucket & (bucket - 1):
            why = f"bucket {bucket} is not a power of two >= 16 (MatMulNBits' block_size rule)"
        elif bits > 4:
            why = f"{bits} bits"
        else:
            why = next((r for r in (_nbits_consumer(c, init, transposed, inits, w.shape[0]) for c in consumers[init]) if r), None)
        grid = spec.get("grid")
        if why:
            folded[path] = why
            fold_spec[init] = (bits, bucket, transposed, grid)
        else:
            plans.append((path, w, bits, bucket, init, [c.name for c in consumers[init]], grid))
    out.parent.mkdir(parents=True, exist_ok=True)
    part = out.with_name(f".{out.name}.nbits.tmp")
    if fold_spec:  # first the folded layers (pack_bucketed moves the graph to opset 21 for UINT4), then MatMulNBits
        record = pack_bucketed(fp32, part, fold_spec)
        m = onnx.load(str(part))
        g = m.graph
        inits = {t.name: t for t in g.initializer}
    for path, w, bits, bucket, init, readers, grid in plans:
        n_out, k = w.shape
        kb, levels = k // bucket, 2 ** bits - 1
        b = w.reshape(n_out, kb, bucket)
        if grid is None:  # Polino's float offset: float zero points
            lo, hi = b.min(-1), b.max(-1)
            scale = (np.maximum(hi - lo, 1e-12) / levels).astype(np.float32)
            codes = np.clip(np.rint((b - lo[..., None]) / scale[..., None]), 0, levels).astype(np.uint8)
            zp = (-lo / scale).astype(np.float32)
            back = (codes - zp[..., None]) * scale[..., None]  # the op's own formula
            off = float(np.abs(back - b).max() / max(float(scale.max()), 1e-12))
            zp_init = numpy_helper.from_array(zp, f"{path}.zero_points")
        else:  # integer zero points: uint8, two per byte along K-blocks, each row padded to whole bytes
            codes, scale, zp, off = _integer_codes(b.reshape(-1, bucket), grid, bits, f"pack_w4: {path}")
            codes, scale, zp = codes.reshape(n_out, kb, bucket), scale.reshape(n_out, kb), zp.reshape(n_out, kb)
            zp_init = numpy_helper.from_array(pack_zero_points(zp), f"{path}.zero_points")
        if off > 1e-2:  # in quantization steps (fp32 rounding of zp is ~1e-6 of a step)
            raise ExportError(f"pack_w4: {path}.weight is off its {bits}-bit grid by {off:.3g} steps")
        packed = (codes[..., 0::2] | (codes[..., 1::2] << 4)).astype(np.uint8)
        names = [f"{path}.q4", f"{path}.scales", f"{path}.zero_points"]
        g.initializer.extend([numpy_helper.from_array(packed, names[0]), numpy_helper.from_array(scale, names[1]),
                              zp_init])
        for node in [n for n in g.node if n.op_type in ("MatMul", "Gemm") and n.input[1:2] == [init]]:
            ins = [node.input[0], *names]
            if node.op_type == "Gemm" and len(node.input) > 2 and node.input[2]:
                bias = numpy_helper.to_array(inits[node.input[2]]).astype(np.float32).reshape(-1)
                if bias.size != n_out:  # a scalar or broadcast bias: leave it to an Add
                    bias = np.broadcast_to(bias, (n_out,)).copy()
                g.initializer.append(numpy_helper.from_array(bias, f"{path}.bias_n"))
                ins += ["", f"{path}.bias_n"]  # input 4 (g_idx) is deprecated and left empty
            new = helper.make_node("MatMulNBits", ins, list(node.output), name=f"{node.name}_Q4",
                                   domain="com.microsoft", K=k, N=n_out, bits=4, block_size=bucket)
            g.node.insert(list(g.node).index(node), new)
            g.node.remove(node)
        nbits[path] = {"initializer": init, "K": k, "N": n_out, "block_size": bucket, "k_blocks": kb,
                       "code_bits": bits, "zero_points": "float32" if grid is None else "uint8 (4-bit, packed)",
                       "nodes": [f"{r}_Q4" for r in readers]}
    used = {i for n in g.node for i in n.input} | {o.name for o in g.output}
    for t in [t for t in g.initializer if t.name not in used]:
        g.initializer.remove(t)
    if nbits and not any(o.domain == "com.microsoft" for o in m.opset_import):
        m.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    onnx.save(m, str(part))
    os.replace(part, out)
    try:  # onnx.checker does not know contrib ops: loading the session is the check that matters
        import onnxruntime as ort

        ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    except Exception as e:
        raise ExportError(f"pack_w4: ONNX Runtime cannot load {out.name}: {str(e).splitlines()[0][:200]}") from None
    kinds = sorted({"float" if p[-1] is None else "integer" for p in plans})
    return {"matmulnbits": nbits, "folded": folded, "fp32": missing,
            "folded_storage": (record or {}).get("storage"),
            "note": NBITS_NOTE + "".join(NBITS_ZP_NOTE[z] for z in kinds) if nbits else
            "no layer fits MatMulNBits: ONNX Runtime folds the 4-bit weights to fp32 when the session starts"}
