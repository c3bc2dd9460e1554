"""Rewrites of an exported QDQ file, in place: fake-quantized weights stored as int8 (``fold_weight_quantizers``),
and a Q/DQ pair after a concat or slice whose inputs share one grid (``requantize_moved``)."""
from __future__ import annotations

import os
from pathlib import Path

from .graph import COMPUTE_OPS, SHAPE_OPS, _producer, _users


def fold_weight_quantizers(path: str | Path) -> dict:
    """Replace each QuantizeLinear of a constant (a weight) by its int8 result, in place.

    The TorchScript exporter writes fake-quantized weights as fp32 initializer -> QuantizeLinear ->
    DequantizeLinear, so the file stays fp32-sized. Storing the int8 values (what ORT's own quantizer
    writes) is the same graph numerically (np.rint rounds half to even, as QuantizeLinear does) at about a
    quarter of the weight bytes.
    """
    import numpy as np
    import onnx
    from onnx import numpy_helper

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


# Ops that move values without changing them: every value of their output is one of their inputs'.
MOVES = ("Concat", "Split", "Slice")


def requantize_moved(path: str | Path) -> dict:
    """Insert QuantizeLinear -> DequantizeLinear after a Concat, Split or Slice whose data inputs are all
    dequantized at one per-tensor scale and zero point, on each output that feeds a Conv, Gemm or MatMul bare.
    NNCF quantizes a concat's inputs with one shared quantizer (a chunk's input once) and leaves the output
    bare: OpenVINO propagates the precision through, but ONNX Runtime's QDQ fusion does not, and the consumer
    ran in float (a two-input model's head, ShuffleNet's branches). The values lie on that grid already, so
    the pair changes no number; it lets the consumer run int8. In place; returns how many pairs."""
    import onnx
    from onnx import helper, numpy_helper

    path = Path(path)
    m = onnx.load(str(path))
    g = m.graph
    prod, inits = _producer(g), {t.name: t for t in g.initializer}

    def value(name):
        n = prod.get(name)
        while n is not None and n.op_type == "Identity":
            name, n = n.input[0], prod.get(n.input[0])
        if n is None:
            return numpy_helper.to_array(inits[name]) if name in inits else None
        if n.op_type == "Constant":
            return next((numpy_helper.to_array(a.t) for a in n.attribute if a.name == "value"), None)
        return None

    def grid(dq):
        if len(dq.input) < 3 or not dq.input[2]:  # no zero point: its type would be guessed (uint8)
            return None
        s, z = value(dq.input[1]), value(dq.input[2])
        if s is None or z is None or s.size != 1:
            return None
        return float(s), int(z), str(z.dtype)

    memo: dict[str, tuple | None] = {}

    def grid_of(name, depth=0):
        """The (scale, zero point) grid every value of ``name`` lies on: a DQ's, through shape-only ops and
        through moves whose data inputs share one; None where unknown."""
        if name not in memo:
            n = prod.get(name)
            if n is None or depth > 64:
                memo[name] = None
            elif n.op_type == "DequantizeLinear":
                memo[name] = grid(n)
            elif n.op_type in SHAPE_OPS:
                memo[name] = grid_of(n.input[0], depth + 1)
            elif n.op_type in MOVES:
                grids = {grid_of(i, depth + 1) for i in (n.input if n.op_type == "Concat" else n.input[:1])}
                memo[name] = grids.pop() if len(grids) == 1 else None
            else:
                memo[name] = None
        return memo[name]

    users = _users(g)

    def feeds_compute_bare(name) -> bool:
        for u in users.get(name, []):
            if u.op_type in COMPUTE_OPS or u.op_type in SHAPE_OPS and feeds_compute_bare(u.output[0]):
                return True
        return False

    def source(name):  # the DQ the grid was read from: its scale and zero point tensors are reused
        n = prod.get(name)
        while n is not None and n.op_type != "DequantizeLinear":
            n = prod.get(n.input[0])
        return n

    inserted = 0
    for n in list(g.node):
        if n.op_type not in MOVES or grid_of(n.output[0]) is None:
            continue
        dq0 = source(n.input[0])
        scale, zero = dq0.input[1], dq0.input[2]
        for k, out in enumerate(n.output):
            if not feeds_compute_bare(out):
                continue
            q = helper.make_node("QuantizeLinear", [out, scale, zero], [f"{out}_requantized"],
                                 name=f"{n.name}/requantize_{k}")
            dq = helper.make_node("DequantizeLinear", [f"{out}_requantized", scale, zero], [f"{out}_dequantized"],
                                  name=f"{n.name}/dequantize_{k}")
            for u in users.get(out, []):
                u.input[:] = [f"{out}_dequantized" if i == out else i for i in u.input]
            at = list(g.node).index(n) + 1
            g.node.insert(at, dq)
            g.node.insert(at, q)
            prod[q.output[0]], prod[dq.output[0]] = q, dq  # a later move fed by it reads its grid through them
            users[dq.output[0]] = users.pop(out, [])
            users[out] = [q]
            inserted += 1
    if inserted:
        part = path.with_name(f".{path.name}.tmp")
        onnx.save(m, str(part))
        onnx.checker.check_model(str(part), full_check=True)
        os.replace(part, path)
    return {"requantized_after_moves": inserted}
