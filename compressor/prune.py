"""One-shot layer pruning after LAPTOP-Diff (Zhang et al., 2024), on any teacher.

1. Units: blocks that can be dropped without breaking shapes. A unit is a child of an nn.Sequential or
   nn.ModuleList that has parameters and submodules of its own (a block, not a bare conv or norm) and
   whose output has the shape of its input: residual blocks at constant width, Transformer layers
   (Hugging Face encoders' ``encoder.layer.i`` included). The outermost such block wins.
2. Criterion: s_i = E ||y(without unit i) - y||^2 over calibration batches, each unit removed alone.
3. Selection: the losses are close to additive over sets, so the set to remove is a 0/1 knapsack:
   minimise sum s_i subject to the removed parameters (or FLOPs, or unit count) >= the budget.
4. The pruned model is a copy of the teacher with the units gone: a unit in an nn.Sequential (or any other
   container but a list) becomes ``Removed``, an identity (module paths stay as they were), a unit in an
   nn.ModuleList is deleted from the list
   (a Transformer layer returns a tuple, which an identity would not; a Hugging Face config's
   num_hidden_layers follows). ``removed`` (the teacher's unit paths) rebuilds it: build_pruned().
"""
from __future__ import annotations

import copy
from contextlib import contextmanager
from dataclasses import asdict, dataclass

import torch
from torch import nn

from .intake import first_tensor
from .measure import round_robin_ms as measure_round_robin
from .errors import UserError
from .flops import count_flops as flops  # the one counter, under the name width.py and tests use
from .tasks import call, output, sq_error


@dataclass
class Unit:
    path: str
    params: int
    flops: int = 0
    loss: float = float("nan")  # s_i, the output loss when this unit alone is removed
    latency_ms: float = 0.0  # by: latency: the latency its removal saves on the device (measured or predicted)

    def to_dict(self) -> dict:
        return asdict(self)


def _first_input(args, kwargs):
    t = first_tensor(list(args))
    if t is None:
        t = first_tensor(kwargs.get("hidden_states")) if "hidden_states" in kwargs else first_tensor(kwargs)
    return t


@torch.no_grad()
def find_units(model: nn.Module, example, ignore=()) -> list[Unit]:
    """The prunable units of ``model``, in module order, found on one forward pass of ``example``;
    none at or under the ``ignore`` paths. A block run again before any of its siblings (ALBERT's one layer group,
    at every depth) is no unit; one run twice with its siblings between (a two-view backbone) is."""
    shapes, handles, order = {}, [], []

    def hook_for(name):
        def hook(module, args, kwargs, out):
            order.append(name)
            if name not in shapes:
                i, o = _first_input(args, kwargs), first_tensor(out)
                shapes[name] = (None if i is None else tuple(i.shape), None if o is None else tuple(o.shape))
        return hook

    was = model.training
    model.eval()
    try:
        for name, m in model.named_modules():
            if name:
                handles.append(m.register_forward_hook(hook_for(name), with_kwargs=True))
        call(model, example)
    finally:
        for h in handles:
            h.remove()
        model.train(was)
    units: list[Unit] = []
    containers: list[Unit] = []
    for parent_name, parent in model.named_modules():
        if not isinstance(parent, (nn.Sequential, nn.ModuleList)):
            continue
        for child_name, child in parent.named_children():
            path = f"{parent_name}.{child_name}" if parent_name else child_name
            if not list(child.children()) or path in ignore or path.startswith(tuple(p + "." for p in ignore)):
                continue  # a bare layer is not a block
            if _reused(order, path, parent_name):
                continue  # its weights serve several depths
            n_params = sum(p.numel() for p in child.parameters())
            i, o = shapes.get(path, (None, None))
            if n_params and i is not None and i == o:
                (containers if isinstance(child, (nn.Sequential, nn.ModuleList)) else units).append(Unit(path, n_params))
    # The outermost unit wins: a block inside a removable block is not a unit of its own.
    paths = [u.path for u in units]
    units = [u for u in units if not any(u.path.startswith(p + ".") for p in paths if p != u.path)]
    # A container (an nn.Sequential block in a ModuleList, its residual added in the parent's forward) is a
    # unit when it holds no unit of its own: a stage of residual blocks is searched inside instead.
    paths = [u.path for u in units]
    units += [c for c in containers if not any(p.startswith(c.path + ".") or c.path.startswith(p + ".") for p in paths)]
    paths = [u.path for u in units]
    units = [u for u in units if not any(u.path.startswith(p + ".") for p in paths if p != u.path)]
    order = {name: i for i, (name, _) in enumerate(model.named_modules())}
    return sorted(units, key=lambda u: order[u.path])


def _reused(order: list[str], path: str, parent: str) -> bool:
    """Whether ``path`` ran again in ``order`` with no sibling (child of ``parent``) between: consecutive depths."""
    prefix = f"{parent}." if parent else ""
    runs = [n for n in order if n == path or (n.startswith(prefix) and "." not in n[len(prefix):])]
    return any(a == b == path for a, b in zip(runs, runs[1:]))


def _split(path: str) -> tuple[str, str]:
    parent, _, child = path.rpartition(".")
    return parent, child


class Removed(nn.Identity):
    """What stands in for a removed unit inside an nn.Sequential: its input, copied while autograd records. A
    block that adds its shortcut in place (RegNetY's ``hidden_state += residual``) would otherwise modify an
    activation's output its backward still needs, when the units after that activation are all removed. A
    unit called with more than its input (CvT's ``layer(hidden_state, height, width)``) passes the input on."""

    def forward(self, input, *args, **kwargs):
        # a Proxy under torch.fx (BatchNorm folding traces the student) and a tuple a block passes on go through
        if isinstance(input, torch.Tensor) and torch.is_grad_enabled() and input.requires_grad:
            return input.clone()
        return input


def _remove(model: nn.Module, paths) -> list:
    """Remove units in place; return what restores them (in the order to undo)."""
    undo = []
    by_parent: dict[str, list[str]] = {}
    for p in paths:
        parent, child = _split(p)
        by_parent.setdefault(parent, []).append(child)
    # Every parent is found before anything is removed: a unit's path names indices of the teacher's lists
    # (ConvNeXtV2: encoder.stages.0 and encoder.stages.1.layers.1 in one genome)
    parents = {name: model.get_submodule(name) if name else model for name in by_parent}
    for parent_name, children in by_parent.items():
        parent = parents[parent_name]
        if isinstance(parent, nn.ModuleList):
            # Delete from the back, so the earlier indices still name the teacher's layers.
            for idx in sorted((int(c) for c in children), reverse=True):
                undo.append(("insert", parent, idx, parent[idx]))
                del parent[idx]
        else:
            for c in children:
                undo.append(("set", parent, c, getattr(parent, c)))
                setattr(parent, c, Removed())
    return undo


def _restore(undo) -> None:
    for kind, parent, key, module in reversed(undo):
        if kind == "insert":
            parent.insert(key, module)
        else:
            setattr(parent, key, module)


@contextmanager
def without(model: nn.Module, paths):
    """The model with ``paths`` removed while the block runs, then exactly as before."""
    undo = _remove(model, paths)
    try:
        yield model
    finally:
        _restore(undo)


def build_pruned(teacher: nn.Module, removed) -> nn.Module:
    """A copy of the teacher, with the teacher's weights, without the ``removed`` units."""
    student = copy.deepcopy(teacher)
    lists = {}
    for p in removed:
        parent, _ = _split(p)
        m = student.get_submodule(parent) if parent else student
        if isinstance(m, nn.ModuleList):
            lists[parent] = (m, len(m))  # the list itself: its path may name another index afterwards
    _remove(student, removed)
    # The config of a Hugging Face model, or of the one a wrapper holds (compressor.hf.SentenceEncoder).
    config = getattr(student, "config", None) or getattr(getattr(student, "model", None), "config", None)
    for m, before in lists.values():
        # Hugging Face models size caches and masks from config.num_hidden_layers.
        if config is not None and getattr(config, "num_hidden_layers", None) == before:
            config.num_hidden_layers = len(m)
    return student.requires_grad_(True)


@torch.no_grad()
def set_loss(model: nn.Module, paths, batches, refs=None) -> float:
    """E ||y(without paths) - y||^2 over the calibration batches (per sample, summed over outputs)."""
    model.eval()
    refs = refs if refs is not None else [output(model, b) for b in batches]
    with without(model, paths):
        total = sum(sq_error(output(model, b), r) for b, r in zip(batches, refs))
    return total / sum(len(r) for r in refs)


@torch.no_grad()
def score_units(model: nn.Module, units: list[Unit], batches, with_flops: bool = True) -> list[Unit]:
    """Fill each unit's loss s_i (and the FLOPs its removal saves, per sample)."""
    was = model.training
    model.eval()
    try:
        refs = [output(model, b) for b in batches]
        total_flops = flops(model, batches[0]) if with_flops else 0
        for u in units:
            u.loss = set_loss(model, [u.path], batches, refs)
            if with_flops:
                with without(model, [u.path]):
                    u.flops = total_flops - flops(model, batches[0])
    finally:
        model.train(was)
    return units


def select(units: list[Unit], by: str, budget: float, others: bool = False) -> list[Unit]:
    """The set of units with the least summed loss whose summed cost (params / flops / 1 each) reaches
    ``budget``: a covering 0/1 knapsack, solved exactly by dynamic programming over the reachable cost
    sums (capped at the budget) with dominated states dropped. Repeated blocks share their cost, so
    the distinct sums stay few (a stack of n equal layers has n + 1). ``others``: blocks the user left out
    with prune.ignore remain, so every unit may go.
    """
    cost = [1 if by == "units" else getattr(u, COST[by]) for u in units]
    total = sum(cost)
    if budget > total:
        raise UserError(f"prune: removing every prunable unit ({len(units)}: {', '.join(u.path for u in units)}) "
                        f"saves {total:,.6g} {by}, short of the {budget:,.6g} asked; lower prune.remove")
    shown = budget
    if by == "latency":
        # Milliseconds are floats: every subset would be a state of its own. On a grid of 1/1000 of the
        # budget the states stay at most 1001, and a unit's cost moves by at most 0.05% of the budget.
        cost = [round(c * 1000 / budget) for c in cost]
        budget = 1000
    # state: capped cost -> (least loss, chosen indices)
    states: dict[float, tuple[float, tuple[int, ...]]] = {0: (0.0, ())}
    for i, u in enumerate(units):
        for c, (loss, chosen) in list(states.items()):
            nc = min(budget, c + cost[i])
            if nc not in states or loss + u.loss < states[nc][0]:
                states[nc] = (loss + u.loss, chosen + (i,))
        # A state with less cost and no less loss than another can never be the better start.
        kept, best = {}, float("inf")
        for c in sorted(states, reverse=True):
            if states[c][0] < best:
                kept[c], best = states[c], states[c][0]
        states = kept
    chosen = states[budget][1]
    if len(chosen) == len(units) and not others:
        raise UserError(f"prune: a budget of {shown:,.6g} {by} removes every prunable unit "
                        f"({', '.join(u.path for u in units)}), which leaves no model; lower prune.remove")
    return [units[i] for i in sorted(chosen)]


COST = {"params": "params", "flops": "flops", "latency": "latency_ms"}  # budget -> Unit attribute


def _features(model: nn.Module, x: torch.Tensor, removed) -> dict:
    """The latency predictor's features (compressor.calibrate) of ``model`` without the ``removed``
    units, computed on a copy where they are deleted from their container: an nn.Identity standing in
    for a block exports to nothing, so it must not count as a layer or an activation."""
    from .calibrate import features

    m = copy.deepcopy(model)
    for p in removed:
        parent, child = _split(p)
        del (m.get_submodule(parent) if parent else m)._modules[child]  # containers run what remains
    return features(m.eval(), x)


# --------------------------------------------------------------------------- latency as the budget

@torch.no_grad()
def unit_latencies(model: nn.Module, units: list[Unit], example, *, device=None, predictor=None,
                   rounds: int = 3, log=print, **measure_kw) -> dict:
    """Fill each unit's ``latency_ms``: the teacher's latency minus the teacher's without that unit alone.

    With a ``device`` every variant (a pruned copy) is measured ``rounds`` times round robin and its fastest
    run kept (a shared machine only ever adds time, so the minimum is the repeatable figure). With a ``predictor``
    (devices.predictor.LatencyPredictor) each variant's features go through it instead. A unit whose
    difference comes out negative (noise) saves 0. Latency is close to additive over sequential blocks,
    so the knapsack over these costs is the same problem as over parameters.
    """
    if isinstance(example, dict):
        raise UserError("prune by: latency exports the model with one tensor input; this teacher takes a dict "
                        "(Hugging Face inputs): prune by params or flops instead")
    model.eval()
    x = example[:1]
    variants = [[]] + [[u.path] for u in units]
    if predictor is not None:
        def one(paths):
            return predictor.predict_ms(_features(model, x, paths))

        ms = [one(v) for v in variants]
        how = f"predicted ({predictor.device} {predictor.method} predictor)"
    else:
        ms = measure_round_robin([build_pruned(model, v).eval() for v in variants], x, device, rounds=rounds,
                                 **measure_kw)
        how = f"measured (fastest run of {rounds} rounds, round robin)"
    for u, m in zip(units, ms[1:]):
        u.latency_ms = max(0.0, ms[0] - m)
    log(f"prune: teacher {ms[0]:.4g} ms {how}; removing one unit saves "
        + ", ".join(f"{u.path} {u.latency_ms:.3g}" for u in units) + " ms")
    return {"teacher_ms": ms[0], "how": how}


def calibration_batches(data, batch_size: int, n: int, labels: bool = False):
    """The first ``n`` training batches (inputs; with ``labels``, also their labels: (inputs, labels))."""
    batches, ys = [], []
    for x, y in data.loader("train", batch_size):
        batches.append(x)
        ys.append(y)
        if len(batches) == n:
            break
    return (batches, ys) if labels else batches


def prune_teacher(teacher: nn.Module, batches, by: str = "params", remove: float = 0.5, log=print, *,
                  device=None, predictor=None, measure_kw: dict | None = None, ignore=()):
    """Find, score and select units; return (pruned student, record dict with every unit's numbers).
    ``by="latency"`` needs a ``device`` to measure on or a latency ``predictor``."""
    units = find_units(teacher, batches[0], ignore)
    if not units:
        raise UserError(f"prune: {type(teacher).__name__} has no prunable unit (a block in an nn.Sequential or "
                        "nn.ModuleList whose output has its input's shape; a block whose weights serve several "
                        "depths, run again before its siblings, is not one); prune its channels instead "
                        "(prune: {channels: {remove: 0.5}}) or drop the prune section")
    score_units(teacher, units, batches)
    lat = {}
    if by == "latency":
        if device is None and predictor is None:
            raise UserError("prune by: latency needs a device to measure on or a latency predictor")
        lat = unit_latencies(teacher, units, batches[0], device=device, predictor=predictor, log=log,
                             **(measure_kw or {}))
    total = {"params": lambda: sum(p.numel() for p in teacher.parameters()), "flops": lambda: flops(teacher, batches[0]),
             "units": lambda: len(units), "latency": lambda: lat["teacher_ms"]}[by]()
    budget = remove if by == "units" else remove * total
    chosen = select(units, by, budget, others=bool(ignore) and len(find_units(teacher, batches[0])) > len(units))
    removed = [u.path for u in chosen]
    student = build_pruned(teacher, removed)
    predicted = sum(u.loss for u in chosen)
    measured = set_loss(teacher, removed, batches)
    teacher.eval()
    got = "" if by in ("units", "latency") else f", {sum(getattr(u, COST[by]) for u in chosen) / total:.0%} of the " \
        f"{by} (asked {remove:.0%}: whole units overshoot)"
    log(f"pruned {len(removed)} of {len(units)} units ({', '.join(removed)}): {sum(u.params for u in chosen):,} "
        f"params{got}, output loss {measured:.4g} (sum of single-unit losses {predicted:.4g})")
    info = {"units": [u.to_dict() for u in units], "removed": removed, "by": by, "remove": remove,
            "budget": budget, "predicted_loss": predicted, "measured_loss": measured,
            "params": sum(p.numel() for p in student.parameters()), "flops": flops(student, batches[0])}
    if by == "latency":
        # The latency the knapsack counted on (sum of single-unit savings) against the pruned model's own.
        saved = sum(u.latency_ms for u in chosen)
        if predictor is not None:
            after = predictor.predict_ms(_features(teacher, batches[0][:1], removed))
            before = lat["teacher_ms"]
        else:
            # The teacher again beside the pruned model, so both figures share the machine's state.
            before, after = measure_round_robin([teacher, student.eval()], batches[0], device, **(measure_kw or {}))
        info["latency"] = {"how": lat["how"], "teacher_ms": before, "sum_of_unit_savings_ms": saved,
                           "pruned_ms": after, "saved_ms": before - after}
        if after >= before:
            info["latency"]["warning"] = "the pruned model was not faster than the teacher in this measurement"
            log(f"prune: warning: the pruned model measured {after:.4g} ms against the teacher's {before:.4g} ms: "
                "this machine's noise is larger than the savings; latency: predict (a calibrated predictor) or "
                "by: flops is steadier here")
        log(f"prune: latency {before:.4g} -> {after:.4g} ms ({lat['how'].split(' ')[0]}; "
            f"the units' savings summed to {saved:.4g} ms, budget {budget:.4g} ms)")
    return student, info


# ------------------------------------------------------------------------------------ pruned students

def rebuild(genome: dict) -> nn.Module:
    """A pruned student from its genome alone (the teacher's builder, config and removed units); its
    weights then come from the bundle's model/student.pt."""
    from .models import build_model

    teacher = build_model(genome["model"], genome["config"], genome.get("defaults"), what="pruned teacher")
    return narrowed(build_pruned(teacher, genome["removed"]), genome.get("width"), genome.get("channels"))


def narrowed(student: nn.Module, plan: dict | None, channels: dict | None = None) -> nn.Module:
    """The layer-pruned teacher with the width plan's neurons and heads cut (compressor/width.py), then
    reshaped to the channel plan (compressor/structural/: shapes only, load the pruned weights next)."""
    if plan:
        from .width import apply_plan

        student = apply_plan(student, plan)
    if channels:
        from .structural import apply_plan as reshape

        student = reshape(student, channels)
    return student
