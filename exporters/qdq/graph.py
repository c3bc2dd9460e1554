"""The QDQ graph: the rules ONNX Runtime, OpenVINO and TensorRT share (``check_qdq``), folding fake-quantized
weights to int8 initializers (``fold_weight_quantizers``), and the node-name helpers both use."""
from __future__ import annotations

import os
from collections import Counter
from pathlib import Path

from ..artifact import ExportError

COMPUTE_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")


def module_path(node_name: str) -> str:
    """The PyTorch module path of a node exported by the TorchScript exporter.

    Node names look like ``/stages/stages.0/stages.0.0/conv1/Conv`` (containers: a segment with dots repeats
    the container's own segments, ``stages.0`` after ``stages``) or ``/bert/encoder/layer.0/attention/Add``
    (a ModuleList's element under a module: ``layer.0`` is relative to ``encoder``); a segment without dots
    is a child of the previous one; the last segment is the op.
    """
    parts: list[str] = []
    for seg in node_name.strip("/").split("/")[:-1]:
        new = seg.split(".")
        head = new[:-1]
        if head and parts[len(parts) - len(head):] == head:
            parts = parts[:len(parts) - len(head)]  # the segment repeats the path it continues
        parts = [*parts, *new]
    return ".".join(parts)


def _in_scope(path: str, scopes) -> bool:
    return any(path == s or path.startswith(s + ".") for s in scopes)


def _producer(graph) -> dict:
    return {o: n for n in graph.node for o in n.output}


# Ops that only move values: a DQ before them still feeds the next op exact quantized values, and ORT and
# TensorRT both move Q/DQ across them (NNCF puts the head's quantizer before Flatten).
SHAPE_OPS = ("Flatten", "Reshape", "Transpose", "Squeeze", "Unsqueeze", "Identity")


def _moves_only(n) -> bool:
    """A shape-only op, or a Cast to float32 (of a float32 value: DINOv2 casts its pixels to the weight's dtype)."""
    return n.op_type in SHAPE_OPS or n.op_type == "Cast" and any(a.name == "to" and a.i == 1 for a in n.attribute)


def _dequantized(name: str, prod: dict):
    """The DequantizeLinear node feeding ``name`` (through shape-only ops and casts to float), or None."""
    n = prod.get(name)
    while n is not None and _moves_only(n):
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


_INTEGER = {2, 3, 4, 5, 6, 7, 12, 13}  # onnx.TensorProto: UINT8, INT8, UINT16, INT16, INT32, INT64, UINT32, UINT64
_FLOAT = {1, 10, 11, 16}  # FLOAT, FLOAT16, DOUBLE, BFLOAT16


def index_math(graph) -> list[str]:
    """Nodes that compute an integer index in float: the float-valued nodes upstream of a Cast to an integer
    type, back to where the values were integers (a Cast from them: a relative distance from arange) or to a
    layer with weights. A relative-position bucket (T5, MPNet: the log of the distance, scaled, cast to int64,
    the index of a bias table's Gather) is such a chain; quantized, its indices came out as garbage and the
    Gather failed (idx=-9223372036854775784). Static quantization keeps them float. Tensor types come from
    the graph's shape inference (ORT's pre-processing runs it); a tensor of unknown type ends the walk."""
    types = {v.name: v.type.tensor_type.elem_type for v in (*graph.value_info, *graph.input, *graph.output)}
    types.update({i.name: i.data_type for i in graph.initializer})
    prod, inits = _producer(graph), {i.name for i in graph.initializer}
    weighted = ("Conv", "MatMul", "Gemm", "ConvTranspose")
    casts = [n for n in graph.node if n.op_type == "Cast" and any(a.name == "to" and a.i in _INTEGER for a in n.attribute)]
    seen, todo = set(), [prod[i] for n in casts for i in n.input if i in prod]
    while todo:
        n = todo.pop()
        if n.name in seen or n.op_type in ("Cast", "Constant", *weighted) or \
                not all(types.get(o) in _FLOAT for o in n.output):
            continue
        seen.add(n.name)
        todo += [prod[i] for i in n.input if i in prod]

    # Only arithmetic on integers made float: every input a constant, a Cast from an integer type, or such a node's
    # output. A chain that reaches the activations (an index computed from a hidden state) is not kept float:
    # the walk above would have taken the residual stream's Adds and LayerNorms with it.
    def pure(name, depth=0) -> bool:
        if not name or name in inits or types.get(name) not in (None, *_FLOAT):  # constants, integers, masks
            return True
        n = prod.get(name)
        if n is None or depth > 64:
            return False
        if n.op_type == "Constant":
            return True
        if n.op_type == "Cast":
            return types.get(n.input[0]) in _INTEGER
        return n.name in seen and all(pure(i, depth + 1) for i in n.input)

    return [n.name for n in graph.node if n.name in seen and all(pure(o) for o in n.output)]


_SQUEEZED = ("GlobalAveragePool", "ReduceMean")
_GATE_PATH = ("Relu", "Sigmoid", "HardSigmoid", "HardSwish", "Clip", "Mul", "Add", "Conv", "Gemm", "MatMul",
              *SHAPE_OPS)


def _source(name: str, prod: dict) -> str:
    """The tensor ``name`` carries, back through Q/DQ pairs and shape-only ops."""
    n = prod.get(name)
    while n is not None and (n.op_type in ("QuantizeLinear", "DequantizeLinear") or n.op_type in SHAPE_OPS):
        name, n = n.input[0], prod.get(n.input[0])
    return name


def _gates(n, users: dict, prod: dict, pooled: set) -> bool:
    """``n``'s output (through Q/DQ pairs: NNCF quantizes a gate) multiplies the very tensor that was pooled."""
    todo = list(n.output)
    for _ in range(3):
        nxt = []
        for name in todo:
            for u in users.get(name, []):
                if u.op_type == "Mul" and any(_source(i, prod) in pooled for i in u.input):
                    return True
                if u.op_type in ("QuantizeLinear", "DequantizeLinear"):
                    nxt += list(u.output)
        todo = nxt
    return False


def _squeeze_excite(n, prod: dict, users: dict, hops: int = 4) -> bool:
    """Whether compute node ``n`` is one of a squeeze-excitation's layers (NNCF's SE_BLOCK pattern): its input
    comes from a global average pool of some tensor X within ``hops`` nodes of activations and layers, and its
    output reaches, the same way, a Sigmoid (or HardSigmoid) whose result multiplies X itself. A SiLU (x times
    sigmoid(x)) after a pooled MLP head is not one."""
    pooled, todo = set(), [(n.input[0], 0)]
    while todo:
        name, d = todo.pop()
        m = prod.get(name)
        if m is None or d > hops:
            continue
        if m.op_type in _SQUEEZED:
            pooled.add(_source(m.input[0], prod))
        elif m.op_type in _GATE_PATH:
            todo.append((m.input[0], d + 1))
    if not pooled:
        return False
    todo = [(o, 0) for o in n.output]
    while todo:
        name, d = todo.pop()
        for u in users.get(name, []) if d <= hops else []:
            if u.op_type in ("Sigmoid", "HardSigmoid") and _gates(u, users, prod, pooled):
                return True
            if u.op_type in _GATE_PATH:
                todo += [(o, d + 1) for o in u.output]
    return False


def check_qdq(path: str | Path, keep_float=(), own=()) -> dict:
    """Check the QDQ graph rules; raise ExportError on a violation, return a summary.

    A Conv/Gemm/MatMul whose inputs are not both dequantized is allowed only when its module path is in
    ``keep_float`` (or under it), is exactly one of ``own`` (a module's own operation on weights of its own
    that the quantizer has no rule for; not its children's), or is a MatMul of two activations (attention),
    and is then listed as float. ``tensorrt_ready`` says whether every Q/DQ is int8 with
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
    users: dict[str, list] = {}
    for n in g.node:
        for i in n.input:
            users.setdefault(i, []).append(n)
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
        elif keep_float and _in_scope(where, keep_float) or where in own:
            floating.append(where)
        elif not any(dq) and _squeeze_excite(n, prod, users):
            # NNCF's SE_BLOCK pattern leaves a squeeze-excitation's two small layers float on purpose (their
            # output scales every channel: quantized, the gate errs on all of them); nothing else does so
            floating.append(f"{where} (squeeze-excitation)")
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

    users: dict[str, list] = {}
    for n in g.node:
        for i in n.input:
            users.setdefault(i, []).append(n)

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
