"""How a training loop steps, shared by the distill stage's trainer, the search's rungs (the final few must train
as the student will) and the teacher's first training: the learning-rate schedule and the optimizer."""
from __future__ import annotations

import math

import torch


def cosine(t: float, total: float) -> float:
    """The cosine factor on the base rate at step or epoch ``t`` of ``total``: 1 at the start, 0 at the end."""
    return 0.5 * (1 + math.cos(math.pi * min(t, total) / total))


FUSED_DEVICES = ("cpu", "cuda")
FUSED_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def adamw(params, lr: float, weight_decay: float = 0.01) -> torch.optim.AdamW:
    """AdamW with the fused kernel (one pass over every parameter) where the parameters' device has one, else
    torch's default. The same update, rounding aside; on a CPU the per-tensor loop costs far more: 55 ms against
    9 ms a step for a MiniLM student, whose 11.7M-weight token embedding dominates, a third of each step."""
    params = list(params)
    # torch checks the device only at the first step: decide here (CPU kernels since torch 2.4, CUDA before)
    fused = bool(params) and all(p.device.type in FUSED_DEVICES and p.dtype in FUSED_DTYPES for p in params)
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, **({"fused": True} if fused else {}))
