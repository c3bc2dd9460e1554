"""Student search: spaces derived from the teacher, zero-cost proxies, and the searches that use them.

    spaces.py         Space (genes -> choices), detection of the teacher's family, genome -> student
    proxies.py        DisWOT, NASWOT, synflow, params, FLOPs: score an untrained candidate
    compressor_ga.py  the Compressor paper's size-budget GA and its closed-form cost model (a check)
    nsga.py           NSGA-II (Optuna) over proxy score and per-device latency, under the recipe's budgets
    latency.py        measured latency, or devices.predictor fitted on a few measured candidates

Registries are plain dicts; nothing heavy is imported here.
"""
from __future__ import annotations

from . import proxies as _p

# name -> fn(student, (x, y), teacher_view) -> float, larger is better
PROXIES = {
    "diswot": _p.diswot,
    "naswot": _p.naswot,
    "synflow": _p.synflow,
    "params": _p.params,
    "flops": _p.flops,
}

__all__ = ["PROXIES"]
