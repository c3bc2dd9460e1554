"""The search's picture: every candidate's score against its cost, the Pareto front and the chosen one."""
from __future__ import annotations

import os
from pathlib import Path


def plot_front(result, path: Path) -> Path:
    """Every candidate (score against its first cost objective), the feasible ones, the Pareto front
    and the chosen one. Agg backend: no display needed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .nsga import _objective_value

    obj = result.objectives[1]
    fig, ax = plt.subplots(figsize=(6.4, 4.4), dpi=120)
    for feasible, style in ((False, dict(c="0.75", s=12, label="over a budget")),
                            (True, dict(c="tab:blue", s=14, label="meets every budget"))):
        pts = [c for c in result.candidates if c.feasible == feasible]
        if pts:
            ax.scatter([_objective_value(c, obj) for c in pts], [c.metrics["score"] for c in pts], **style)
    if result.front:
        f = sorted(result.front, key=lambda c: _objective_value(c, obj))
        ax.plot([_objective_value(c, obj) for c in f], [c.metrics["score"] for c in f], "o-", c="tab:red",
                ms=4, label="Pareto front")
    if result.best:
        ax.scatter([_objective_value(result.best, obj)], [result.best.metrics["score"]], marker="*", s=180,
                   c="gold", edgecolors="k", zorder=5, label="chosen")
    label = result.candidates[0].metrics.get("latency_label", "") if result.candidates else ""
    ax.set_xlabel(f"{obj}{f' ({label})' if obj.startswith('latency') else ''}")
    ax.set_ylabel("proxy score (higher is better)")
    ax.set_title(f"student search: {len(result.candidates)} trials")
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    # A name the pipeline's stray-file sweep (".*.tmp") knows, and one per process: workers sharing an
    # output directory each write their own.
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fig.savefig(tmp, format="png")
    plt.close(fig)
    tmp.replace(path)
    return path
