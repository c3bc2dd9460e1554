"""The learning-rate schedules a distillation anneals by, shared by the distill stage's trainer and the search's
rungs (the final few must train as the student will)."""
from __future__ import annotations

import math


def cosine(t: float, total: float) -> float:
    """The cosine factor on the base rate at step or epoch ``t`` of ``total``: 1 at the start, 0 at the end."""
    return 0.5 * (1 + math.cos(math.pi * min(t, total) / total))
