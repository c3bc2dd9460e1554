"""Rewrites of an exported QDQ file, in place: fake-quantized weights stored as int8 (``fold_weight_quantizers``),
and a Q/DQ pair after a concat, slice or pad whose inputs share one grid (``requantize_moved``)."""
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


# Ops that move values without changing them: every value of their output is one of their inputs' (a Pad's
# are, or its constant, which must then lie on the same grid: ZeroPad2d's 0 does on any grid with a zero point).
MOVES = ("Concat", "Split", "Slice", "Pad")


def requantize_moved(path: str | Path) -> dict:
    """Insert QuantizeLinear -> DequantizeLinear after a Concat, Split, Slice or Pad whose data inputs are all
    dequantized at one per-tensor scale and zero point, on each output that feeds a Conv, Gemm or MatMul bare.
    NNCF quantizes a concat's inputs with one shared quantizer (a chunk's input once) and leaves the output
    bare: OpenVINO propagates the precision through, but ONNX Runtime's QDQ fusion does not, and the consumer
    ran in float (a two-input model's head, ShuffleNet's branches). A ZeroPad2d before a convolution (EfficientNet
    and other TensorFlow-style "same" padding) goes into the Conv's own pads where only Convs read it, so the
    Conv reads the DequantizeLinear; a Pad read by anything else is requantized like a concat. The values lie on
    that grid already, so the pair changes no number; it lets the consumer run int8. In place; returns how many
    pairs and pads folded."""
    import numpy as np
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
        return evaluated(name)

    def evaluated(name):
        """A tensor computed from constants alone (TorchScript lowers a Pad's pads to a Reshape, Transpose and
        Cast of a Constant), evaluated; None where it reads a graph input."""
        nodes, todo, seen = [], [name], set()
        while todo:
            t = todo.pop()
            if t in seen or t in inits or not t:
                continue
            seen.add(t)
            n = prod.get(t)
            if n is None or len(nodes) > 32:
                return None
            nodes.append(n)
            todo.extend(n.input)
        from onnx.reference import ReferenceEvaluator

        used = {i for n in nodes for i in n.input}
        at = {id(n): i for i, n in enumerate(g.node)}  # the graph's own (topological) order
        nodes = sorted({id(n): n for n in nodes}.values(), key=lambda n: at[id(n)])
        sub = helper.make_graph(nodes, "folded", [],
                                [helper.make_value_info(name, onnx.TypeProto())],
                                [inits[i] for i in used if i in inits])
        try:
            return ReferenceEvaluator(helper.make_model(sub, opset_imports=m.opset_import)).run(None, {})[0]
        except Exception:
            return None

    def grid(dq):
        """(scale, zero point, dtype, axis): numbers per tensor (axis None); per channel, the DQ's own tensors'
        names and its axis (NNCF quantizes a depthwise convolution's input per channel)."""
        if len(dq.input) < 3 or not dq.input[2]:  # no zero point: its type would be guessed (uint8)
            return None
        s, z = value(dq.input[1]), value(dq.input[2])
        if s is None or z is None:
            return None
        if s.size != 1:
            return dq.input[1], dq.input[2], str(z.dtype), next((a.i for a in dq.attribute if a.name == "axis"), 1)
        return float(s), int(z), str(z.dtype), None

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
            elif n.op_type in SHAPE_OPS:  # a per-channel grid does not survive a reshape or transpose
                memo[name] = on if (on := grid_of(n.input[0], depth + 1)) and on[3] is None else None
            elif n.op_type in MOVES:
                grids = {grid_of(i, depth + 1) for i in (n.input if n.op_type == "Concat" else n.input[:1])}
                memo[name] = grids.pop() if len(grids) == 1 else None
                if memo[name] is not None and (not pad_on_grid(n, memo[name]) if n.op_type == "Pad"
                                               else memo[name][3] is not None):
                    memo[name] = None
            else:
                memo[name] = None
        return memo[name]

    def pad_fill(n) -> tuple[str, float | None]:
        """A Pad's mode, and the constant it writes in constant mode (0 without one; None where it is computed)."""
        v = value(n.input[2]) if len(n.input) > 2 and n.input[2] else 0.0
        return (next((a.s.decode() for a in n.attribute if a.name == "mode"), "constant"),
                None if v is None else float(np.asarray(v).reshape(-1)[0]))

    def pad_on_grid(n, on) -> bool:
        """Whether every value the Pad writes lies on ``on``: per channel, only where the channel axis is not
        padded and the constant is 0 (on every channel's grid)."""
        if on[3] is not None:
            pads = value(n.input[1])
            if pads is None or len(n.input) > 3 and n.input[3] or pads.reshape(2, -1)[:, on[3]].any():
                return False
        mode, v = pad_fill(n)
        if mode != "constant":  # reflect, edge, wrap: input values only
            return True
        if v is None:
            return False
        if on[3] is not None:
            return v == 0.0
        q, info = v / on[0] + on[1], np.iinfo(on[2])
        return abs(q - round(q)) < 1e-6 and info.min <= round(q) <= info.max

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

    # A zero Pad of the spatial axes whose every reader is a Conv goes into the Convs' own pads: the Conv then
    # reads the DequantizeLinear itself, which ONNX Runtime fuses (it folded such a Pad itself; a Q/DQ pair after
    # it would leave the Pad in float); other Pads are requantized below.
    folded = 0
    outputs = {o.name for o in g.output}

    def foldable(n, pads, readers) -> bool:
        """A zero Pad of the spatial axes alone, read only as the data input of Convs that pad explicitly."""
        mode, const = pad_fill(n)
        if pads is None or mode != "constant" or const != 0 or len(n.input) > 3 and n.input[3]:
            return False
        if pads.size < 6 or pads.reshape(2, -1)[:, :2].any() or (pads < 0).any():
            return False
        return bool(readers) and n.output[0] not in outputs and all(
            u.op_type == "Conv" and u.input[0] == n.output[0]
            and all(a.name != "auto_pad" or a.s in (b"", b"NOTSET") for a in u.attribute) for u in readers)

    for n in [n for n in g.node if n.op_type == "Pad" and grid_of(n.output[0]) is not None]:
        pads, readers = value(n.input[1]), users.get(n.output[0], [])
        if not foldable(n, pads, readers):
            continue
        spatial = pads.reshape(2, -1)[:, 2:].astype(int)
        for u in readers:
            had = next((list(a.ints) for a in u.attribute if a.name == "pads"), [0] * spatial.size)
            for a in [a for a in u.attribute if a.name == "pads"]:
                u.attribute.remove(a)
            u.attribute.append(helper.make_attribute("pads", [int(x) for x in np.add(had, spatial.reshape(-1))]))
            u.input[0] = n.input[0]
        users.setdefault(n.input[0], []).extend(readers)
        g.node.remove(n)
        folded += 1

    inserted = 0
    for n in list(g.node):
        if n.op_type not in MOVES or grid_of(n.output[0]) is None:
            continue
        dq0 = source(n.input[0])
        scale, zero = dq0.input[1], dq0.input[2]
        axis = {"axis": grid_of(n.output[0])[3]} if grid_of(n.output[0])[3] is not None else {}
        for k, out in enumerate(n.output):
            if not feeds_compute_bare(out):
                continue
            q = helper.make_node("QuantizeLinear", [out, scale, zero], [f"{out}_requantized"],
                                 name=f"{n.name}/requantize_{k}", **axis)
            dq = helper.make_node("DequantizeLinear", [f"{out}_requantized", scale, zero], [f"{out}_dequantized"],
                                  name=f"{n.name}/dequantize_{k}", **axis)
            for u in users.get(out, []):
                u.input[:] = [f"{out}_dequantized" if i == out else i for i in u.input]
            at = list(g.node).index(n) + 1
            g.node.insert(at, dq)
            g.node.insert(at, q)
            prod[q.output[0]], prod[dq.output[0]] = q, dq  # a later move fed by it reads its grid through them
            users[dq.output[0]] = users.pop(out, [])
            users[out] = [q]
            inserted += 1
    if inserted or folded:
        part = path.with_name(f".{path.name}.tmp")
        onnx.save(m, str(part))
        onnx.checker.check_model(str(part), full_check=True)
        os.replace(part, path)
    return {"requantized_after_moves": inserted, "pads_folded": folded}
