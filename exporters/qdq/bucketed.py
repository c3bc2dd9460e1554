"""Polino's bucketed 2-4 bit weights stored as UINT4 codes that ONNX Runtime folds back to fp32 when the
session starts (``pack_bucketed``), and the integer-zero-point codes ``pack_w4`` shares."""
from __future__ import annotations

import os
from pathlib import Path

from ..artifact import ExportError


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
