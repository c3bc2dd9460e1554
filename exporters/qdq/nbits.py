"""4-bit weights that ONNX Runtime computes with: com.microsoft.MatMulNBits (``pack_w4``), with
``pack_bucketed`` for the layers that do not fit it."""
from __future__ import annotations

import os
from pathlib import Path

from ..artifact import ExportError
from .bucketed import _integer_codes, pack_bucketed

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
