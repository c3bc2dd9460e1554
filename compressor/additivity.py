"""LAPTOP-Diff's premise, measured: removing several units costs about the sum of their single-unit
output losses, so a knapsack over single-unit scores picks the set to remove. benchmarks/prune_additivity.py
runs it on a recipe's teacher."""
from __future__ import annotations

import random

from scipy.stats import spearmanr
from torch import nn

from .errors import UserError
from .prune import Unit, find_units, score_units, set_loss
from .tasks import output


def additivity(model: nn.Module, batches, n_sets: int = 40, seed: int = 0, units: list[Unit] | None = None) -> dict:
    """LAPTOP-Diff's premise, measured: for random sets of 2..n-1 units, the rank correlation between
    the sum of single-unit losses and the measured loss of removing the set together."""
    units = units or score_units(model, find_units(model, batches[0]), batches, with_flops=False)
    if len(units) < 3:
        raise UserError(f"additivity needs at least 3 prunable units, {type(model).__name__} has {len(units)}")
    model.eval()
    refs = [output(model, b) for b in batches]
    rng = random.Random(seed)
    seen, rows = set(), []
    for _ in range(n_sets * 20):
        if len(rows) == n_sets:
            break
        k = rng.randint(2, len(units) - 1)
        s = tuple(sorted(rng.sample(range(len(units)), k)))
        if s in seen:
            continue
        seen.add(s)
        rows.append({"removed": [units[i].path for i in s], "predicted": sum(units[i].loss for i in s),
                     "measured": set_loss(model, [units[i].path for i in s], batches, refs)})
    return {"spearman": float(spearmanr([r["predicted"] for r in rows], [r["measured"] for r in rows]).statistic),
            "sets": len(rows), "units": [u.to_dict() for u in units], "rows": rows}
