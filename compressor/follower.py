"""The other ranks of a multi-process distillation (Lightning ddp, torchrun, SLURM): they join rank 0's
run for the distillation and leave everything else to it."""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

from .bundle import StageRecord
from .context import make_context
from .errors import UserError
from .recipe import Recipe
from .stages import NAMES, ORDER, distill


def follower_rank() -> int:
    """This process's global rank when a launcher started it to join another process's run: Lightning's
    plain ``ddp`` re-runs the command for each extra device (LOCAL_RANK), torchrun and SLURM start one
    per device (RANK), a multi-node job one per node (NODE_RANK). 0 for the process that leads."""
    env = os.environ
    if env.get("RANK", "").isdigit():
        return int(env["RANK"])
    local, node = env.get("LOCAL_RANK", "0"), env.get("NODE_RANK", "0")
    return max(int(local) if local.isdigit() else 0, int(node) if node.isdigit() else 0)


def follow(recipe: Recipe, work: Path, rank: int, log, wait_s: float = 24 * 3600) -> None:
    """A follower rank: wait for the leader's records of the stages before distillation, rebuild what
    they made (the searched or pruned student) from them, join the distillation, then leave
    everything else, the bundle included, to rank 0. It never creates, refuses or deletes the run
    directory, so --force and --resume on the re-run command line do no harm. Several nodes need the
    run directory on a disk they share."""
    before = NAMES[:NAMES.index("distill")]
    markers = [work / "stages" / f"{n}.json" for n in before]
    deadline = time.time() + wait_s
    while not all(m.is_file() for m in markers):
        if time.time() > deadline:
            raise UserError(f"rank {rank}: rank 0's records of {', '.join(before)} never appeared in {work}")
        time.sleep(1.0)
    ctx = make_context(recipe, work, log)
    for stage, marker in zip(ORDER, markers):
        rec = StageRecord.from_dict(json.loads(marker.read_text()))
        ctx.records[stage.name] = rec
        if not rec.skipped:
            stage.restore(ctx, rec)
    log(f"rank {rank}: joining the distillation of {work}; rank 0 writes the bundle")
    distill.train(ctx)
    return None
