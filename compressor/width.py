"""Width pruning: FFN neurons, attention heads and the residual stream cut out of the teacher's own weights.

Layer pruning (compressor/prune.py) removes whole blocks; this narrows the blocks that stay. Together they
make a student much smaller than the teacher that still starts from the teacher's weights.

1. Groups (compressor/groups.py), found on any model and checked numerically, never assumed from names: FFN
   pairs (gated ones too: SwiGLU) and attention heads, either by a module's own ``prune_heads`` (Hugging Face's
   BERT family) or by the layouts of modules without one (Llama, Qwen2, Mistral, Gemma, Phi, OPT, GPT-NeoX,
   GPT-2, ModernBERT, a user's own; nn.MultiheadAttention once compressor/attention.py splits it into
   Linears, which the plan's ``split`` repeats on rebuild). Each group has a ``gate``: the Linear whose input
   channels it owns.
2. Criterion: LAPTOP-Diff's output loss (prune.py), linearised so thousands of elements cost a few
   backward passes. With a mask m on each gate's input (per neuron, or per head slice), removing element j
   changes the output by about -dy/dm_j, so s_j = E ||dy/dm_j||^2 per sample. It is estimated with random
   projections: for r ~ N(0, I), E_r (r . dy/dm)^2 = ||dy/dm||^2, and the sum over a batch has the
   per-sample squares as its expectation. Scores are taken at the model's output, so they compare across
   layers and between neurons and heads.
3. Selection: neurons go in blocks of ``multiple`` (the lowest-scoring first within a pair, so kept widths
   stay multiples of ``multiple``, which the GEMM kernels prefer), heads one at a time. The cheapest next
   block or head per FLOP it saves is taken until the FLOPs removed reach the budget; every pair keeps one
   block and every attention one head.
4. The plan (kept neurons per FFN pair, removed heads per attention and the layout of those cut without
   ``prune_heads``, by module path) goes into the genome: ``apply_plan`` on the layer-pruned teacher rebuilds
   the student.

The residual stream's channels (``hidden``) are found and cut by compressor/surgery.py.
"""
from __future__ import annotations

import copy
import itertools

import torch
from torch import nn

from .attention import split_attention
from .errors import UserError
from .flops import count_flops as flops
from .groups import Group, cut_heads, ffn_swap, find_groups, gate_mask, heads_swap
from .surgery import cut_hidden, cut_stream, features, projected_grads
from .surgery import gated as _gated
from .surgery import get_module as _get
from .surgery import set_module as _set
from .surgery import swapped as _swapped
from .tasks import output

# ------------------------------------------------------------------------------------------ scoring

def score_groups(model: nn.Module, groups: list[Group], batches, projections: int = 4, seed: int = 0) -> list[Group]:
    """Fill each group's ``scores`` (s_j = E ||dy/dm_j||^2 per sample) and ``flops`` (per element)."""
    was = model.training
    req = [p.requires_grad for p in model.parameters()]
    model.eval().requires_grad_(False)
    gen = torch.Generator().manual_seed(seed)
    masks = {g.gate: torch.ones(g.size, requires_grad=True) for g in groups}
    acc = {g.gate: torch.zeros(g.size) for g in groups}
    samples = 0
    try:
        gates = {g.gate: (lambda g=g: masks[g.gate].repeat_interleave(g.width)) for g in groups}
        handles = [_get(model, p).register_forward_pre_hook(
            lambda _m, args, f=f: (args[0] * f(), *args[1:])) for p, f in gates.items()]
        try:
            samples = projected_grads(model, batches, masks, acc, projections, gen)
        finally:
            for h in handles:
                h.remove()
        for g in groups:
            g.scores = (acc[g.gate] / (projections * samples)).tolist()
        base = flops(model, batches[0])
        for g in groups:
            one = ffn_swap(model, g, range(1, g.size)) if g.kind == "ffn" else heads_swap(model, g, [0])
            with _swapped(model, one):
                g.flops = float(base - flops(model, batches[0]))
    finally:
        for p, r in zip(model.parameters(), req):
            p.requires_grad_(r)
        model.train(was)
    return groups


# ---------------------------------------------------------------------------------------- selection

def select(groups: list[Group], budget: float, multiple: int = 16) -> dict:
    """The plan that removes at least ``budget`` FLOPs per sample at the least summed score: blocks of
    ``multiple`` neurons (lowest scores first) and single heads, cheapest score per FLOP first."""
    order = {g.path: sorted(range(g.size), key=lambda j: g.scores[j]) for g in groups}
    taken = {g.path: 0 for g in groups}  # elements removed so far (a prefix of order[path])

    def next_block(g: Group):
        t = taken[g.path]
        if g.kind == "heads":
            n = 1 if t < g.size - 1 else 0
        else:
            step = multiple if g.size > multiple else 1
            n = (g.size - t) % step or step  # the first block leaves a multiple of `step` kept
            if g.size - t - n < step:
                n = 0  # keep one block
        if not n:
            return None
        idx = order[g.path][t:t + n]
        return sum(g.scores[j] for j in idx) / (n * _cost(g) or 1e-30), n

    saved = 0.0
    while saved < budget:
        options = [(b[0], g, b[1]) for g in groups if _cost(g) > 0 and (b := next_block(g)) is not None]
        if not options:
            unit = "FLOPs per sample" if all(g.cost is None for g in groups) else "ms"
            kinds = {g.kind for g in groups}
            cut = " and ".join([f"every FFN pair to one block of {multiple}"] * ("ffn" in kinds)
                               + ["every attention to one head"] * ("heads" in kinds))
            raise UserError(f"prune.width: cutting {cut} saves {saved:,.4g} {unit}, short of the {budget:,.4g} "
                            "asked" + ("" if "heads" in kinds else " (no attention heads were found to cut: "
                                       "docs/distillation.md, Width)") + "; lower prune.width.remove")
        _, g, n = min(options, key=lambda o: o[0])
        taken[g.path] += n
        saved += n * _cost(g)
    return _plan(groups, {g.path: order[g.path][:taken[g.path]] for g in groups})


def _plan(groups: list[Group], gone: dict) -> dict:
    """The plan that removes the elements ``gone[path]`` from each group."""
    plan = {"ffn": {}, "heads": {}}
    for g in groups:
        if not gone.get(g.path):
            continue
        if g.kind == "ffn":
            plan["ffn"][g.path] = {"producer": g.producer, "keep": sorted(set(range(g.size)) - set(gone[g.path])),
                                   **({"also": list(g.also)} if g.also else {}),
                                   **({"halves": g.halves} if g.halves > 1 else {})}
        else:
            plan["heads"][g.path] = sorted(gone[g.path])
            if g.layout:
                plan.setdefault("layouts", {})[g.path] = g.layout
    return plan


def _cost(g: Group) -> float:
    return g.flops if g.cost is None else g.cost


def measure_costs(model: nn.Module, groups: list[Group], example, device, multiple: int = 16, log=print,
                  **measure_kw) -> float:
    """Set each group's ``cost``: the milliseconds one element saves on ``device``, from ``model`` measured
    beside a copy per group cut to its least (one block of ``multiple`` neurons, one head), round robin, each
    one's fastest run kept (compressor.measure.round_robin_ms). Return ``model``'s own milliseconds. A
    head costs more than its FLOPs say where attention's softmax, reshapes and small matmuls run slower per
    FLOP than the big ones; latency is close to additive over groups, as FLOPs are. A group whose saving the
    machine's noise hides (zero or less) is costed by its FLOPs on ``example`` at the others' median ms per FLOP."""
    from .measure import round_robin_ms

    least = [min(multiple if g.size > multiple else 1, g.size) if g.kind == "ffn" else 1 for g in groups]
    base = flops(model, example)
    per_element_flops = []  # on the timed example (the calibration batch's FLOPs may be at another length)

    def variants():  # one at a time: the Meter exports each and lets it go
        for g, k in zip(groups, least):
            v = apply_plan(copy.deepcopy(model), _plan([g], {g.path: list(range(k, g.size))})).eval()
            per_element_flops.append((base - flops(v, example)) / max(1, g.size - k))
            yield v

    ms = round_robin_ms(itertools.chain([model.eval()], variants()), example, device, **measure_kw)
    for g, m, k in zip(groups, ms[1:], least):
        g.cost = max(0.0, ms[0] - m) / (g.size - k) if g.size > k else 0.0
    rates = sorted(g.cost / f for g, f in zip(groups, per_element_flops) if g.cost and f > 0)
    for g, f in zip(groups, per_element_flops):
        if not g.cost and rates:
            g.cost = f * rates[len(rates) // 2]
    log(f"prune.width: {ms[0]:.4g} ms measured; one element saves " + ", ".join(
        f"{g.path} {1e3 * g.cost:.3g} us ({g.kind}, {1e9 * g.cost / f if f > 0 else 0:.3g} ms/GFLOP)"
        for g, f in zip(groups, per_element_flops)))
    return ms[0]


def apply_plan(model: nn.Module, plan: dict) -> nn.Module:
    """Cut the plan's residual-stream channels, neurons and heads out of ``model`` in place (its weights are
    the teacher's)."""
    if plan.get("split"):  # first: a stream cut through nn.MultiheadAttention was found on the split model
        split_attention(model, plan["split"])
    if plan.get("hidden"):
        cut_stream(model, plan["hidden"])
    for path, p in plan.get("ffn", {}).items():
        g = Group("ffn", path, path, p["producer"], features(_get(model, path))[0], 1,
                  also=tuple(p.get("also", ())), halves=p.get("halves", 1))
        for q, m in ffn_swap(model, g, p["keep"]).items():
            _set(model, q, m)
    for path, removed in plan.get("heads", {}).items():
        cut_heads(_get(model, path), plan.get("layouts", {}).get(path), removed)
    return model


@torch.no_grad()
def _plan_error(model: nn.Module, pruned: nn.Module, groups: list[Group], plan: dict, batch) -> float:
    """Max |pruned - gated original|: the cut model against the original with the same elements zeroed."""
    by_path = {g.path: g for g in groups}
    gates = {}
    for path, p in plan["ffn"].items():
        g = by_path[path]
        gates[g.gate] = gate_mask(g, sorted(set(range(g.size)) - set(p["keep"])))
    for path, removed in plan["heads"].items():
        g = by_path[path]
        gates[g.gate] = gate_mask(g, removed)
    model.eval()
    pruned.eval()
    with _gated(model, gates):
        ref = output(model, batch)
    return float((output(pruned, batch) - ref).abs().max())


def splittable(model: nn.Module, heads: bool = True) -> tuple[nn.Module, list[str]]:
    """(``model``, or where heads may be cut and it holds nn.MultiheadAttention a copy with those split into
    Linears whose heads can be cut (compressor/attention.py); the paths split): the model whose groups are found,
    scored and checked. The cut itself goes on the unsplit model, with the plan's ``split``."""
    if not heads or not any(isinstance(m, nn.MultiheadAttention) for m in model.modules()):
        return model, []
    model = copy.deepcopy(model)
    return model, split_attention(model)


def prune_width(model: nn.Module, batches, remove: float, *, ffn: bool = True, heads: bool = True,
                multiple: int = 16, projections: int = 4, log=print, groups: list[Group] | None = None,
                hidden: float = 0.0, latency: dict | None = None):
    """Find, score and select; return (a narrower copy of ``model``, plan, record dict). ``groups``: the
    model's groups already scored (another cut of the same model: the search's channel genes), on
    ``splittable(model)``. ``hidden``: the
    fraction of the residual stream's channels to cut first (their FLOPs count toward ``remove``). ``latency``
    ({"device", "example", "measure_kw"}): ``remove`` is a fraction of the model's milliseconds on that device,
    each element costed by measure_costs, instead of its FLOPs."""
    if hidden and latency:
        raise UserError("prune.width: cost: latency with hidden (the stream's channels have no measured cost); "
                        "drop one of them")
    total = flops(model, batches[0])
    stream_plan, stream_info, through = None, None, []
    if hidden:
        if groups is not None:
            raise ValueError("prune_width: hidden with pre-scored groups (they were scored on the uncut stream)")
        if any(isinstance(m, nn.MultiheadAttention) for m in model.modules()):
            # its fused in_proj reads the stream as one weight: every one split into Linears first, which the plan's
            # ``split`` repeats before the stream's cut on rebuild
            model = copy.deepcopy(model)
            through = split_attention(model)
        model, stream_plan, stream_info = cut_hidden(model, batches, hidden, multiple, projections, total, log)
        if stream_info["flops_after"] <= (1 - remove) * total:
            plan = {**({"split": through} if through else {}), "hidden": stream_plan, "ffn": {}, "heads": {}}
            log(f"prune.width: the stream's cut alone removes {1 - stream_info['flops_after'] / total:.0%} of the FLOPs "
                f"(asked {remove:.0%}); no neuron or head cut")
            return model.requires_grad_(True), plan, {"hidden": stream_info, "groups": [], "remove": remove,
                                                      "flops_before": total, "flops_after": stream_info["flops_after"],
                                                      "multiple": multiple, "projections": projections}
    base = model
    model, split = splittable(model, heads)
    if groups is None:
        groups = find_groups(model, batches[0], ffn=ffn, heads=heads)
        if not groups:
            kinds = " or ".join(k for k, on in (("FFN pairs", ffn), ("attention heads", heads)) if on)
            raise UserError(f"prune.width: {type(model).__name__} has no {kinds} that can be cut exactly "
                            "(docs/distillation.md, Width); drop prune.width")
        score_groups(model, groups, batches, projections=projections)
    for g in groups:
        g.cost = None  # FLOPs, unless measured now (pre-scored groups may carry another cut's milliseconds)
    if latency:  # a budget of measured milliseconds: {"device", "example", "measure_kw"} (prune.width.cost)
        ms = measure_costs(model, groups, latency["example"], latency["device"], multiple, log,
                           **latency.get("measure_kw", {}))
        budget = remove * ms
    else:  # the stream's cut counts toward the budget
        budget = remove * total - (total - (stream_info["flops_after"] if stream_info else total))
    plan = select(groups, budget, multiple)
    if split and (cut := [p for p in split if p in plan["heads"]]):
        plan = {"split": cut, **plan}
    pruned = apply_plan(copy.deepcopy(base), plan)
    if stream_plan is not None:
        plan = {**({"split": through} if through else {}), "hidden": stream_plan, **plan}
    err = _plan_error(model, pruned, groups, plan, batches[0])
    after = flops(pruned, batches[0])
    predicted = sum(g.scores[j] for g in groups for j in _removed(g, plan))
    kept = {g.path: g.size - len(_removed(g, plan)) for g in groups}
    said = [f"{kind} " + ", ".join(f"{kept[g.path]}/{g.size}" for g in groups if g.kind == k)
            for k, kind in (("heads", "heads kept per attention"), ("ffn", "neurons kept per FFN pair"))
            if any(g.kind == k for g in groups)]
    log(f"prune.width: {'; '.join(said)}; FLOPs {total / 1e6:.4g} -> {after / 1e6:.4g} M per sample; "
        f"linearised output loss {predicted:.4g}, cut vs zeroed max |diff| {err:.2g}")
    info = {"groups": [g.summary() | {"kept": kept[g.path]} for g in groups], "remove": remove,
            "flops_before": total, "flops_after": after, "predicted_loss": predicted,
            "max_abs_diff_vs_masked": err, "multiple": multiple, "projections": projections,
            **({"latency": {"ms_before": ms, "budget_ms": budget, "cut_ms": sum(
                g.cost * len(_removed(g, plan)) for g in groups)}} if latency else {}),
            **({"hidden": stream_info} if stream_info else {})}
    return pruned.requires_grad_(True), plan, info


def _removed(g: Group, plan: dict) -> list[int]:
    if g.kind == "heads":
        return list(plan["heads"].get(g.path, []))
    p = plan["ffn"].get(g.path)
    return [] if p is None else sorted(set(range(g.size)) - set(p["keep"]))
