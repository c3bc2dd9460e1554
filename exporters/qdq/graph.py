"""The QDQ graph: the rules ONNX Runtime, OpenVINO and TensorRT share (``check_qdq``), the float arithmetic of an
integer index static quantization leaves alone (``index_math``), and the node-name helpers (rewrite.py changes
a file: ``fold_weight_quantizers``, ``requantize_moved``)."""
from __future__ import annotations

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


def _users(graph) -> dict[str, list]:
    """{tensor: the nodes that read it}."""
    users: dict[str, list] = {}
    for n in graph.node:
        for i in n.input:
            users.setdefault(i, []).append(n)
    return users


# Ops that only move values: a DQ before them still feeds the next op exact quantized values, and ORT and
# TensorRT both move Q/DQ across them (NNCF puts the head's quantizer before Flatten).
SHAPE_OPS = ("Flatten", "Reshape", "Transpose", "Squeeze", "Unsqueeze", "Identity")


# Ops whose every output value is one of their data input's, so a DQ before them still feeds exact quantized
# values: NNCF quantizes a max-pool's, an index's or a max-reduction's input, not its output (a ResNet's stem
# MaxPool, a TCN's x[:, :, -1], PointNet's max over points), and ONNX Runtime moves the DQ across them.
PICKS = ("MaxPool", "GlobalMaxPool", "ReduceMax", "ReduceMin", "Gather", "Slice", "Split", "Expand", "Tile",
         "DepthToSpace", "SpaceToDepth")


def _moves_only(n) -> bool:
    """A shape-only op, one that picks values of its input (PICKS; a zero Pad; a nearest-neighbour Resize), or a
    Cast to float32 (of a float32 value: DINOv2 casts its pixels to the weight's dtype)."""
    attrs = {a.name: a for a in n.attribute}
    return (n.op_type in SHAPE_OPS or n.op_type in PICKS
            or n.op_type == "Pad" and (len(n.input) < 3 or not n.input[2])  # zeros, or copies (edge, reflect)
            or n.op_type == "Resize" and "mode" in attrs and attrs["mode"].s == b"nearest"
            or n.op_type == "Cast" and "to" in attrs and attrs["to"].i == 1)


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
    casts = [n for n in graph.node if n.op_type == "Cast" and any(a.name == "to" and a.i in _INTEGER for a in n.attribute)]
    seen, todo = set(), [prod[i] for n in casts for i in n.input if i in prod]
    while todo:
        n = todo.pop()
        if n.name in seen or n.op_type in ("Cast", "Constant", *COMPUTE_OPS) or \
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
    users = _users(g)
    quantized, floating, bad, per_channel = [], [], [], []
    live = {i.name for i in g.input} - set(inits)  # what a model input reaches: the rest is folded at load
    for n in g.node:
        if any(i in live for i in n.input):
            live.update(n.output)
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
        elif not any(i in live for i in n.input):  # a table computed from weights alone (Swin V2's position-bias
            floating.append(f"{where} (constant: no model input reaches it)")  # MLP): runtimes fold it
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
    # A scale that is not a positive finite number quantizes everything it covers to garbage (a calibrated
    # attention mask's -inf gave one of inf: int8 accuracy 0.49 against 0.99, and the file passed)
    def positive(name):
        s = numpy_helper.to_array(inits[name])
        return bool(np.all(np.isfinite(s) & (s > 0)))

    broken = sorted({n.input[0] for n in g.node if n.op_type in ("QuantizeLinear", "DequantizeLinear")
                     and n.input[1] in inits and not positive(n.input[1])  # a DQ after its Q: said once
                     and not (n.op_type == "DequantizeLinear" and getattr(prod.get(n.input[0]), "op_type", "")
                              == "QuantizeLinear")})
    if broken:
        raise ExportError(f"{Path(path).name}: {len(broken)} Q/DQ scale(s) not a positive finite number, on "
                          f"{', '.join(broken[:5])}: a calibration range that was not finite")
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
