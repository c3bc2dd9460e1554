"""What width pruning (compressor/width.py) can cut: FFN pairs and attention heads, found on any model and
checked numerically, never assumed from names.

- An FFN pair: a Linear A and the next Linear B (in execution order) with B.in_features == A.out_features, such
  that cutting channels out of A's outputs and B's inputs gives exactly the model with those channels of B's
  input set to zero. An elementwise activation between them passes; a LayerNorm, a residual use of A's output or
  a reshape into heads does not (the check fails or the sliced copy does not run). In a Transformer layer that
  is the intermediate/output pair. A gated FFN (SwiGLU's ``down(act(gate(x)) * up(x))``) has a second producer
  between them, reading A's input at A's width: its rows go with A's (``also``). GPT-2's Conv1D counts as the
  Linear it equals (a cut one becomes that Linear).
- Attention heads, whose outputs are head-wide slices of the input of the attention's output projection (the
  ``gate``), in one of two ways:
  - a module with ``prune_heads`` (Hugging Face's BERT family, T5) which holds, or whose child holds,
    ``attention_head_size`` (T5: ``key_value_proj_dim``) and a head count (``num_attention_heads``; DistilBERT's
    and T5's ``n_heads``): cut by its own ``prune_heads``;
  - any other module holding a head size (``head_dim``, ``head_size``, ``attention_head_size``) or a head
    count, whose Linears are called with the output projection last, in one of three layouts (``layouts``):
    separate q, k, v projections (Llama, Qwen2, Mistral, Gemma, Phi, OPT; with grouped-query attention a
    key/value head goes together with the query heads that read it; with a single key/value head, multi-query
    attention as in Falcon, query heads go alone: ``shared``); one projection whose rows are
    [q | k | v] (blocked: ModernBERT, GPT-2, a timm ViT); or head after head [q k v] (interleaved: GPT-NeoX).
    A head goes by removing its rows from the projections and its columns from the output projection.
    Modules that reshape by -1 (Llama) need nothing more; others reshape by a count or width they keep
    (OPT's ``num_heads``, GPT-2's ``split_size``), which must follow the cut. The first candidate (layout and
    attributes that follow, fewest first) that cuts exactly is the module's; the plan records it.

Each group is checked the same way: half its elements cut on a copy must equal the model with them zeroed at
the gate.
"""
from __future__ import annotations

import copy
import itertools
from dataclasses import dataclass, field

import torch
from torch import nn

from .hf import HEAD_LAYOUTS
from .surgery import features, first_inputs, sliced_linear
from .surgery import gated as _gated
from .surgery import get_module as _get
from .surgery import set_module as _set
from .surgery import swapped as _swapped
from .tasks import output

HEAD_COUNTS = tuple(count for count, _ in HEAD_LAYOUTS)  # the head count's name in Hugging Face attention modules
PRUNED_SIZES = ("attention_head_size", "key_value_proj_dim")  # the head size beside it (T5's is key_value_proj_dim)


@dataclass
class Group:
    kind: str  # "ffn" or "heads"
    path: str  # ffn: B, the Linear whose input channels go; heads: the attention module
    gate: str  # the Linear whose input the mask scales (ffn: B itself; heads: the attention's output Linear)
    producer: str  # ffn: A, whose output rows go; heads: the module holding the head count
    size: int  # neurons or heads
    width: int  # gate input channels per element: 1 for a neuron, head_dim for a head
    flops: float = 0.0  # FLOPs one element costs per sample (counted on the calibration example)
    cost: float | None = None  # what one element costs in the budget's unit, where not FLOPs (ms: measure_costs)
    scores: list = field(default_factory=list)  # s_j per element
    layout: dict | None = None  # heads of a module without prune_heads: how cut_heads cuts them (``layouts``)
    also: tuple = ()  # ffn: the producer's siblings whose output rows go with it (SwiGLU's up projection)
    halves: int = 1  # ffn: 2 where the producer's output is two fused projections, neuron j's rows j and size + j

    def summary(self) -> dict:
        return {"kind": self.kind, "path": self.path, "size": self.size, "flops_per_element": self.flops,
                **({"ms_per_element": self.cost} if self.cost is not None else {})}


# ------------------------------------------------------------------------------------------ finding

def _flipped(x):
    if isinstance(x, torch.Tensor):
        return x.flip(0) if x.dim() and x.shape[0] > 1 else x
    if isinstance(x, dict):
        return {k: _flipped(v) for k, v in x.items()}
    return type(x)(_flipped(v) for v in x) if isinstance(x, (list, tuple)) else x


def _input_free(model: nn.Module, example, a: dict) -> set[str]:
    """The Linears whose input is the same whatever the model is given (an MLP over a buffer, as Swin V2's
    position bias): ``a``, their inputs on ``example``, against those on its samples in reverse order. Runtimes
    fold such a subgraph at load, so cutting it saves nothing deployed while it changes every sample's output."""
    paths = list(a)
    b = first_inputs(model, _flipped(example), paths)
    return {p for p in paths if isinstance(a.get(p), torch.Tensor) and isinstance(b.get(p), torch.Tensor)
            and a[p].shape == b[p].shape and torch.equal(a[p], b[p])
            and a[p].dim() and not torch.equal(a[p], a[p].flip(0))}


def producer_rows(keep: torch.Tensor, size: int, halves: int = 1) -> torch.Tensor:
    """The producer's output rows of the kept neurons: ``keep`` in each of its ``halves`` fused projections."""
    return torch.cat([keep + h * size for h in range(halves)])


def ffn_swap(model: nn.Module, g: Group, keep) -> dict:
    keep = torch.as_tensor(sorted(keep), dtype=torch.long)
    rows = producer_rows(keep, g.size, g.halves)
    return {**{p: sliced_linear(_get(model, p), rows=rows) for p in (g.producer, *g.also)},
            g.path: sliced_linear(_get(model, g.path), cols=keep)}


def heads_swap(model: nn.Module, g: Group, removed) -> dict:
    return {g.path: cut_heads(copy.deepcopy(_get(model, g.path)), g.layout, removed)}


def gate_mask(g: Group, removed, device=None) -> torch.Tensor:
    m = torch.ones(g.size * g.width, device=device)
    for j in removed:
        m[j * g.width:(j + 1) * g.width] = 0
    return m


@torch.no_grad()
def _exact(model: nn.Module, g: Group, example, tol: float = 1e-4) -> bool:
    """Whether cutting half the group's elements equals zeroing them at the gate (on ``example``)."""
    gen = torch.Generator().manual_seed(0)
    removed = torch.randperm(g.size, generator=gen)[: max(1, g.size // 2)].tolist()
    with _gated(model, {g.gate: gate_mask(g, removed)}):
        ref = output(model, example)
    keep = [j for j in range(g.size) if j not in set(removed)]
    swap = ffn_swap(model, g, keep) if g.kind == "ffn" else heads_swap(model, g, removed)
    try:
        with _swapped(model, swap):
            got = output(model, example)
    except (RuntimeError, ValueError, IndexError, AssertionError):  # a reshape into heads, a wrong width
        return False
    return got.shape == ref.shape and float((got - ref).abs().max()) <= tol * (1 + float(ref.abs().max()))


def _head_groups(model: nn.Module, order: list[str], example) -> list[Group]:
    groups = []
    for path, m in model.named_modules():
        if not callable(getattr(m, "prune_heads", None)) or hasattr(m, "base_model_prefix"):
            continue  # a PreTrainedModel's prune_heads takes a dict over layers; its layers' modules come next
        holder = next(((p, c, a, z) for p, c in m.named_modules() for a in HEAD_COUNTS for z in PRUNED_SIZES
                       if hasattr(c, a) and hasattr(c, z)), None)
        if holder is None:
            continue
        n, d = int(getattr(holder[1], holder[2])), int(getattr(holder[1], holder[3]))
        prefix = f"{path}." if path else ""
        gates = [p for p in order if p.startswith(prefix) and features(_get(model, p))[0] == n * d]
        if n < 2 or not gates:
            continue
        g = Group("heads", path, gates[-1], f"{prefix}{holder[0]}".rstrip("."), n, d)
        if _exact(model, g, example):
            groups.append(g)
            continue
        # a table of the holder's indexed by head (Swin's relative-position bias) is cut with prune_heads' heads
        tables = [(f"{holder[0]}.{name}".lstrip("."), axis) for name, axis in _tables(holder[1], n)]
        g.layout = {"kind": "prune_heads", "heads": n, "tables": tables}
        if tables and _exact(model, g, example):
            groups.append(g)
    for path, m in model.named_modules():  # modules that cannot cut their own heads (``layouts``)
        if any(path == g.path or path.startswith(f"{g.path}.") or g.path.startswith(f"{path}.") for g in groups):
            continue
        for layout in layouts(model, path, order):
            gate = f"{path}.{layout['out']}" if path else layout["out"]
            g = Group("heads", path, gate, path, elements(m, layout), layout["rep"] * layout["dim"],
                      layout=layout)
            if g.size >= 2 and _exact(model, g, example):
                groups.append(g)
                break
    return groups


def _ffn_groups(model: nn.Module, inputs: dict, example, taken: list[Group]) -> list[Group]:
    order = list(inputs)
    # the Linears a head group cuts: all of a prune_heads module's, the layout's own of any other
    whole = [g for g in taken if not g.layout or g.layout["kind"] == "prune_heads"]
    inside = tuple(f"{g.path}." for g in whole) + tuple(
        f"{g.path}.{p}" if g.path else p
        for g in taken if g not in whole for p in (*g.layout["projections"], g.layout["out"]))
    groups, fixed = [], _input_free(model, example, inputs)
    for i, a in enumerate(order):
        if a.startswith(inside) or any(a in g.also for g in groups) or a in fixed:
            continue
        f_in, f_out = features(_get(model, a))
        for halves in (1, 2):  # 2: A holds gate and up projections fused, chunked in two (ModernBERT, Phi-3)
            j = next((j for j in range(i + 1, len(order)) if features(_get(model, order[j]))[0] * halves == f_out),
                     None)
            if j is None or order[j].startswith(inside) or f_out < 2 or any(g.path == order[j] for g in groups):
                continue
            # a gated FFN (SwiGLU: down(act(gate(x)) * up(x))): the Linears between that read A's input at its width
            siblings = tuple(p for p in order[i + 1:j] if features(_get(model, p)) == (f_in, f_out))
            candidates = (Group("ffn", order[j], order[j], a, f_out // halves, 1, also=also, halves=halves)
                          for also in (((), siblings) if siblings else ((),)))
            found = next((g for g in candidates if _exact(model, g, example)), None)
            if found:
                groups.append(found)
                break
    return groups


def find_groups(model: nn.Module, example, ffn: bool = True, heads: bool = True) -> list[Group]:
    """The model's prunable FFN pairs and attention-head sets, each checked to cut exactly."""
    was = model.training
    model.eval()
    try:
        # the Linear (and Conv1D) layers in the order a forward pass first calls them, with what they are called on
        inputs = first_inputs(model, example, [p for p, m in model.named_modules() if features(m) is not None])
        hg = _head_groups(model, list(inputs), example) if heads else []
        fg = _ffn_groups(model, inputs, example, hg) if ffn else []
    finally:
        model.train(was)
    return hg + fg


# ------------------------------------------------------------- heads of modules without prune_heads

SIZES = ("head_dim", "head_size", "attention_head_size", "d_k", "dim_head")  # d_k, h: the Annotated Transformer's
COUNTS = ("num_heads", "num_attention_heads", "n_heads", "n_head", "heads", "h")


def _named(ints: dict) -> tuple[list[str], list[str]]:
    """(head-size names, head-count names) among ``ints``: those above first, then any other name with "head"
    in it (a size where it also says dim or size: ``nhead``, ``n_heads_q``, ``dim_per_head``)."""
    def sized(a):
        return a in SIZES or "head" in a and ("dim" in a or "size" in a)
    sizes = [a for a in SIZES if a in ints] + [a for a in ints if a not in SIZES and sized(a)]
    counts = [a for a in COUNTS if a in ints] + [a for a in ints if a not in COUNTS and "head" in a and not sized(a)]
    return sizes, counts


def _head_size(ints: dict, f_in: int) -> int:
    """The head size: a known size name's, else one a known count gives, else the other names' in that order
    (the first that splits the ``f_in`` inputs of the output projection into two heads or more); 0 if none."""
    sizes, counts = _named(ints)
    for known in (True, False):
        for a in [a for a in sizes if (a in SIZES) == known] + [a for a in counts if (a in COUNTS) == known]:
            d = ints[a] if a in sizes else (f_in // ints[a] if f_in % ints[a] == 0 else 0)
            if d and f_in % d == 0 and f_in // d >= 2:
                return d
    return 0


def _ints(m: nn.Module) -> dict[str, int]:
    return {k: v for k, v in vars(m).items() if type(v) is int and v > 0}


def layouts(model: nn.Module, path: str, order: list[str]) -> list[dict]:
    """Candidate layouts of the module at ``path`` (``order``: the model's Linear and Conv1D paths in call order),
    each with one choice of the integer attributes that follow the cut; fewest changes first. The output
    projection is the last Linear the module calls, or an earlier one (a block whose FFN comes after it)."""
    m = _get(model, path)
    prefix = f"{path}." if path else ""
    inner = [p for p in order if p.startswith(prefix)]
    ints = _ints(m)
    if len(inner) < 2 or not any(_named(ints)):
        return []
    found = [c for i in range(len(inner) - 1, 0, -1) for c in _layouts(model, inner[:i + 1], ints, len(prefix))]
    # then each with the module's own tables indexed by head cut too (a learned bias per head on the scores:
    # EfficientFormer's attention_biases, WavLM's relative-position Embedding)
    return found + [{**c, "tables": t} for c in found if (t := _tables(m, elements(m, c) * c["rep"]))]


def _tables(m: nn.Module, n: int) -> list[tuple[str, int]]:
    """``m``'s own parameters and buffers, and its Embeddings' weights, with exactly one axis of size ``n`` (the
    query heads): (name, axis)."""
    own = [*m.named_parameters(recurse=False), *m.named_buffers(recurse=False),
           *((f"{c}.weight", e.weight) for c, e in m.named_children() if isinstance(e, nn.Embedding))]
    return [(name, axes[0]) for name, t in own if t is not None and t.dim() >= 1
            and len(axes := [i for i, size in enumerate(t.shape) if size == n]) == 1]


def _layouts(model: nn.Module, inner: list[str], ints: dict, cut: int) -> list[dict]:
    """The candidates with ``inner[-1]`` as the output projection and the Linears before it as q, k, v."""
    f_in = features(_get(model, inner[-1]))[0]
    d = _head_size(ints, f_in)
    if not d:
        return []
    n_q, rel = f_in // d, (lambda p: p[cut:])
    shapes = [features(_get(model, p)) for p in inner[:-1]]
    found = []
    if len(shapes) >= 3 and len({s[0] for s in shapes[-3:]}) == 1:  # separate: three projections of one input
        three = list(zip(inner[-4:-1], shapes[-3:]))
        q = [p for p, s in three if s[1] == n_q * d]
        kv = [p for p, s in three if p not in q[:1]]
        width = features(_get(model, kv[0]))[1] if len(kv) == 2 else 0
        if q and width and width % d == 0 and width == features(_get(model, kv[1]))[1] and n_q % (width // d) == 0:
            rep = n_q * d // width
            found.append({"kind": "separate", "projections": [rel(q[0]), *map(rel, kv)], "rep": rep,
                          **({"shared": True, "rep": 1} if rep == n_q else {})})
    if shapes:  # one fused projection: q, then the keys' and the values' heads
        out = shapes[-1][1]
        n_kv = (out // d - n_q) // 2 if out % d == 0 else 0
        if n_kv > 0 and out // d == n_q + 2 * n_kv and n_q % n_kv == 0:
            found.append({"kind": "blocked", "projections": [rel(inner[-2])], "rep": n_q // n_kv,
                          **({"shared": True, "rep": 1} if n_kv == 1 else {})})
            if n_kv == n_q:
                found.append({"kind": "interleaved", "projections": [rel(inner[-2])], "rep": 1})
    counts = {a: "heads" for a in _named(ints)[1] if ints[a] == n_q}
    # one key/value head for all (multi-query): query heads are cut alone, and the queries per key/value head
    # follow too (Llama's num_key_value_groups, read only where a mask makes it repeat k and v)
    shared = {**counts, **{a: "heads" for a, v in ints.items() if v == n_q and "group" in a and a not in SIZES}}
    widths = [a for a, v in ints.items() if v == n_q * d and a not in SIZES and "layer" not in a]
    choices = [{}, counts, *({**counts, a: "width"} for a in widths), {**counts, **dict.fromkeys(widths, "width")}]
    unique = list({tuple(sorted(c.items())): c for c in choices}.values())
    return [{**f, "out": rel(inner[-1]), "dim": d, "attrs": {**a, **shared} if f.get("shared") else a}
            for f, a in itertools.product(found, unique)]


def elements(module: nn.Module, layout: dict) -> int:
    """How many elements (key/value heads, each with its query heads) the module has."""
    return features(_get(module, layout["out"]))[0] // layout["dim"] // layout["rep"]


def cut_heads(module: nn.Module, layout: dict | None, removed) -> nn.Module:
    """Remove the key/value heads ``removed`` (with their query heads) from ``module`` in place (``layout`` None:
    by the module's own prune_heads)."""
    if layout is None or layout["kind"] == "prune_heads":  # prune_heads, and the tables it leaves
        gone = sorted(int(r) for r in removed)
        module.prune_heads(gone)
        if layout is not None:
            _cut_tables(module, layout["tables"], [j for j in range(layout["heads"]) if j not in gone])
        return module
    d, rep, n = layout["dim"], layout["rep"], elements(module, layout)
    keep = [j for j in range(n) if j not in {int(r) for r in removed}]
    queries = [j * rep + r for j in keep for r in range(rep)]

    def rows(heads, at=0, size=d):
        return torch.tensor([at + h * size + i for h in heads for i in range(size)], dtype=torch.long)

    kind, projections = layout["kind"], layout["projections"]
    if layout.get("shared"):  # one key/value head that every query head reads: only query heads go
        kv = torch.arange(n * d, (n + 2) * d)
        cuts = {projections[0]: rows(queries) if kind == "separate" else torch.cat([rows(queries), kv])}
    elif kind == "separate":
        cuts = dict(zip(projections, (rows(queries), rows(keep), rows(keep))))
    elif kind == "blocked":
        cuts = {projections[0]: torch.cat([rows(queries), rows(keep, n * rep * d), rows(keep, (n * rep + n) * d)])}
    else:
        cuts = {projections[0]: rows(keep, 0, 3 * d)}
    for p, r in cuts.items():
        _set(module, p, sliced_linear(_get(module, p), rows=r))
    _set(module, layout["out"], sliced_linear(_get(module, layout["out"]), cols=rows(queries)))
    for name, what in layout["attrs"].items():
        setattr(module, name, len(queries) * (d if what == "width" else 1))
    _cut_tables(module, layout.get("tables", ()), queries)
    return module


def _cut_tables(module: nn.Module, tables, heads: list[int]) -> None:
    """Keep only ``heads`` along each table's head axis (``tables``: (name under ``module``, axis))."""
    for name, axis in tables:
        owner, _, attr = name.rpartition(".")
        holder = _get(module, owner) if owner else module
        t = getattr(holder, attr)
        cut = t.detach().index_select(axis, torch.tensor(heads, dtype=torch.long, device=t.device))
        if isinstance(t, nn.Parameter):
            setattr(holder, attr, nn.Parameter(cut, requires_grad=t.requires_grad))
        else:
            holder.register_buffer(attr, cut, persistent=attr not in holder._non_persistent_buffers_set)
        if isinstance(holder, nn.Embedding):
            holder.embedding_dim = cut.shape[1]
