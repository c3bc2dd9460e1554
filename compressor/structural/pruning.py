"""The pruning driver: a pruning ratio found by bisection (global, then uniform allocation) until the
FLOPs or params budget is met, then BatchNorm recalibrated and the plan recorded."""
from __future__ import annotations

import contextlib
import copy
import math
import traceback

import torch
from torch import nn

from ..errors import UserError, first_line
from ..flops import count_flops, flops_by_module, no_fastpath
from ..tasks import call, sq_error_mean, take
from .importance import IMPORTANCE, _named, _per_flop, ce_gradients, fisher, in_torch_pruning
from .plan import fold_parametrizations, folded_said, parametrized, plan_of
from . import structure
from . import rnn
from .structure import (Untraceable, _fix_heads, _TooFar, _tp, deadline, head_layout, kept_by_default, raised_in,
                        width_of, width_unit)


def _set_grads(model: nn.Module, grads: dict) -> None:
    for n, p in model.named_parameters():
        g = grads.get(n)
        p.grad = None if g is None else g.clone()


@contextlib.contextmanager
def _traced():
    """How torch-pruning traces a model here: a concat mapped only where it joins channels
    (structure.channel_concats_only), each recurrent layer one node (rnn.one_node), under the dependency graph's
    deadline. The pruners' own ``customized_pruners=rnn.pruners()`` go with it."""
    with structure.channel_concats_only(), deadline(structure.DEPGRAPH_SECONDS), rnn.one_node():
        yield


def _feeding(model: nn.Module, example, head: str) -> list[str]:
    """Paths of the Conv/Linear layers whose output channels are ``head``'s inputs (DepGraph's group); none
    where the graph cannot say (the uniform cut then relies on the floor check alone)."""
    tp = _tp()
    out = model.get_submodule(head)
    try:
        with no_fastpath(), _traced():
            dg = tp.DependencyGraph().build_dependency(model.eval(), example_inputs=take(example, 1), forward_fn=call,
                                                       customized_pruners=rnn.pruners())
            group = dg.get_pruning_group(out, dg.get_pruner_of_module(out).prune_in_channels,
                                         idxs=list(range(width_of(out, "in"))))
    except Untraceable:
        raise
    except Exception:  # a head DepGraph has no pruner for
        return []
    names = {m: n for n, m in model.named_modules()}
    return [names[d.target.module] for d, _ in group if getattr(d.handler, "__name__", "") == "prune_out_channels"
            and isinstance(d.target.module, (nn.modules.conv._ConvNd, nn.Linear)) and d.target.module in names]


def _prune_copy(model, example, ratio, importance, grads, ignored_paths, heads: bool, multiple: int | None,
                global_pruning: bool = True, head: str | None = None, feeding=(), skipped: dict | None = None):
    tp = _tp()
    m = copy.deepcopy(model).eval()
    if grads is not None:
        _set_grads(m, grads)
    num_heads, atts = head_layout(m)
    # Every attention keeps at least one head.
    head_ratio = min(ratio, min((1 - 1 / n for n in num_heads.values()), default=0.0) - 1e-6) if heads else 0.0
    ignored = [m.get_submodule(p) for p in ignored_paths] + rnn.whole(m)
    unit = width_unit(m, multiple)
    out = m.get_submodule(head) if head else None  # the classifier head: as many inputs as it has outputs
    floors = {out: width_of(out, "out")} if out is not None else {}
    least = min(floors[out], width_of(out, "in")) if out is not None else 0
    # The uniform cut takes the same share of every group: the one feeding the head takes no more than its floor
    # allows (the global cut's +inf scores bind it there), in whole blocks of `multiple` and GroupNorm groups.
    step = math.lcm(unit or 1, *(g.num_groups for g in m.modules() if isinstance(g, nn.GroupNorm)))
    caps = {} if global_pruning or out is None else {
        f: min(ratio, max(0.0, 1 - -(-least // step) * step / width_of(f, "out") - 1e-6))
        for f in (m.get_submodule(p) for p in feeding)}
    with _traced():
        pruner = tp.pruner.MetaPruner(
            m, take(example, 1), importance=_named(importance(m), m, keep=(unit or 1) if global_pruning else 0,
                                                  heads=set(num_heads), floors=floors, skipped=skipped),
            global_pruning=global_pruning, pruning_ratio=ratio,
            max_pruning_ratio=0.95, ignored_layers=ignored, num_heads=num_heads,
            prune_num_heads=heads and bool(num_heads), prune_head_dims=False, head_pruning_ratio=max(head_ratio, 0.0),
            round_to=unit, forward_fn=call, pruning_ratio_dict=caps or None, customized_pruners=rnn.pruners(),
            root_module_types=[nn.modules.conv._ConvNd, nn.Linear, *rnn.pruners()],
            in_channel_groups={}, out_channel_groups={})  # its defaults are one dict for every call: kept copies alive
    with no_fastpath(), structure.channel_concats_only():  # the graph's index mappings, updated for each group cut
        pruner.step()
    _fix_heads(atts, pruner.num_heads)
    if out is not None and width_of(out, "in") < least:  # a uniform cut: no +inf score binds it
        raise _TooFar
    for p in m.parameters():
        p.grad = None
    return m


def _output_loss(model: nn.Module, pruned: nn.Module, batches) -> float:
    """tasks.sq_error_mean of ``pruned`` against ``model``, BatchNorm statistics recomputed on a copy first (as
    the chosen cut's will be); ``model``'s mode is left as it was."""
    pruned = copy.deepcopy(pruned)
    recalibrate_batchnorm(pruned, batches)
    was = model.training
    try:
        return sq_error_mean(model, pruned, batches)
    finally:
        model.train(was)


def _failed(model: nn.Module, e: Exception, again: Exception | None = None) -> UserError:
    """A cut copy that failed to run, or torch-pruning failing: the module, and what to leave out (``again``: how
    the cut failed with it left whole)."""
    where = raised_in(e)
    said = first_line(e)
    frames = traceback.extract_tb(e.__traceback__)
    if isinstance(e, Untraceable):
        return UserError(f"prune.channels: {e} for {type(model).__name__} (it goes round a cycle of index "
                         "mappings: grouped-query attention's repeat_kv, a split and concatenated rotary half); cut "
                         "its attention heads and FFN neurons with prune.width instead, or prune whole blocks "
                         "(prune: {by: flops, remove: 0.3})")
    if any(f.name == "build_dependency" for f in frames):  # before any cut: DepGraph could not trace the model
        inner = next((f.name for f in reversed(frames) if in_torch_pruning(f.filename)), "build_dependency")
        return UserError(f"prune.channels: torch-pruning cannot trace the channel couplings of {type(model).__name__} "
                         f"({said}, in its {inner}): a view or reshape of the channel axis it cannot follow, such as a "
                         "channel shuffle; prune whole blocks instead (prune: {by: flops, remove: 0.3})")
    if where is None:
        return UserError(f"prune.channels: torch-pruning cannot prune {type(model).__name__}: {said}; leave the "
                         "module it names out with prune.ignore, or prune whole blocks (prune: {by: flops})")
    block, inner = where
    path, alike, held, layers = _own_code(model, where)
    also = (f" and its {len(alike)} other{'s' if len(alike) > 1 else ''} of that class "
            f"({', '.join(alike[:12])}{', ...' if len(alike) > 12 else ''})" if alike else "")
    advice = (f"add {path}{also} to prune.ignore (its own code does not follow the cut)" if "." in path else
              "its own code does not follow the cut: add the layers it reshapes by to prune.ignore, or prune whole "
              "blocks (prune: {by: flops})")
    if "." in path and held > 0.75 * layers:  # LeViT: 22 of its 23 Linears sit in such modules
        advice = (f"its own code does not follow the cut, and modules of that class ({path}{also}) hold "
                  f"{held} of its {layers} layers, so ignoring them leaves little to cut: prune whole "
                  "blocks instead (prune: {by: flops, remove: 0.3})")
    elif again is not None:  # they were left whole, and the cut still failed (SegFormer: in the same LayerNorm)
        there = raised_in(again)
        advice = (f"leaving {path}{also} whole (its own code does not follow the cut) fails too"
                  + (f", in {there[1]}" if there else "") + f": {first_line(again, 160)}; prune whole blocks "
                  "instead (prune: {by: flops, remove: 0.3})")
    return UserError(f"prune.channels: {type(model).__name__} cut by torch-pruning fails in {inner}"
                     + (f", inside {block}" if block != inner else "") + f": {said}; {advice}")


def _own_code(model: nn.Module, where: tuple[str, str]) -> tuple[str, list[str], int, int]:
    """(the block a cut copy failed in, the model's other modules of its class, which fail alike (ConvBERT's
    attention in every layer), how many Conv and Linear layers they hold, how many the model has)."""
    path, cls = where[0].split(" (")[0], where[0].split(" (")[-1].rstrip(")")
    alike = [n for n, m in model.named_modules() if type(m).__name__ == cls and n and n != path]
    layers = [n for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.modules.conv._ConvNd))]
    held = [n for n in layers if any(n == a or n.startswith(a + ".") for a in [path, *alike])]
    return path, alike, len(held), len(layers)


def _leave_whole(model: nn.Module, e: Exception) -> list[str]:
    """The modules to leave whole so the cut may run: the block ``e`` was raised in and its class's others, where
    that block is not the model itself and they do not hold most of its layers (then the error says so)."""
    where = raised_in(e)
    if where is None or isinstance(e, Untraceable):
        return []
    path, alike, held, layers = _own_code(model, where)
    return [path, *alike] if "." in path and held <= 0.75 * layers else []


def _cost(model, example, by: str) -> float:
    return float(count_flops(model, example) if by == "flops" else sum(p.numel() for p in model.parameters()))


def prune_channels(model: nn.Module, batches, remove: float, *, by: str = "flops", importance: str = "output-loss",
                   ignore=(), keep_stem: bool = False, heads: bool = True, multiple: int | None = 8,
                   projections: int = 4, labels=None, tolerance: float = 0.02, gradient_cache: dict | None = None,
                   compare_stem: bool = True, log=print):
    """Prune channels, neurons and heads until ``remove`` of the model's FLOPs (or params) are gone.
    Returns (pruned copy, plan, record dict). ``gradient_cache``: a dict the output-loss (or taylor) gradients of
    ``model`` are kept in and read from, so pruning one model to several budgets estimates them once.
    ``compare_stem`` (without ``keep_stem``): meet the budget with the stem's channels kept too and take the cut
    with the lower measured output loss (twice the work: the search's candidates skip it)."""
    cache = gradient_cache if gradient_cache is not None else {}
    tp = _tp()
    if by not in ("flops", "params"):
        raise UserError(f"prune.channels.by {by!r}: use flops or params")
    if importance not in IMPORTANCE:
        raise UserError(f"prune.channels.importance {importance!r}: use {', '.join(IMPORTANCE)}")
    example = batches[0]
    from ..distill.hooks import resolve

    folded = []
    if parametrized(model):  # weight_norm: DepGraph cuts tensors, not what a weight is computed from
        model = copy.deepcopy(model)
        folded = fold_parametrizations(model)
        log(f"prune.channels: {folded_said(folded)}: the student trains them plain")

    defaults = kept_by_default(model, example)
    head = next((p for p, why in defaults.items() if why == "classifier head"), None)
    feeding = {}  # the head's feeding layers, found when the uniform cut first needs them
    skipped = {}  # groups torch-pruning cannot index, left whole: {their modules: the error}
    kept = {**{p: why for p, why in defaults.items() if keep_stem or why != "input stem"},
            **structure.grouped_query(model)}
    for p in ignore:
        resolve(model, p, "model")  # a UserError naming the module paths that exist
    ignored_paths = list(dict.fromkeys([*kept, *ignore]))
    if importance == "magnitude":
        grads = None
        def imp(m):
            return tp.importance.GroupMagnitudeImportance(p=2)
    else:
        mflops = flops_by_module(model, example)
        if importance == "output-loss":
            grads = cache.get(importance) or cache.setdefault(importance, fisher(model, batches, projections))
            base = tp.importance.GroupHessianImportance
        else:
            if labels is None:
                raise UserError("prune.channels.importance: taylor needs labelled batches")
            grads = cache.get(importance) or cache.setdefault(importance, ce_gradients(model, batches, labels))
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
    def bisect(ignored):
        best, least = None, None
        for allocation in ("global", "uniform"):
            if allocation == "uniform" and head and "paths" not in feeding:
                feeding["paths"] = _feeding(model, example, head)
            lo, hi = 0.0, 0.9
            for _ in range(12):
                mid = (lo + hi) / 2
                try:
                    cand = _prune_copy(model, example, mid, imp, grads, ignored, heads, multiple,
                                       global_pruning=allocation == "global", head=head,
                                       feeding=feeding.get("paths", ()), skipped=skipped)
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
        return best, least

    stem_choice = None
    # The stem's outputs are most models' residual stream. The linearised criterion scores its channels as if
    # zeroing one were removing it, but every LayerNorm on the stream renormalises over the channels left, so it
    # underrates the cut: on a small ViT it took the stream from 32 to 24 wide and half the FFN for the FFN's
    # deeper cut alone (measured output loss 69 against 54; distilled accuracy 0.79 against 0.91). Where the stem
    # is free to go, the same budget with it kept is tried too, and the lower measured output loss wins (the
    # criterion the linearisation stands in for).
    # (the fallback below applies without compare_stem too: the search's candidates)
    stem = [p for p, why in defaults.items() if why == "input stem" and p not in ignored_paths]
    try:
        best, least = bisect(ignored_paths)
    except UserError:
        raise
    except Untraceable as e:  # with the stem kept it would not finish either
        raise _failed(model, e) from None
    except Exception as e:
        # A cut the model's own code does not follow may still run with the stem kept (DINOv2's head reads the
        # CLS token and the patch mean concatenated), or with the modules it failed in left whole (an attention
        # that reshapes by a head count of its own: ConvBERT, Swin), or both; each is tried, in that order.
        own = [p for p in _leave_whole(model, e) if p not in ignored_paths]
        tries = [t for t in (stem, own, stem + own if stem and own else []) if t]
        again = None
        for extra in tries:
            try:
                best, least = bisect(ignored_paths + extra)
                break
            except UserError:
                raise
            except Untraceable as e2:
                raise _failed(model, e2) from None
            except Exception as e2:
                again = e2 if own and set(own) <= set(extra) else again
        else:
            raise _failed(model, e, again) from None
        ignored_paths = ignored_paths + extra
        if own and set(own) <= set(extra):
            log(f"prune.channels: the copy fails in {own[0]} ({first_line(e, 120)}); {', '.join(own)} left whole")
            kept = {**kept, **{p: "its own code does not follow the cut" for p in own}}
        if stem and set(stem) <= set(extra):
            log(f"prune.channels: with the stem's channels cut the copy fails ({first_line(e, 120)}); the stem is kept")
            stem_choice = {"stem": stem, "kept": True, "why": f"the cut with it cut fails ({type(e).__name__})"}
            kept = {**kept, **{p: "input stem (the cut with it cut fails)" for p in stem}}
            stem = []
    if best is not None and stem and compare_stem:
        try:
            alt, _ = bisect(ignored_paths + stem)
            why = "the budget is out of reach"
        except Exception as e:  # the stem-cut cut stands; the other way only had to be tried
            alt, why = None, f"the cut failed ({type(e).__name__}: {str(e)[:120]})"
        if alt is None:
            log(f"prune.channels: with the stem kept {why}; the stem's channels are cut")
        else:
            losses = [_output_loss(model, b[1], batches) for b in (best, alt)]
            stem_choice = {"stem": stem, "loss_stem_cut": losses[0], "loss_stem_kept": losses[1],
                           f"{by}_stem_cut": best[2], f"{by}_stem_kept": alt[2], "kept": losses[1] < losses[0]}
            if stem_choice["kept"]:
                best = alt
                ignored_paths = ignored_paths + stem
                kept = {**kept, **{p: "input stem (the lower output loss)" for p in stem}}
            log(f"prune.channels: output loss {losses[0]:.4g} with the stem's channels cut "
                f"({stem_choice[f'{by}_stem_cut']:,.0f} {by} left), {losses[1]:.4g} with them kept "
                f"({stem_choice[f'{by}_stem_kept']:,.0f}): {'kept' if stem_choice['kept'] else 'cut'}")
    whole = "; ".join(f"{mods} ({err})" for mods, err in list(skipped.items())[:3]) + \
        (f"; and {len(skipped) - 3} more" if len(skipped) > 3 else "")
    if skipped:
        log(f"prune.channels: {len(skipped)} coupled group(s) left whole, torch-pruning cannot index them: {whole}")
    if best is None:
        kept_said = f"kept: {', '.join(ignored_paths) or 'none'}; multiple {multiple}"
        if head:
            kept_said += f"; {head} reads at least as many inputs as it has outputs"
        if skipped:
            kept_said += f"; left whole, torch-pruning cannot index them: {whole}"
        if least is None or least >= total * (1 - 1e-6):
            raise UserError(f"prune.channels: no channel of {type(model).__name__} can be cut ({kept_said}): every "
                            "group DepGraph found stays whole" + (f" at a multiple of {multiple} (a group too narrow to "
                            "lose a block, or tied to GroupNorm's groups); set prune.channels.multiple lower, or "
                            "null" if multiple else "") + "; or prune whole blocks (prune: {by: flops, remove: 0.3})")
        raise UserError(f"prune.channels: the most that pruning every group DepGraph found removes is "
                        f"{1 - least / total:.1%} of the {by} ({kept_said}: {least:,.0f} of {total:,.0f} left), short "
                        f"of the {remove:.0%} asked; lower prune.channels.remove, its multiple, or prune.ignore")
    ratio, pruned, after, allocation = best
    bn = recalibrate_batchnorm(pruned, batches)
    plan = {**plan_of(model, pruned), **({"folded": folded} if folded else {})}
    info = {"by": by, "remove": remove, "importance": importance, "allocation": allocation, "ratio": round(ratio, 4),
            "kept": kept,
            "ignore": list(ignore), f"{by}_before": total, f"{by}_after": after,
            "params": sum(p.numel() for p in pruned.parameters()),
            "flops": int(after) if by == "flops" else count_flops(pruned, example),
            "modules_changed": len(plan["modules"]), "batchnorm_recalibrated": bn,
            **({"stem_choice": stem_choice} if stem_choice else {}), **({"left_whole": skipped} if skipped else {})}
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
