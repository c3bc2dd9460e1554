"""What the NSGA-II search (nsga.py) returns: its candidates, their Pareto front (Optuna's own
non-domination), and, when no candidate meets every budget, which budget is the tightest."""
from __future__ import annotations

import math
from dataclasses import dataclass, field


@dataclass
class Candidate:
    family: str
    genome: dict
    key: str
    metrics: dict  # params, flops, size_mb, score, latency_ms {device: ms}, latency_label
    feasible: bool = True
    violations: dict = field(default_factory=dict)  # budget -> value over its limit
    origin: str | None = None  # set for a seeded candidate (e.g. "pruned teacher"); None when sampled

    def to_dict(self) -> dict:
        return {"family": self.family, "genome": self.genome, "key": self.key, "metrics": self.metrics,
                "feasible": self.feasible, "violations": self.violations,
                **({"origin": self.origin} if self.origin else {})}


@dataclass
class SearchResult:
    best: Candidate | None
    front: list[Candidate]
    candidates: list[Candidate]
    latency_models: dict
    objectives: list[str]
    storage: str
    study: str
    seconds: float
    scored: int  # candidates scored in this process (not taken from the study)
    added: int = 0  # trials this process completed and stored (several workers: each one's share)
    proxy: dict = field(default_factory=dict)  # name, task and the form it took (set by the search stage)

    def summary(self) -> dict:
        return {**({"proxy": self.proxy} if self.proxy else {}), "trials": len(self.candidates), "unique": len({c.key for c in self.candidates}),
                "feasible": sum(c.feasible for c in self.candidates), "objectives": self.objectives,
                "storage": self.storage, "study": self.study, "seconds": round(self.seconds, 2),
                "scored_here": self.scored, "added_here": self.added,
                "candidates_per_minute": round(60 * self.scored / self.seconds, 1) if self.seconds and self.scored else None}


def pareto(cands: list[Candidate], objectives: list[str]) -> list[Candidate]:
    """Non-dominated feasible candidates (score maximised, the rest minimised), by score.

    The first candidate of a genome stands for it (a seed keeps its origin); the front is Optuna's
    (``Study.best_trials`` of an in-memory study holding one trial per candidate), so it is the same
    non-domination NSGA-II ranks by. Candidates with equal objectives are all kept. A NaN objective
    (a proxy that blew up) counts as the worst value."""
    optuna = _optuna()

    pool: dict[str, Candidate] = {}
    for c in cands:
        if c.feasible:
            pool.setdefault(c.key, c)
    pool = list(pool.values())
    if not pool:
        return []
    directions = ["maximize"] + ["minimize"] * (len(objectives) - 1)
    study = optuna.create_study(directions=directions)
    study.add_trials([optuna.trial.create_trial(values=_values(c, objectives), user_attrs={"i": i})
                      for i, c in enumerate(pool)])
    front = sorted(t.user_attrs["i"] for t in study.best_trials)
    return sorted((pool[i] for i in front), key=lambda c: -_values(c, objectives)[0])


def _values(c: Candidate, objectives: list[str]) -> list[float]:
    score = float(c.metrics["score"])
    rest = [float(_objective_value(c, o)) for o in objectives[1:]]
    return [-math.inf if math.isnan(score) else score, *(math.inf if math.isnan(v) else v for v in rest)]


def _objective_value(c: Candidate, objective: str) -> float:
    if objective.startswith("latency_ms["):
        return c.metrics["latency_ms"][objective[len("latency_ms["):-1]]
    return c.metrics[objective]


def _optuna():
    from ..errors import UserError

    try:
        import optuna
    except ImportError:
        raise UserError("search needs optuna: pip install 'compressor[search]'") from None
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    return optuna


def candidates(trials, family: str, size_mb: float | None, latency_ms: dict) -> list[Candidate]:
    """The study's complete trials as Candidates, each marked feasible or with its budgets' overruns."""
    limits = {"size_mb": size_mb, **{f"latency_ms[{d}]": v for d, v in latency_ms.items()}}
    out = []
    for t in trials:
        if t.state.name != "COMPLETE" or "candidate" not in t.user_attrs:
            continue
        rec = t.user_attrs["candidate"]
        m = rec["metrics"]
        values = {"size_mb": m["size_mb"], **{f"latency_ms[{d}]": m["latency_ms"][d] for d in latency_ms}}
        over = {b: values[b] - lim for b, lim in limits.items() if lim is not None and values[b] > lim}
        out.append(Candidate(family, rec["genome"], rec["key"], m, not over, over, rec.get("origin")))
    return out


def tightest(result: SearchResult, size_mb: float | None, latency_ms: dict) -> str:
    """A one-line explanation of why no candidate met every budget, naming the tightest budget: the one
    whose best value over all candidates is furthest over its limit, relative to the limit."""
    limits = {"size_mb": size_mb, **{f"latency_ms[{d}]": v for d, v in latency_ms.items()}}
    worst, text = -1.0, ""
    for b, lim in limits.items():
        if lim is None or not result.candidates:
            continue
        vals = [c.metrics["size_mb"] if b == "size_mb" else c.metrics["latency_ms"][b[len("latency_ms["):-1]]
                for c in result.candidates]
        low = min(vals)
        ratio = low / lim
        if ratio > worst:
            label = "" if b == "size_mb" else f" ({result.candidates[0].metrics['latency_label']})"
            worst, text = ratio, f"{b} {lim:g} (the smallest among {len(vals)} candidates is {low:.4g}{label})"
    return (f"search: no candidate meets every budget; the tightest is {text}: relax it or widen the "
            "search space") if text else "search: no candidate was evaluated"
