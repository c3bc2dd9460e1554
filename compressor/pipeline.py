"""run(recipe) -> bundle. The only place where stage order lives (compressor.stages.ORDER) and the loop
that runs it.

Each stage's record goes to ``<out>.partial/stages/<name>.json`` as the stage ends, so ``--resume``
rebuilds finished stages from their records (``restore``) instead of running them again. The bundle
appears under ``<out>`` only when every stage has finished (a rename, compressor.finalize), so a failed
run never leaves a half-written bundle; a lock on ``<out>.lock`` keeps two runs out of one directory.
"""
from __future__ import annotations

import json
import shutil
import sys
import time
from pathlib import Path
from typing import Callable

import torch

from devices import load_profile

from .bundle import StageRecord, now
from .context import Context, make_context
from .errors import UserError
from .files import write_json
from .finalize import finalize
from .follower import follow, follower_rank
from .hold import hold
from .recipe import Recipe, load_recipe
from .runlock import RunLock
from .stages import ORDER, Stage


def run(recipe: Recipe | str | Path | dict | None = None, out_dir: str | Path | None = None, *,
        overrides=(), resume: bool = False, force: bool = False, log: Callable[[str], None] | None = None) -> Path:
    """Run every stage of ``recipe`` and write the bundle; return the bundle's path."""
    source = str(recipe) if isinstance(recipe, (str, Path)) else None
    recipe = load_recipe(recipe, overrides)
    log = log or (lambda s: print(s, file=sys.stderr))
    out = Path(out_dir or Path("runs") / recipe.name)
    work = out.with_name(out.name + ".partial")
    rank = follower_rank()
    if rank:
        return follow(recipe, work, rank, log)
    lock = RunLock(out).acquire(work)  # before looking at the directories: another run may be changing them
    try:
        return _run(recipe, source, out, work, overrides, resume, force, log)
    finally:
        lock.release()


def _prepare(recipe: Recipe, out: Path, work: Path, resume: bool, force: bool) -> bool:
    """Refuse what would overwrite or mix runs; fail on unknown devices before any work. Whether the
    run starts afresh."""
    if out.exists() and not force:
        raise UserError(f"{out} already exists: pass --force to replace it, or --out to write elsewhere")
    if work.exists() and not resume:
        if not force:
            raise UserError(f"an unfinished run is in {work}: pass --resume to continue it, or --force to start over")
        shutil.rmtree(work)
    run_json = {"recipe": recipe.model_dump(mode="json")}
    if resume and (work / "run.json").is_file():
        before = json.loads((work / "run.json").read_text())
        if before.get("recipe") != run_json["recipe"]:
            raise UserError(f"--resume: the recipe differs from the one that started {work}; "
                            "use the same recipe, or --force to start over")
    for target in recipe.targets:
        load_profile(target)  # an unknown device fails now, before any work
    if recipe.search is not None:
        from .search.latency import load_predictors

        load_predictors(recipe)  # so does a missing or foreign search.predictor file
    fresh = not work.exists()
    work.mkdir(parents=True, exist_ok=True)
    for stray in work.rglob(".*.tmp"):  # a write cut short by a crash; its target was never replaced
        stray.unlink()
    write_json(work / "run.json", run_json)
    return fresh


def _step(stage: Stage, ctx: Context, parent: str | None, resume: bool) -> StageRecord:
    """Run one stage, or skip it, or restore it from the record an earlier run left."""
    marker = ctx.work / "stages" / f"{stage.name}.json"
    if resume and marker.is_file():
        rec = StageRecord.from_dict(json.loads(marker.read_text()))
        if not rec.skipped:
            stage.restore(ctx, rec)
        ctx.log(f"[{stage.name}] done earlier ({rec.seconds:.1f} s), resumed from its record")
        return rec
    t0, started = time.time(), now()
    torch.manual_seed(ctx.recipe.seed)
    why = stage.skip(ctx)
    ctx.log(f"[{stage.name}]" + (f" skipped: {why}" if why else ""))
    rec = StageRecord(stage.name, skipped=why) if why else stage.run(ctx)
    rec.seconds, rec.started, rec.parent = round(time.time() - t0, 3), started, parent
    write_json(marker, rec.to_dict())
    hold("stage")  # tests only (COMPRESSOR_HOLD): act between stages on any host
    return rec


def run_stages(ctx: Context, resume: bool = False, until: str | None = None) -> None:
    """Each stage in order, run, skipped or restored, its record in ``ctx.records``; stop before the stage named
    ``until`` (a benchmark that wants the recipe's student as search and prune leave it: until="distill")."""
    parent = None
    for stage in ORDER:
        if stage.name == until:
            break
        rec = ctx.records[stage.name] = _step(stage, ctx, parent, resume)
        if not rec.skipped:  # a stage that did nothing is nobody's parent
            parent = stage.name


def _run(recipe: Recipe, source, out: Path, work: Path, overrides, resume: bool, force: bool, log) -> Path:
    fresh = _prepare(recipe, out, work, resume, force)
    t_run = time.time()
    try:
        ctx = make_context(recipe, work, log)
        run_stages(ctx, resume)
        bundle = finalize(ctx, out, force)
    except BaseException:
        done = list((work / "stages").glob("*.json")) if work.exists() else []
        if fresh and not done:
            shutil.rmtree(work, ignore_errors=True)
        elif work.exists():
            again = " ".join(["compress run", *([source] if source else []), *(f"--set {o}" for o in overrides),
                              f"--out {out}", "--resume"])
            log(f"the finished stages are kept in {work}; `{again}` continues")
        raise
    log(f"bundle written to {bundle} in {time.time() - t_run:.0f} s")
    return bundle
