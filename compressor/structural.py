"""Structural (channel, neuron and head) pruning of any nn.Module, with torch-pruning's DepGraph.

DepGraph traces the model once and groups every parameter slice that must go together: a convolution's
output channels with the BatchNorm after it, the next layer's inputs, every layer a residual add ties
to them, a depthwise convolution's channels, a Transformer's FFN neurons, and, given the head layout,
whole attention heads. So nothing here knows a model family: the structure comes from the model.

1. Groups: every group DepGraph finds, except those that would change the classifier head's outputs
   (the classes), the input stem's with ``keep_stem`` (in most models the stem's outputs are the
   residual stream's width, so keeping it leaves only the blocks' inner widths: on a small ViT from
   nn.TransformerEncoder that floor was 87% of the FLOPs, on a tiny HF ResNet 79%), and those of the
   modules in ``ignore``. Attention heads: nn.MultiheadAttention's are tied
   to its embedding width (the residual stream), so only its FFN is narrowed; Hugging Face attention
   (a module with ``num_attention_heads`` and ``query``/``key``/``value``) loses whole heads.
2. Importance, per channel of each group (small interchangeable classes, as in torch-pruning):
   - ``output-loss`` (default): the output loss against the teacher, as layer pruning uses it. At the
     teacher's own weights that loss and its gradient are zero, so its first-order Taylor term is zero
     too; the first term that is not is the second-order one, 1/2 w^2 F with F the Fisher of the output
     (Optimal Brain Damage, torch-pruning's GroupHessianImportance). F is estimated with random
     projections of the output: for r ~ N(0, I), E[(d(r.y)/dw)^2] = diag(J^T J). Scores are at the
     model's output, so they compare across groups, and each is divided by the FLOPs one channel of the
     group costs: the cheapest output loss per FLOP goes first.
   - ``taylor``: first-order Taylor of the cross-entropy on the labels (Molchanov et al., 2019).
   - ``magnitude``: the group's L2 weight norm, torch-pruning's default (no data needed).
3. Budget: a pruning ratio found by bisection so that the FLOPs (or params) removed reach ``remove`` of
   the model's: global (the least important channels anywhere go first) where that reaches the budget,
   else uniform (every group loses the same share; global ranking can strip a group to its limit or an
   attention of its last head before the budget is met).
4. The result is a copy; ``plan`` records each module's new shapes and attributes, so ``apply_plan`` on
   the unpruned model rebuilds the skeleton that the shipped weights load into.
"""
from __future__ import annotations

import copy

import torch
from torch import nn

from .errors import UserError
from .flops import count_flops, flops_by_module, no_fastpath
from .intake import select_output
from .tasks import call, take

IMPORTANCE = ("output-loss", "taylor", "magnitude")

# Plain attributes DepGraph changes on the modules it prunes, and the Hugging Face attention fields.
_ATTRS = ("in_channels", "out_channels", "groups", "in_features", "out_features", "num_features",
          "normalized_shape", "embed_dim", "kdim", "vdim", "num_heads", "head_dim", "num_embeddings",
          "embedding_dim", "num_attention_heads", "attention_head_size", "all_head_size", "scaling")


def _tp():
    try:
        import torch_pruning as tp
    except ImportError:
        raise UserError("prune.channels needs torch-pruning: pip install -c constraints.txt -e '.[prune]'") from None
    return tp


def _output(model, x):
    return select_output(call(model, x))


# --------------------------------------------------------------------------------------- structure

@torch.no_grad()
def _weighted_order(model: nn.Module, example) -> list[str]:
    """Paths of the modules with weights (conv, linear, embedding) in the order a forward pass calls them."""
    order, handles = [], []
    for name, m in model.named_modules():
        if isinstance(m, (nn.modules.conv._ConvNd, nn.Linear, nn.Embedding)):
            handles.append(m.register_forward_hook(lambda _m, _a, _o, name=name: order.append(name)))
    try:
        with no_fastpath():
            call(model.eval(), take(example, 1))
    finally:
        for h in handles:
            h.remove()
    return list(dict.fromkeys(order))


def kept_by_default(model: nn.Module, example) -> dict[str, str]:
    """The input stem (the first weighted module a forward calls) and the classifier head (the last):
    {path: why}. Embeddings count as the stem of a text model."""
    order = _weighted_order(model, example)
    if not order:
        return {}
    stem = [p for p in order if isinstance(model.get_submodule(p), nn.Embedding)] or order[:1]
    return {**{p: "input stem" for p in stem}, order[-1]: "classifier head"}


def head_layout(model: nn.Module) -> tuple[dict, list]:
    """torch-pruning's ``num_heads`` ({q/k/v Linear: heads}) for Hugging Face-style attention, and those
    attention modules (their head counts are set again after pruning)."""
    heads, atts = {}, []
    for m in model.modules():
        n = getattr(m, "num_attention_heads", None)
        qkv = [getattr(m, k, None) for k in ("query", "key", "value")]
        if isinstance(n, int) and all(isinstance(q, nn.Linear) for q in qkv):
            for q in qkv:
                heads[q] = n
            atts.append(m)
    return heads, atts


class _TooFar(Exception):
    """A ratio that leaves some attention without a head: the bisection treats it as too much."""


def _fix_heads(atts, num_heads: dict) -> None:
    for m in atts:
        n = num_heads[m.query]
        if n < 1:
            raise _TooFar
        m.num_attention_heads = n
        m.attention_head_size = m.query.out_features // n
        m.all_head_size = m.query.out_features  # each layer reads its own attributes, not the shared config


# --------------------------------------------------------------------------------------- importance

def fisher(model: nn.Module, batches, projections: int = 4, seed: int = 0) -> dict[str, torch.Tensor]:
    """diag(J^T J) per parameter (summed over samples, averaged over projections): E_r (d(r.y)/dw)^2."""
    gen = torch.Generator().manual_seed(seed)
    params = dict(model.named_parameters())
    req = {n: p.requires_grad for n, p in params.items()}
    acc = {n: torch.zeros_like(p) for n, p in params.items()}
    model.eval()
    try:
        for p in params.values():
            p.requires_grad_(True)
        for b in batches:
            with no_fastpath():
                y = _output(model, b)
            for k in range(projections):
                r = torch.randn(y.shape, generator=gen, dtype=y.dtype)
                grads = torch.autograd.grad((y * r).sum(), list(params.values()), retain_graph=k < projections - 1,
                                            allow_unused=True)
                for (n, _), g in zip(params.items(), grads):
                    if g is not None:
                        acc[n] += g.detach() ** 2
    finally:
        for n, p in params.items():
            p.requires_grad_(req[n])
    return {n: a / projections for n, a in acc.items()}


def ce_gradients(model: nn.Module, batches, labels) -> dict[str, torch.Tensor]:
    """Summed cross-entropy gradients on labelled batches (for first-order Taylor)."""
    import torch.nn.functional as F

    params = dict(model.named_parameters())
    acc = {n: torch.zeros_like(p) for n, p in params.items()}
    model.eval()
    for b, y in zip(batches, labels):
        with no_fastpath():
            loss = F.cross_entropy(_output(model, b), y, ignore_index=-1)
        grads = torch.autograd.grad(loss, list(params.values()), allow_unused=True)
        for (n, _), g in zip(params.items(), grads):
            if g is not None:
                acc[n] += g.detach()
    return acc


def _per_flop(base_cls):
    """An importance that divides each group's scores by the FLOPs one of its channels costs."""
    class PerFlop(base_cls):
        def __init__(self, module_flops: dict, paths: dict, **kw):
            super().__init__(**kw)
            self.module_flops, self.paths = module_flops, paths

        def __call__(self, group, **kw):
            imp = super().__call__(group, **kw)
            if imp is None:
                return None
            cost = 0.0
            for dep, _ in group:
                m = dep.target.module
                path = self.paths.get(m)
                if path is None or not isinstance(m, (nn.modules.conv._ConvNd, nn.Linear, nn.MultiheadAttention)):
                    continue
                n = getattr(m, "out_channels", None) or getattr(m, "out_features", None) or getattr(m, "embed_dim", 1)
                if getattr(dep.handler, "__name__", "") == "prune_in_channels":
                    n = getattr(m, "in_channels", None) or getattr(m, "in_features", None) or n
                cost += self.module_flops.get(path, 0) / max(int(n), 1)
            return imp / max(cost, 1.0)

    return PerFlop


# ----------------------------------------------------------------------------------------- pruning

class GroupError(Exception):
    """torch-pruning failed on one group; ``modules`` names its layers."""

    def __init__(self, modules: list[str], cause: Exception):
        super().__init__(f"{type(cause).__name__}: {str(cause).splitlines()[0][:160] if str(cause) else ''}")
        self.modules = modules


def _named(importance, model: nn.Module, keep: int = 0, heads=()):
    """``importance`` that, when it fails on a group, says which modules the group holds; with ``keep``,
    each group's ``keep`` most important channels score +inf. torch-pruning's global threshold has no
    per-group cap: a group whose every channel falls under it is skipped whole (measured on a ViT: an FFN
    cut to 16 of 256 neurons at one ratio came back to 256 at a higher one), so the cost stops falling.
    Groups holding an attention's ``heads`` layers are left as scored: their heads are ranked on their own,
    and +inf there made the heads' threshold infinite (every head went)."""
    names = {m: n for n, m in model.named_modules()}

    class Named(type(importance)):
        def __call__(self, group, **kw):
            try:
                imp = importance(group, **kw)
            except Exception as e:
                mods = list(dict.fromkeys(names.get(dep.target.module, type(dep.target.module).__name__)
                                          for dep, _ in group))
                odd = [n for n in mods if isinstance(names_rev.get(n), nn.modules.conv._ConvNd)
                       and names_rev[n].groups > 1]
                raise GroupError(odd or mods, e) from None
            if keep and imp is not None and len(imp) > keep and not any(d.target.module in heads for d, _ in group):
                imp = imp.clone()
                imp[torch.topk(imp, keep).indices] = float("inf")
            return imp

    names_rev = {n: m for m, n in names.items()}
    named = Named.__new__(Named)
    named.__dict__.update(importance.__dict__)
    return named


def _set_grads(model: nn.Module, grads: dict) -> None:
    for n, p in model.named_parameters():
        g = grads.get(n)
        p.grad = None if g is None else g.clone()


def _prune_copy(model, example, ratio, importance, grads, ignored_paths, heads: bool, multiple: int | None,
                global_pruning: bool = True):
    tp = _tp()
    m = copy.deepcopy(model).eval()
    if grads is not None:
        _set_grads(m, grads)
    num_heads, atts = head_layout(m)
    # Every attention keeps at least one head.
    head_ratio = min(ratio, min((1 - 1 / n for n in num_heads.values()), default=0.0) - 1e-6) if heads else 0.0
    ignored = [m.get_submodule(p) for p in ignored_paths]
    mha = [x for x in m.modules() if isinstance(x, nn.MultiheadAttention)]
    pruner = tp.pruner.MetaPruner(
        m, take(example, 1), importance=_named(importance(m), m, keep=max(multiple or 1, 1) if global_pruning else 0,
                                              heads=set(num_heads)),
        global_pruning=global_pruning, pruning_ratio=ratio,
        max_pruning_ratio=0.95, ignored_layers=ignored, num_heads={**num_heads, **{a: a.num_heads for a in mha}},
        prune_num_heads=heads and bool(num_heads), prune_head_dims=False, head_pruning_ratio=max(head_ratio, 0.0),
        round_to=multiple, forward_fn=call)
    with no_fastpath():
        pruner.step()
    _fix_heads(atts, pruner.num_heads)
    for p in m.parameters():
        p.grad = None
    return m


def _cost(model, example, by: str) -> float:
    return float(count_flops(model, example) if by == "flops" else sum(p.numel() for p in model.parameters()))


def prune_channels(model: nn.Module, batches, remove: float, *, by: str = "flops", importance: str = "output-loss",
                   ignore=(), keep_stem: bool = False, heads: bool = True, multiple: int | None = 8,
                   projections: int = 4, labels=None, tolerance: float = 0.02, log=print):
    """Prune channels, neurons and heads until ``remove`` of the model's FLOPs (or params) are gone.
    Returns (pruned copy, plan, record dict)."""
    tp = _tp()
    if by not in ("flops", "params"):
        raise UserError(f"prune.channels.by {by!r}: use flops or params")
    if importance not in IMPORTANCE:
        raise UserError(f"prune.channels.importance {importance!r}: use {', '.join(IMPORTANCE)}")
    example = batches[0]
    from .distill.hooks import resolve

    kept = {p: why for p, why in kept_by_default(model, example).items() if keep_stem or why != "input stem"}
    for p in ignore:
        resolve(model, p, "model")  # a UserError naming the module paths that exist
    ignored_paths = list(dict.fromkeys([*kept, *ignore]))
    grads = None
    if importance == "magnitude":
        def imp(m):
            return tp.importance.GroupMagnitudeImportance(p=2)
    else:
        mflops = flops_by_module(model, example)
        if importance == "output-loss":
            grads = fisher(model, batches, projections)
            base = tp.importance.GroupHessianImportance
        else:
            if labels is None:
                raise UserError("prune.channels.importance: taylor needs labelled batches")
            grads = ce_gradients(model, batches, labels)
            base = tp.importance.GroupTaylorImportance
        per_flop = _per_flop(base)

        def imp(m):
            return per_flop(mflops, {mod: name for name, mod in m.named_modules()}, normalizer=None)

    total = _cost(model, example, by)
    target = (1 - remove) * total
    # Bisection on the ratio. Global allocation first (the least important channels anywhere go first);
    # where some group cannot give enough (attention left without a head, a group at its limit) the cost is
    # not monotonic near the top and the budget may be out of reach: then every group loses the same share
    # (uniform), which reaches any budget the structure allows. The least cost seen goes in the error.
    best, least = None, None
    try:
        for allocation in ("global", "uniform"):
            lo, hi = 0.0, 0.9
            for _ in range(12):
                mid = (lo + hi) / 2
                try:
                    cand = _prune_copy(model, example, mid, imp, grads, ignored_paths, heads, multiple,
                                       global_pruning=allocation == "global")
                except _TooFar:
                    hi = mid
                    continue
                c = _cost(cand, example, by)
                least = c if least is None else min(least, c)
                if c <= target:
                    if best is None or c > best[2]:  # the closest to the budget from below
                        best = (mid, cand, c, allocation)
                    hi = mid
                    if c >= target - tolerance * total:
                        break
                else:
                    lo = mid
            # Whole heads and multiples of 8 make the cost jump: a global cut that lands well under the
            # budget gives way to a uniform one that lands closer.
            if best is not None and best[2] >= target - tolerance * total:
                break
    except UserError:
        raise
    except GroupError as e:
        def said(p):
            m = model.get_submodule(p)
            if isinstance(m, nn.modules.conv._ConvNd) and m.groups > 1:
                return f"{p} ({type(m).__name__} {m.in_channels}->{m.out_channels} in {m.groups} groups)"
            return f"{p} ({type(m).__name__})"

        raise UserError(f"prune.channels: torch-pruning cannot prune the channels of {', '.join(map(said, e.modules[:3]))} "
                        f"({e}); add it and the layer that feeds it to prune.ignore") from None
    except Exception as e:
        raise UserError(f"prune.channels: torch-pruning cannot prune {type(model).__name__}: {type(e).__name__}: "
                        f"{str(e).splitlines()[0][:200] if str(e) else ''}; leave the module out with prune.ignore") from None
    if best is None:
        raise UserError(f"prune.channels: the most that pruning every group DepGraph found (kept: "
                        f"{', '.join(ignored_paths) or 'none'}; multiple {multiple}) removes leaves {least:,.0f} {by} of "
                        f"{total:,.0f}, above the {target:,.0f} asked; lower prune.channels.remove, its multiple, or "
                        "prune.ignore")
    ratio, pruned, after, allocation = best
    bn = recalibrate_batchnorm(pruned, batches)
    plan = plan_of(model, pruned)
    info = {"by": by, "remove": remove, "importance": importance, "allocation": allocation, "ratio": round(ratio, 4),
            "kept": kept,
            "ignore": list(ignore), f"{by}_before": total, f"{by}_after": after,
            "params": sum(p.numel() for p in pruned.parameters()),
            "flops": int(after) if by == "flops" else count_flops(pruned, example),
            "modules_changed": len(plan["modules"]), "batchnorm_recalibrated": bn}
    log(f"prune.channels: {importance} importance, {allocation} ratio {ratio:.3f}: {by} {total:,.0f} -> {after:,.0f} "
        f"({after / total:.1%}); {len(plan['modules'])} modules narrowed; kept {', '.join(ignored_paths) or 'nothing'}")
    return pruned.requires_grad_(True), plan, info


@torch.no_grad()
def recalibrate_batchnorm(model: nn.Module, batches) -> int:
    """Recompute BatchNorm running statistics on ``batches`` (a cumulative average): pruning changes every
    BatchNorm's input distribution, and stale statistics alone can take a pruned CNN to chance accuracy.
    Returns how many BatchNorm layers were recalibrated."""
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    if not bns:
        return 0
    was = model.training
    saved = [(m, m.momentum) for m in bns]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # cumulative moving average over the batches
    model.eval()
    for m in bns:
        m.train()
    try:
        for b in batches:
            call(model, b)
    finally:
        for m, mom in saved:
            m.momentum = mom
        model.train(was)
    return len(bns)


# ---------------------------------------------------------------------------------------- the plan

def _attrs(m: nn.Module) -> dict:
    out = {}
    for a in _ATTRS:
        v = m.__dict__.get(a)
        if isinstance(v, (int, float)) and not isinstance(v, bool) or isinstance(v, tuple) and all(isinstance(i, int) for i in v):
            out[a] = list(v) if isinstance(v, tuple) else v
    return out


def plan_of(before: nn.Module, after: nn.Module) -> dict:
    """What changed, as plain data: per module path, its changed attributes and tensor shapes."""
    modules = {}
    old = dict(before.named_modules())
    for path, m in after.named_modules():
        o = old.get(path)
        if o is None:
            continue
        before_attrs = _attrs(o)
        attrs = {k: v for k, v in _attrs(m).items() if before_attrs.get(k) != v}
        old_tensors = {**o._parameters, **o._buffers}
        shapes = {n: list(t.shape) for n, t in [*m._parameters.items(), *m._buffers.items()]
                  if t is not None and old_tensors.get(n) is not None and t.shape != old_tensors[n].shape}
        if attrs or shapes:
            modules[path] = {"attrs": attrs, "shapes": shapes}
    return {"modules": modules}


def apply_plan(model: nn.Module, plan: dict) -> nn.Module:
    """The skeleton of the pruned model: ``model`` (the unpruned one) with the plan's attributes and
    tensor shapes, in place. Load the pruned weights into it."""
    for path, change in plan.get("modules", {}).items():
        m = model.get_submodule(path) if path else model
        for k, v in change["attrs"].items():
            setattr(m, k, tuple(v) if isinstance(getattr(m, k, None), tuple) else v)
        for n, shape in change["shapes"].items():
            if n in m._parameters:
                p = m._parameters[n]
                m._parameters[n] = nn.Parameter(torch.zeros(shape, dtype=p.dtype), requires_grad=p.requires_grad)
            else:
                m._buffers[n] = torch.zeros(shape, dtype=m._buffers[n].dtype)
    return model
