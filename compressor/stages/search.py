"""search: find the student (compressor.search: NSGA-II over a space derived from the teacher), then hand
it to the pipeline; also `compress search`, the search alone.

The best candidate is the highest proxy score among those meeting every budget (size, latency per
device); it replaces the recipe's student, and its genome goes into the manifest so the student can be
rebuilt from the bundle alone. The Pareto front goes into the stage record and a plot into the bundle.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from ..bundle import StageRecord
from ..context import Context, load_inputs, sequence_length
from ..errors import UserError
from ..files import atomic_write, write_json
from ..models import build_model

name = "search"
needs = ("teacher", "data", "genome")


def _defaults(data, recipe=None, space=None) -> dict:
    """Builder arguments the genome leaves out: from the data, and for a Hugging Face student where the
    teacher lives and how it pools (compressor.hf.inherited), so the genome rebuilds it alone."""
    out = {"in_channels": data.input_shape[0], "num_classes": data.num_classes,
           "in_features": int(torch.Size(data.input_shape).numel())}
    if recipe is not None and space is not None and space.family == "hf-encoder":
        from ..hf import inherited

        out.update(inherited(recipe.teacher))
    return out


def _devices(recipe, log, predicted=()) -> dict:
    """{target: Device} whose latency the search uses; a target with a calibrated predictor stays in even
    when it cannot be reached now (a board over SSH): it is predicted, never measured."""
    from devices import get_device, load_profile

    out = {}
    for target in recipe.targets:
        dev = get_device(load_profile(target))
        why = dev.why_unavailable()
        if why and target in predicted:
            log(f"search: {target} cannot be measured now ({why}); its latency comes from the predictor alone")
        elif why:
            if target in recipe.budgets.latency_ms:
                raise UserError(f"search: budgets.latency_ms has {target}, but it cannot be measured ({why})")
            log(f"search: {target} not used for latency ({why})")
            continue
        out[target] = dev
    return out


PRUNED = "pruned teacher"  # the origin of the seeded candidate


def _seed_spec(recipe, spec):
    """The prune settings the pruned-teacher seed uses, or None when the search is not seeded."""
    want = spec.seed_pruned
    if want is None:  # default: seed when the recipe prunes too
        return recipe.prune
    if want is True:
        if recipe.prune is None:
            raise UserError("search.seed_pruned: true uses the recipe's prune section, and there is none: "
                            "give the settings instead (search.seed_pruned: {by: params, remove: 0.5})")
        return recipe.prune
    return want or None


def pruned_seed(recipe, data, teacher, spec, space, log=print) -> dict | None:
    """Prune the teacher as the recipe says (LAPTOP-Diff) and return its genome in ``space`` with what
    was removed; None when not asked, or (with a log line) when the space cannot express it."""
    from ..prune import calibration_batches, prune_teacher
    from ..search.spaces import pruned_genome
    from .prune import latency_source

    ps = _seed_spec(recipe, spec)
    if ps is None:
        return None
    if ps.width is not None or ps.channels is not None or ps.remove == 0:
        why = ("prune.width and prune.channels cut neurons, channels and heads per layer, which a search space's "
               "genome does not express")
        if spec.seed_pruned is not None:
            raise UserError(f"search.seed_pruned: the pruned teacher is not in the search space: {why}")
        log(f"search: the pruned teacher is not in the search space ({why}); not seeded, the prune stage decides")
        return None
    batches = calibration_batches(data, recipe.data.batch_size, ps.calibration_batches)
    _, info = prune_teacher(teacher, batches, ps.by, ps.remove, log=log, **latency_source(ps, recipe.targets, log, recipe.export))
    genome, why = pruned_genome(space, teacher, info["removed"], _defaults(data, recipe, space))
    if genome is None:
        if spec.seed_pruned is not None:  # asked for explicitly: say it cannot be done
            raise UserError(f"search.seed_pruned: the pruned teacher is not in the search space: {why}")
        log(f"search: the pruned teacher is not in the search space ({why}); not seeded, the prune stage decides")
        return None
    return {"genome": genome, "origin": PRUNED, "removed": info["removed"],
            "prune": {k: v for k, v in info.items() if k != "units"}}


def run_search(recipe, data, teacher, spec, run_dir: Path, log=print, worker: bool = False):
    """Run the search the recipe asks for; return (space, result, seed). ``run_dir`` holds the SQLite
    study; ``seed`` is the pruned teacher's seed (pruned_seed) or None.

    A storage named in the recipe, or ``worker``, is shared: it is used directly (each trial stored as
    it ends) so other processes see every trial. A worker draws its own sampler seed; the recipe's
    seed still builds each candidate, so every worker scores a genome alike."""
    from ..search import PROXIES
    from ..search.latency import load_predictors
    from ..search.nsga import search
    from ..search.proxies import TeacherView, check_task
    from ..search.spaces import from_spec
    from ..tasks import at_length, rows, size, take

    if spec.proxy not in PROXIES:
        raise UserError(f"search.proxy {spec.proxy!r}: known proxies are {', '.join(PROXIES)}")
    predictors = load_predictors(recipe)
    for target, pred in predictors.items():
        cv = pred.meta.get("cross_validation") or {}
        err = (f"5-fold MAPE {cv['mape']:.1%}, {cv['within_10pct']:.0%} within 10%" if "mape" in cv
               else "no cross-validated error stored")
        log(f"search: latency on {target} predicted by {spec.predictor} ({pred.method}, {len(pred.points)} "
            f"measured candidates of space {pred.space or '?'}, fitted {pred.fitted_at}; {err})")
    form = check_task(spec.proxy, recipe.task)
    space = from_spec(spec, teacher, recipe.teacher.model)
    log(f"search: {space.family} space of {space.size:,} students ({', '.join(f'{g}: {c}' for g, c in space.genes.items())})")
    log(f"search: proxy {spec.proxy} for task {recipe.task}: {form}")
    seed = pruned_seed(recipe, data, teacher, spec, space, log)
    n = spec.batch_size
    xs, ys = data.tensors("train", limit=n * spec.proxy_seeds)
    total = size(xs)
    batches = [(rows(xs, i, i + n), ys[i:i + n]) for i in range(0, total, n) if min(total, i + n) - i >= 2]
    if len(batches) < spec.proxy_seeds:
        log(f"search: the training split holds {len(batches)} batches of {n}, so the proxy averages {len(batches)} "
            f"pairs instead of search.proxy_seeds {spec.proxy_seeds}")
    pairs = [(b, TeacherView.of(teacher, b, recipe.task) if spec.proxy == "diswot" else None) for b in batches]
    # FLOPs and latency at the length the devices run (token inputs padded or cut to it)
    example = at_length(take(xs, 1), sequence_length(recipe, data))
    (batch, view), more = pairs[0], pairs[1:]
    run_dir.mkdir(parents=True, exist_ok=True)
    storage = spec.storage or f"sqlite:///{(run_dir / 'search.db').resolve()}"
    b = recipe.budgets
    sampler_seed = None
    if worker:
        import secrets

        sampler_seed = secrets.randbelow(2**31)
        log(f"search: worker on study {spec.study or recipe.name + '-search'!r}, sampler seed {sampler_seed}")
    result = search(space, PROXIES[spec.proxy], batch, teacher_view=view, defaults=_defaults(data, recipe, space),
                    devices=_devices(recipe, log, predictors), size_mb=b.size_mb, latency_ms=dict(b.latency_ms),
                    trials=spec.trials, population=spec.population, seed=recipe.seed, storage=storage,
                    study_name=spec.study or f"{recipe.name}-search", latency=spec.latency,
                    calibration=spec.calibration, measure_kw={"warmup": 5, "runs": 30, "max_seconds": 2.0},
                    log=log, shared=worker or spec.storage is not None, sampler_seed=sampler_seed,
                    seeds=[seed] if seed else None, more_batches=more, predictors=predictors, example=example)
    result.proxy = {"name": spec.proxy, "task": recipe.task, "form": form}
    return space, result, seed


def _seed_record(seed, result) -> dict | None:
    """What became of the pruned-teacher seed: its candidate, its rank by score, whether it was chosen."""
    if seed is None:
        return None
    from ..search.spaces import genome_key

    key = genome_key(seed["genome"])
    mine = next((c for c in result.candidates if c.key == key), None)
    ranked = sorted({c.key: c for c in result.candidates if c.feasible}.values(), key=lambda c: -c.metrics["score"])
    rank = next((i + 1 for i, c in enumerate(ranked) if c.key == key), None)
    return {"seeded": True, "genome": seed["genome"], "key": key, "removed": seed["removed"],
            "chosen": result.best is not None and result.best.key == key,
            "on_front": any(c.key == key for c in result.front), "feasible_rank": rank,
            "feasible": len(ranked), "candidate": mine.to_dict() if mine else None, "prune": seed["prune"]}


def write_outputs(space, result, out: Path) -> dict:
    """candidates.json and pareto.png under ``out``; returns their names."""
    write_json(out / "candidates.json", {"space": space.to_dict(), **result.summary(),
                                         "candidates": [c.to_dict() for c in result.candidates]})
    from ..search.plot import plot_front

    plot_front(result, out / "pareto.png")
    return {"candidates": "candidates.json", "plot": "pareto.png"}


def skip(ctx: Context) -> str | None:
    return None if ctx.recipe.search is not None else "the recipe has no search section"


def run(ctx: Context) -> StageRecord:
    from ..search.nsga import tightest

    spec = ctx.recipe.search
    if spec.family == "teacher":  # the teacher's own sub-networks, ranked by short distillations
        from . import subnets

        return subnets.run(ctx, spec, _devices(ctx.recipe, ctx.log))
    space, result, seed = run_search(ctx.recipe, ctx.data, ctx.teacher, spec, ctx.scratch, ctx.log)
    b = ctx.recipe.budgets
    files = {k: f"search/{v}" for k, v in write_outputs(space, result, ctx.work / "search").items()}
    if result.best is None:
        raise UserError(tightest(result, b.size_mb, dict(b.latency_ms)))
    best = result.best
    defaults = _defaults(ctx.data, ctx.recipe, space)
    seeded = _seed_record(seed, result)
    found = {"family": space.family, "genes": best.genome, "key": best.key}
    if seeded and seeded["chosen"]:
        # The pruned teacher won: it keeps the teacher's weights (the proxy scored its architecture at
        # random init, like every candidate). Its genome is the prune stage's, so prune.rebuild() and the
        # shipped weights rebuild it.
        from ..prune import build_pruned

        ctx.student = build_pruned(ctx.teacher, seed["removed"])
        t = ctx.recipe.teacher
        ctx.genome = {"model": t.model, "config": t.kwargs, "defaults": ctx.genome.get("defaults", defaults),
                      "pruned_from": "teacher", "removed": list(seed["removed"]), "search": found}
        ctx.log(f"search: the pruned teacher ({', '.join(seed['removed'])} removed) is the best candidate; "
                "it keeps the teacher's weights")
    else:
        torch.manual_seed(ctx.recipe.seed)
        ctx.student = space.build(best.genome, defaults)
        ctx.genome = {"model": space.builder, "config": space.config(best.genome), "defaults": defaults,
                      "search": found}
        if seeded:
            ctx.log(f"search: the pruned teacher ranked {seeded['feasible_rank'] or 'infeasible'} of "
                    f"{seeded['feasible']} candidates meeting the budgets"
                    f"{' (on the Pareto front)' if seeded['on_front'] else ''}; not chosen")
    m = best.metrics
    lat = ", ".join(f"{d} {v:.3f} ms ({m['latency_label']})" for d, v in m["latency_ms"].items())
    ctx.log(f"search: chose {space.config(best.genome)} ({m['params']:,} params, {m['flops'] / 1e6:.1f} MFLOPs, "
            f"{m['size_mb']:.3f} MB{', ' + lat if lat else ''}; score {m['score']:.4g}); plot in {files['plot']}")
    return StageRecord(name, config=spec.model_dump(mode="json"),
                       metrics={**result.summary(), "space": space.to_dict(), "best": best.to_dict(),
                                "front": [c.to_dict() for c in result.front],
                                "latency_models": result.latency_models,
                                **({"pruned_seed": seeded} if seeded else {})},
                       outputs={**files, "student": ctx.genome})


def restore(ctx: Context, rec: StageRecord) -> None:
    if "student" not in rec.outputs:
        return
    g = rec.outputs["student"]
    torch.manual_seed(ctx.recipe.seed)
    if g.get("search", {}).get("family") == "teacher":  # a sub-network of the teacher, maybe channels cut
        from . import subnets

        return subnets.restore(ctx, g)
    if "removed" in g:  # the pruned teacher was chosen; its weights come from the distill stage's record
        from ..prune import build_pruned

        ctx.student = build_pruned(ctx.teacher, g["removed"])
    else:
        ctx.student = build_model(g["model"], g["config"], g["defaults"], what="searched student")
    ctx.genome = g


def search_command(recipe, out: Path, log=print, worker: bool = False) -> dict:
    """`compress search`: the search alone, its study and outputs in ``out``; returns the best.
    ``worker``: one of several processes adding trials to a shared study (see run_search)."""
    from ..recipe import SearchSpec
    from ..search.nsga import tightest

    data, teacher, _ = load_inputs(recipe, log)  # a text teacher lends the data its tokenizer
    spec = recipe.search or SearchSpec()
    space, result, seed = run_search(recipe, data, teacher, spec, out, log, worker=worker)
    write_outputs(space, result, out)
    b = recipe.budgets
    if result.best is None:
        raise UserError(tightest(result, b.size_mb, dict(b.latency_ms)))
    seeded = _seed_record(seed, result)
    best = {"student": {"model": space.builder, "config": space.config(result.best.genome),
                        "defaults": _defaults(data, recipe, space)},
            **result.best.to_dict(), "front": len(result.front), **result.summary(),
            **({"pruned_seed": {k: v for k, v in seeded.items() if k != "candidate"}} if seeded else {})}
    atomic_write(out / "best.json", json.dumps(best, indent=2) + "\n")
    return best
