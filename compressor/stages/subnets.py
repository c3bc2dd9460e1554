"""The search stage's ``family: teacher``: the teacher's own sub-networks (compressor.search.subnets),
filtered by the budgets, ranked by short distillations in successive halving; the winner keeps the
teacher's weights and becomes the student."""
from __future__ import annotations

import copy
import time

from ..bundle import StageRecord
from ..context import Context, build_student
from ..errors import UserError
from ..files import write_json
from ..flops import count_flops
from ..hold import hold
from ..measure import model_key
from ..prune import calibration_batches, find_units, score_units
from ..search import subnets as S
from ..search.journal import Journal
from ..tasks import size, take
from .prune import cut as prune_cut
from .prune import cut_teacher, keep_cut, unlayered


def latency_of(devices: dict, example, export) -> callable:
    """A function: models -> [{device: b1 ms}], measured round robin on each device (compressor.measure),
    each model exported as ``export`` (the recipe's ExportSpec) ships it."""
    from ..measure import Meter

    def measure(models):
        out = [{} for _ in models]
        for name, dev in devices.items():
            with Meter(dev, warmup=10, runs=50, max_seconds=1.0, opset=export.opset,
                       dynamic_batch=export.dynamic_batch) as meter:
                for row, ms in zip(out, meter.latencies_ms(models, example, rounds=3)):
                    row[name] = ms
        return out
    return measure


def run(ctx: Context, spec, devices: dict) -> StageRecord:
    recipe, data, teacher = ctx.recipe, ctx.data, ctx.teacher
    b = recipe.budgets
    ignore = recipe.prune.ignore if recipe.prune is not None else ()
    batches, labels = calibration_batches(data, recipe.data.batch_size, 4, labels=True)
    example = ctx.flops_example()
    space = S.teacher_space(teacher, batches[0], spec.channels, ignore=ignore)
    t_flops = count_flops(teacher, example)
    max_flops = spec.max_flops * t_flops if spec.max_flops else None
    latency_ms = dict(b.latency_ms)
    if max_flops is None and not latency_ms and b.size_mb is None and spec.max_latency is None and spec.as_fast_as is None:
        raise UserError("search.family: teacher needs a budget to search under: search.max_latency or search.max_flops "
                        "(fractions of the teacher's latency or FLOPs), search.as_fast_as (a model to be no slower "
                        "than), budgets.latency_ms or budgets.size_mb")
    for name in ("max_latency", "as_fast_as"):
        if getattr(spec, name) is not None and not devices:
            raise UserError(f"search.{name} needs a target to measure on (targets: [local-cpu], say)")
    genomes = space.genomes()
    t0 = time.time()
    journal = Journal(ctx.scratch / "search" / "ladder.json", _journal_key(ctx, spec))
    build, trials = S.Builder(space, teacher, batches, labels=labels, ignore=ignore, example=example,
                              **cut_shape(recipe.prune)), []
    # search.as_fast_as: the model to be no slower than, built now (a wrong builder fails before the long part);
    # ``prune``: the teacher cut as the prune section says, and its genome in the space (None where it has none)
    reference, own, own_plan = _reference(ctx, spec, space, build.cut)
    fits = genomes
    if max_flops is not None:
        # Rung 0, first half: FLOPs estimated before building (the cut's fraction lands within a few percent), over
        # the whole space, so the trials below are spent on genomes that can meet the budget.
        fits = []
        for gnm in genomes:
            # the prune section's cut is built already: its own count, not an estimate, decides
            est = count_flops(reference, take(example, 1)) if gnm == own else build.flops_estimate(gnm)
            if est > (max_flops if gnm == own else max_flops * 1.03):
                trials.append(S.Trial(gnm, cost={"flops": int(est), "estimated": True}, feasible=False,
                                      why=f"about {S.mflops(est)} > {S.mflops(max_flops)}"))
            else:
                fits.append(gnm)
        genomes = fits
    sampled = ""
    if len(genomes) > spec.trials:
        # A large space: per depth and cut, the genomes that drop the units layer pruning would drop first (the
        # least summed single-unit output loss); the teacher's own genome in it, if it fits.
        units = score_units(teacher, find_units(teacher, batches[0], ignore), batches[:2], with_flops=False)
        first = genomes[:1] if not space.removed(genomes[0]) and not genomes[0]["channels"] else []
        genomes = first + S.most_promising(genomes[len(first):], space, {u.path: u.loss for u in units},
                                           spec.trials - len(first), seed=recipe.seed)
        sampled = " (per depth and cut, those dropping the units of least output loss)"
        if own is not None and own in fits and own not in genomes:
            genomes.append(own)
    ctx.log(f"search: the teacher's sub-networks: {len(space.units)} droppable units ({', '.join(space.units)}), "
            f"cuts of {', '.join(f'{c:g}' for c in space.channels)} of the FLOPs by {build.why or build.cuts}: "
            f"{space.size} genomes"
            f"{f', {len(trials)} over the FLOPs budget' if trials else ''}; {len(genomes)} tried{sampled}")
    refused = []  # cuts the structure cannot give
    for gnm in genomes:
        # Rung 0, second half: FLOPs and size as built, then latency on each device for those left.
        est = build.flops_estimate(gnm)
        try:
            # the prune section's cut itself, not the Builder's quicker estimate of it
            model, plan = (copy.deepcopy(reference), own_plan) if gnm == own else build(gnm)
        except UserError as e:  # a cut the structure cannot give (groups at their multiple): not a candidate
            if not refused:  # weights outside layers, said once (as the prune stage says it)
                hint = unlayered(teacher, example)
            trials.append(S.Trial(gnm, cost={"flops": int(est), "estimated": True}, feasible=False,
                                  why=str(e).split(": ", 1)[-1] + hint))
            refused.append(trials[-1])
            continue
        trial = S.Trial(gnm, model, plan)
        if not journal.restore(trial, model_key(model, take(example, 1))):
            trial.cost = S.costs(model, example)
        trials.append(trial)
    built_s = time.time() - t0
    if refused:  # cuts the structure cannot give: say so, or a search of one candidate looks like a choice
        ctx.log(f"search: {len(refused)} channel cut(s) cannot be made, e.g. {refused[0].genome['channels']:.0%}: "
                f"{refused[0].why}")
    restored = sum(bool(t.rungs) or "latency_ms" in t.cost for t in trials)
    if restored:
        ctx.log(f"search: {restored} candidates' costs and scores restored from the interrupted run "
                f"({journal.path.relative_to(ctx.work)})")
    for t in trials:
        if t.why:
            continue
        t.cost["size_mb"] = t.cost["params"] * 4 / 1e6
        t.why = S.check_budget(t.cost, max_flops=max_flops)
        if not t.why and b.size_mb is not None and t.cost["size_mb"] > b.size_mb:
            t.why = f"{t.cost['size_mb']:.3f} MB > {b.size_mb}"
    left = [t for t in trials if not t.why]
    teacher_ms, reference_ms = {}, {}
    # Candidates are timed only where a budget reads their latency: without one, hf_mobilenet's search spent 166 of
    # its 532 s timing them on local-cpu (the profile stage measures the student that ships either way).
    timed = bool(latency_ms) or spec.max_latency is not None or reference is not None
    if devices and left and not timed:
        ctx.log(f"search: candidates not timed on {', '.join(devices)}: no latency budget (budgets.latency_ms, "
                "search.max_latency or search.as_fast_as); the profile stage measures the student")
    if devices and left and timed:
        x1 = take(example, 1)
        if journal.teacher_ms and all("latency_ms" in t.cost for t in left) and (reference is None or journal.reference_ms):
            # measured before the interruption: the same numbers, the same budgets
            teacher_ms, reference_ms = journal.teacher_ms, journal.reference_ms
        else:
            # The teacher (and search.as_fast_as's model) measured beside the candidates, in one round robin: a
            # budget relative to them holds on any host and through a slow spell.
            teacher_ms, *lats = latency_of(devices, x1, recipe.export)(
                [teacher] + ([reference.eval()] if reference is not None else []) + [t.model for t in left])
            if reference is not None:
                reference_ms, *lats = lats
            for t, lat in zip(left, lats):
                t.cost["latency_ms"] = lat
        if spec.max_latency is not None:
            latency_ms = {d: min(latency_ms.get(d, float("inf")), spec.max_latency * ms) for d, ms in teacher_ms.items()}
        own_limits = dict(latency_ms)
        if reference is not None:
            latency_ms = {d: min(latency_ms.get(d, float("inf")), ms) for d, ms in reference_ms.items()}
            ctx.log("search: as fast as " + ", ".join(f"{d} {ms:.3f} ms (teacher {teacher_ms[d]:.3f})"
                                                      for d, ms in reference_ms.items()))
        for t in left:
            # the prune section's own cut is the reference's shape: as fast as itself, whatever the noise says
            t.why = S.check_budget(t.cost, latency_ms=own_limits if t.genome == own else latency_ms)
    journal.teacher_ms, journal.reference_ms = teacher_ms, reference_ms
    journal.save(trials)
    for t in trials:
        t.feasible = not t.why
    feasible = [t for t in trials if t.feasible]
    ctx.log(f"search: {len(feasible)} of {len(trials)} candidates meet the budgets ({sum(t.model is not None for t in trials)} "
            f"built; {time.time() - t0:.1f} s)")
    if not feasible:
        built = [t for t in trials if t.model is not None]  # the nearest miss: a built one says more
        tight = min(built or trials, key=lambda t: t.cost["flops"])
        raise UserError(f"search: no sub-network of the teacher meets the budgets; the smallest "
                        f"({S.mflops(tight.cost['flops'])}) breaks one: {tight.why}")
    # Rungs 1+: short distillations from the teacher's cached outputs, scored on the validation split.
    # The short rungs train on the first rung_samples training samples and score on every held-out sample: the
    # validation split and the training samples they do not train on (on digits 180 + 746, not 180).
    xs, _ = data.tensors("train", limit=spec.rung_samples)
    hx, hy = data.held_out(size(xs))
    rung = S.Rung.of(teacher, xs, hx, hy, recipe.task, batch_size=min(64, size(xs)), lr=recipe.distill.lr,
                     by_length=recipe.data.group_by_length is not False, lazy=recipe.distill.lazy_embeddings)
    ctx.log(f"search: rungs train on {size(xs)} samples and score on {size(hx)} held out " + (
        "(the validation split alone: the data kept it apart from the training text)" if data.meta.get("val_apart")
        else f"({min(len(data.val), size(hx))} validation, the rest training samples the rungs do not see)"))

    def scored(_):
        journal.save(trials)
        hold("rung")  # tests stop the run here (compressor.hold)

    # A short rung ranks how a candidate starts: a deeper, narrower sub-network starts slower than a shallow, wide
    # one of the same cost and can end ahead of it, so with per_depth the best of each depth goes on too.
    depth = (lambda t: len(space.units) - len(space.removed(t.genome))) if spec.per_depth else None
    if own is not None:  # the prune section's cut goes on to the final few whatever its short rungs say
        depth = (lambda t, d=depth: "as_fast_as" if t.genome == own else d(t) if d else None)
    final = S.successive_halving(trials, rung, list(spec.rungs), eta=spec.eta, keep=max(1, spec.final), seed=recipe.seed,
                                 log=ctx.log, scored=scored, stratum=depth)
    ladder, last = list(spec.rungs), rung
    if spec.final and len(final) > 1:
        # The final few distilled as long as the student will be, on every training sample: what a short rung
        # ranks is how a candidate starts, and sub-networks that start alike can end two points apart.
        # Trained on every training sample, they are scored on the validation split alone, and under the distill
        # stage's learning-rate schedule: a deep cut that reached 0.98 at a constant rate distilled to 0.92 under
        # the recipe's cosine (the narrow sub-network needs the high rate longer), so the ranking must see it.
        fx, _ = data.tensors("train")
        vx, vy = data.tensors("val", limit=2048)
        ladder.append(float(recipe.distill.epochs))
        last = rung.over(teacher, fx, vx, vy, schedule=recipe.distill.schedule)
        final = S.successive_halving(S.best_of(final, spec.final, depth), last, [float(recipe.distill.epochs)],
                                     seed=recipe.seed, log=ctx.log, scored=scored, first=len(spec.rungs),
                                     keep_trained=True)
    harmed = S.training_harms(final, last, ctx.log)
    if reference is not None and devices and len(final) > 1:
        final = _recheck(ctx, final, reference, own, devices, take(example, 1), recipe.export)
        journal.save(trials)
    best = final[0]
    removed = space.removed(best.genome)
    mine = next((t for t in trials if own is not None and t.genome == own), None)
    if mine is not None:
        ctx.log("search: the prune section's cut (as_fast_as: prune) " + (
            f"scored {mine.score:.4f} at rung {len(mine.rungs)}; " if mine.rungs else f"was not ranked ({mine.why}); ")
            + ("it is the student" if mine is best else f"the chosen candidate scored {best.score:.4f}"))
    # The final rung distilled the winner as long as the student will be: the distill stage goes on from those
    # weights, not from the cut again (dw_cnn shipped 0.922 from the cut after its final rung scored 0.967).
    # A search resumed after its final rung has the score alone and starts from the cut.
    ctx.student = best.trained if best.trained is not None else best.model
    t = recipe.teacher
    found = {"family": "teacher", "genes": best.genome, "rung_score": best.score,
             "trained": best.trained is not None}
    ctx.genome = {"model": t.model, "config": t.kwargs, "defaults": ctx.genome.get("defaults", {}),
                  "pruned_from": "teacher", "removed": removed, **({build.cut: best.plan} if best.plan else {}),
                  "search": found}
    # what a resume rebuilds the student from: the trained finalist's weights, or a channel cut's (a width plan
    # alone rebuilds from the teacher's weights)
    if best.trained is not None or best.plan and build.cut == "channels":
        keep_cut(ctx, ctx.student)
    overshoot(ctx, build, best)
    c = best.cost
    lat = ", ".join(f"{d} {v:.3f} ms" for d, v in c.get("latency_ms", {}).items())
    ctx.log(f"search: chose the teacher {'without ' + ', '.join(removed) if removed else 'with every unit'}, "
            f"{best.genome['channels']:.0%} of "
            f"FLOPs cut by {build.cuts}: {c['params']:,} params, {S.mflops(c['flops'])}{', ' + lat if lat else ''}; "
            f"rung score {best.score:.4f}")
    rows = [t.to_dict() for t in trials]
    write_json(ctx.work / "search" / "candidates.json", {"space": space.to_dict(), "candidates": rows})
    plot(trials, best, ctx.work / "search" / "pareto.png")
    return StageRecord("search", config=spec.model_dump(mode="json"),
                       metrics={"space": space.to_dict(), "trials": len(trials), "feasible": len(feasible),
                                "teacher_flops": t_flops, "max_flops": max_flops, "build_seconds": round(built_s, 2),
                                "teacher_latency_ms": teacher_ms, "latency_budget_ms": latency_ms,
                                **({"as_fast_as_latency_ms": reference_ms} if reference is not None else {}),
                                **({"as_fast_as_prune": {"genome": own, "candidate": mine.to_dict() if mine else None,
                                                         "chosen": mine is best}} if own is not None else {}),
                                "rungs": [{"epochs": e, "candidates": sum(len(t.rungs) > k for t in trials),
                                           "seconds": round(sum(t.rungs[k]["seconds"] for t in trials if len(t.rungs) > k), 2)}
                                          for k, e in enumerate(ladder)],
                                "best": best.to_dict(), "final": [t.to_dict() for t in final],
                                "training_lowered_scores": harmed},
                       outputs={"candidates": "search/candidates.json", "plot": "search/pareto.png",
                                "student": ctx.genome})


def overshoot(ctx: Context, build: S.Builder, best: S.Trial) -> None:
    """Warn when the chosen candidate's cut removes well over its fraction of FLOPs, as the prune stage warns of
    its own: the cut takes the nearest step at or under the fraction, and on a model of few, narrow layers that
    can be far under (dict_cnn: 64% for 50%), which the budget did not ask for."""
    asked = best.genome["channels"]
    if not asked:
        return
    gone = 1 - best.cost["flops"] / build.layers_flops(best.genome)
    if gone > asked + 0.05:
        ctx.log(f"search: warning: the chosen cut removes {gone:.0%} of its sub-network's FLOPs, {asked:.0%} asked: "
                f"the nearest cut of {build.cuts} at or under it; a lower prune.{build.cut}.multiple (the search "
                f"cuts as it says) gives finer steps")


def _recheck(ctx: Context, final: list, reference, own, devices: dict, x1, export) -> list:
    """The final few, best first, timed again beside search.as_fast_as's model in a round robin of their own;
    those slower than it this time go after those that are not (the prune section's own cut excepted: it is the
    reference's shape). One reading can be a third off (a ViT's reference read 0.086 ms among the candidates and
    0.064 ms beside the students after), which lets a slower candidate through; two readings rarely both are.
    Kept in each candidate's cost, so a resumed run reads them again instead of drawing new noise."""
    if not all("as_fast_as_recheck_ms" in t.cost for t in final):
        ref_ms, *lats = latency_of(devices, x1, export)([reference.eval()] + [t.model for t in final])
        for t, lat in zip(final, lats):
            t.cost["latency_recheck_ms"], t.cost["as_fast_as_recheck_ms"] = lat, ref_ms
    ok, slow = [], []
    for t in final:
        ref, lat = t.cost["as_fast_as_recheck_ms"], t.cost["latency_recheck_ms"]
        over = t.genome != own and any(ms > ref.get(d, float("inf")) for d, ms in lat.items())
        (slow if over else ok).append(t)
    for t in slow:
        ctx.log("search: a finalist timed slower than search.as_fast_as's model again, so it goes after the rest: "
                + ", ".join(f"{d} {ms:.3f} ms > {t.cost['as_fast_as_recheck_ms'][d]:.3f}"
                            for d, ms in t.cost["latency_recheck_ms"].items()))
    return ok + slow


def _reference(ctx: Context, spec, space: S.SubnetSpace, cut: str):
    """(search.as_fast_as's model or None, the genome of ``space`` that is that model or None, its cut's plan). A
    named student has no genome; ``prune`` has one where the prune section drops units of the space and cuts a
    fraction the space offers in the way the space cuts (``cut``: width, heads and FFN neurons; channels,
    structural)."""
    want = spec.as_fast_as
    if want is None:
        return None, None, None
    if want != "prune":
        return build_student(ctx.recipe, ctx.data, want)[0], None, None
    p = ctx.recipe.prune
    if p is None:
        raise UserError("search.as_fast_as: prune needs a prune section (the cut to be no slower than)")
    model, info, width, channels = prune_cut(ctx, p)
    removed, w, c = info["removed"], p.width, p.channels
    frac = (0.0 if w is None and c is None else
            w.remove if c is None and cut == "width" and not w.hidden and w.ffn and w.heads and w.cost == "flops" else
            c.remove if w is None and cut == "channels" and c.by == "flops" else None)
    frac = next((f for f in space.channels if frac is not None and abs(frac - f) < 1e-9), None)  # the space's own float
    if frac is None or not set(removed) <= set(space.units):
        ctx.log("search: the prune section's cut is not a genome of this space (units or a cut it does not offer, "
                "or a width cut costed by latency): it is the latency budget only")
        return model.eval(), None, None
    genome = {**{f"drop:{u}": int(u in removed) for u in space.units}, "channels": frac}
    ctx.log(f"search: as fast as the prune section's cut ({'without ' + ', '.join(removed) if removed else 'every unit'}, "
            f"{frac:.0%} of FLOPs cut), a candidate of its own")
    return model.eval(), genome, (width if cut == "width" else channels)


def cut_shape(prune) -> dict:
    """{section: {setting: value}}: the recipe's prune.width and prune.channels settings that shape the candidates'
    cuts (compressor.search.subnets.SHAPE: multiple, heads, ...), so they are cut as the prune stage would cut."""
    return {k: {o: getattr(sec, o) for o in S.SHAPE[k]} for k in S.SHAPE
            if prune is not None and (sec := getattr(prune, k)) is not None}


def _journal_key(ctx: Context, spec) -> str:
    """What the ladder's saved progress depends on: the teacher and the training data (the teacher-output cache's
    key), the search's settings, the seed, the rungs' learning rate and the distill epochs and schedule (the final
    rung's)."""
    import hashlib
    import json

    from ..distill.cache import key

    prune = ctx.recipe.prune
    ignore = prune.ignore if prune is not None else []
    # as_fast_as: prune times the prune section's cut: another cut is another budget
    reference = prune.model_dump(mode="json") if spec.as_fast_as == "prune" and prune is not None else None
    shape = cut_shape(prune)
    return hashlib.sha256(json.dumps([key(ctx.teacher, ctx.data.train), spec.model_dump(mode="json"), ctx.recipe.seed,
                                      ctx.recipe.distill.lr, ignore, ctx.recipe.distill.epochs,
                                      ctx.recipe.distill.schedule, *([reference] if reference else []),
                                      *([] if ctx.recipe.distill.lazy_embeddings else ["dense tables"]),
                                      *([shape] if shape else [])],
                                     default=str).encode()).hexdigest()


def restore(ctx: Context, g: dict) -> None:
    ctx.student = cut_teacher(ctx, g["removed"], g.get("width"), g.get("channels"),
                              saved=g.get("search", {}).get("trained", False))
    ctx.genome = g


def plot(trials, best, path) -> None:
    """Each candidate's last rung score against its FLOPs, coloured by the rung it reached."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.4), dpi=120)
    over = [t for t in trials if not t.feasible]
    if over:
        ax.scatter([t.cost["flops"] / 1e6 for t in over], [0] * len(over), c="0.75", s=12, label="over a budget")
    for k in range(max((len(t.rungs) for t in trials), default=0)):
        pts = [t for t in trials if len(t.rungs) == k + 1]
        if pts:
            ax.scatter([t.cost["flops"] / 1e6 for t in pts], [t.score for t in pts], s=16, label=f"stopped at rung {k + 1}{_rung_label(pts[0].rungs[k])}")
    ax.scatter([best.cost["flops"] / 1e6], [best.score], marker="*", s=180, c="gold", edgecolors="k", zorder=5,
               label="chosen")
    ax.set_xlabel("MFLOPs per sample")
    ax.set_ylabel("short-distillation score (held-out)")
    ax.set_title(f"the teacher's sub-networks: {len(trials)} candidates")
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png")
    plt.close(fig)


def _rung_label(r: dict) -> str:
    return f" ({r['epochs']:g} epochs of {r['samples']} samples)" if "samples" in r else ""
