"""How a training loop steps, shared by the distill stage's trainer, the search's rungs (the final few must train
as the student will) and the teacher's first training: the learning-rate schedule and the optimizer."""
from __future__ import annotations

import math
from collections import Counter
from contextlib import contextmanager

import torch

from .errors import UserError


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


# A token table this tall is mostly rows a batch does not use: it updates lazily (``lazy_rows``).
LAZY_ROWS = 1024


class LazyRowsAdamW(torch.optim.Optimizer):
    """AdamW on the dense weights and lazy Adam (torch's SparseAdam) on token tables whose gradients are sparse:
    a batch touches a few hundred of a table's rows, and only those rows' moments and weights are read and
    written. A MiniLM student's 11.7M-weight table (most of its weights) otherwise costs a pass over 47 MB for
    the gradient and four for the optimizer every step. Rows a batch does not use keep their moments and weights
    as they are (dense AdamW moves a row missing from this batch on its momentum and decays every row), and the
    tables take no weight decay.

    One optimizer to Lightning and to a learning-rate scheduler: its ``param_groups`` are the two inner
    optimizers' own group dicts, so a scheduler's rate reaches both."""

    def __init__(self, dense, tables, lr: float, weight_decay: float = 0.01):
        dense, tables = list(dense), list(tables)
        super().__init__(dense + tables, {"lr": lr})
        self.dense = adamw(dense, lr=lr, weight_decay=weight_decay) if dense else None
        self.tables = torch.optim.SparseAdam(tables, lr=lr)
        self._share_groups()

    def _share_groups(self):
        # the inner optimizers' own dicts (load_state_dict makes new ones: shared again after it)
        self.param_groups = (self.dense.param_groups if self.dense else []) + self.tables.param_groups

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        dense = [p for g in self.tables.param_groups for p in g["params"] if p.grad is not None and not p.grad.is_sparse]
        if dense:
            raise UserError(f"distill.lazy_embeddings: a token table ({tuple(dense[0].shape)}) got a dense gradient: "
                            "the model reads its weight outside its nn.Embedding (an output layer computed from it); "
                            "set distill.lazy_embeddings: false")
        if self.dense is not None:
            self.dense.step()
        self.tables.step()
        return loss

    def zero_grad(self, set_to_none: bool = True):
        if self.dense is not None:
            self.dense.zero_grad(set_to_none)
        self.tables.zero_grad(set_to_none)

    def state_dict(self):
        return {"dense": self.dense.state_dict() if self.dense else None, "tables": self.tables.state_dict()}

    def load_state_dict(self, state):
        if not (isinstance(state, dict) and "tables" in state):
            raise UserError("distill.lazy_embeddings: the checkpoint's optimizer updated the token tables densely and "
                            "this run would update them lazily (another device count or setting than the run that "
                            "saved it); run with --force, or as that run did")
        if self.dense is not None:
            self.dense.load_state_dict(state["dense"])
        self.tables.load_state_dict(state["tables"])
        self._share_groups()


@contextmanager
def lazy_rows(model: torch.nn.Module, on: bool = True):
    """Within the block, ``model``'s token tables (``nn.Embedding`` of at least LAZY_ROWS rows whose weight is
    trained and read by that table alone, not tied to an output layer) give sparse gradients; yields their
    weights, for LazyRowsAdamW. Restored on exit, so export and inference see the model as it was."""
    tables = []
    if on:
        uses = Counter(id(p) for _, p in model.named_parameters(remove_duplicate=False))
        tables = [m for m in model.modules() if isinstance(m, torch.nn.Embedding) and not m.sparse
                  and m.num_embeddings >= LAZY_ROWS and m.weight.requires_grad and uses[id(m.weight)] == 1]
    for m in tables:
        m.sparse = True
    try:
        yield [m.weight for m in tables]
    finally:
        for m in tables:
            m.sparse = False


def optimizer(params, lr: float, weight_decay: float = 0.01, tables=()) -> torch.optim.Optimizer:
    """``adamw`` over ``params``, or LazyRowsAdamW where some of them are ``tables`` (``lazy_rows``'s)."""
    params = list(params)
    ids = {id(t) for t in tables}
    lazy = [p for p in params if id(p) in ids]
    if not lazy:
        return adamw(params, lr=lr, weight_decay=weight_decay)
    return LazyRowsAdamW([p for p in params if id(p) not in ids], lazy, lr=lr, weight_decay=weight_decay)
