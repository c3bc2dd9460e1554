"""Channel importance: the output loss (Fisher by random projections), first-order Taylor of the labelled
cross-entropy, per-FLOP scaling, and the wrapper that names a group torch-pruning fails on."""
from __future__ import annotations

import torch
from torch import nn

from ..errors import first_line
from ..flops import no_fastpath
from .structure import _output, width_of

IMPORTANCE = ("output-loss", "taylor", "magnitude")


def fisher(model: nn.Module, batches, projections: int = 4, seed: int = 0) -> dict[str, torch.Tensor]:
    """diag(J^T J) per parameter (summed over samples, averaged over projections): E_r (d(r.y)/dw)^2."""
    gen = torch.Generator().manual_seed(seed)
    params = dict(model.named_parameters())
    req = {n: p.requires_grad for n, p in params.items()}
    acc = {n: torch.zeros_like(p) for n, p in params.items()}
    model.eval()
    try:
        for p in params.values():
            p.requires_grad_(True)
        for b in batches:
            with no_fastpath():
                y = _output(model, b)
            for k in range(projections):
                r = torch.randn(y.shape, generator=gen, dtype=y.dtype)
                grads = torch.autograd.grad((y * r).sum(), list(params.values()), retain_graph=k < projections - 1,
                                            allow_unused=True)
                for (n, _), g in zip(params.items(), grads):
                    if g is not None:
                        acc[n] += g.detach() ** 2
    finally:
        for n, p in params.items():
            p.requires_grad_(req[n])
    return {n: a / projections for n, a in acc.items()}


def ce_gradients(model: nn.Module, batches, labels) -> dict[str, torch.Tensor]:
    """Summed cross-entropy gradients on labelled batches (for first-order Taylor)."""
    import torch.nn.functional as F

    params = dict(model.named_parameters())
    acc = {n: torch.zeros_like(p) for n, p in params.items()}
    model.eval()
    for b, y in zip(batches, labels):
        with no_fastpath():
            loss = F.cross_entropy(_output(model, b), y, ignore_index=-1)
        grads = torch.autograd.grad(loss, list(params.values()), allow_unused=True)
        for (n, _), g in zip(params.items(), grads):
            if g is not None:
                acc[n] += g.detach()
    return acc


def _per_flop(base_cls):
    """An importance that divides each group's scores by the FLOPs one of its channels costs."""
    class PerFlop(base_cls):
        def __init__(self, module_flops: dict, paths: dict, **kw):
            super().__init__(**kw)
            self.module_flops, self.paths = module_flops, paths

        def __call__(self, group, **kw):
            imp = super().__call__(group, **kw)
            if imp is None:
                return None
            cost = 0.0
            for dep, _ in group:
                m = dep.target.module
                path = self.paths.get(m)
                if path is None or not isinstance(m, (nn.modules.conv._ConvNd, nn.Linear, nn.MultiheadAttention)):
                    continue
                n = width_of(m, "out") or getattr(m, "embed_dim", 1)
                if getattr(dep.handler, "__name__", "") == "prune_in_channels":
                    n = width_of(m, "in") or n
                cost += self.module_flops.get(path, 0) / max(int(n), 1)
            return imp / max(cost, 1.0)

    return PerFlop


def in_torch_pruning(filename: str) -> bool:
    """Whether a traceback frame's file is torch-pruning's own (its directory, not a path that names it)."""
    import os

    import torch_pruning

    return os.path.abspath(filename).startswith(os.path.dirname(os.path.abspath(torch_pruning.__file__)) + os.sep)


def _raised_in_torch_pruning(e: BaseException) -> bool:
    """Whether the innermost frame of ``e``'s traceback is torch-pruning's (its index mapping), not ours."""
    import traceback

    frames = traceback.extract_tb(e.__traceback__)
    return bool(frames) and in_torch_pruning(frames[-1].filename)


def _named(importance, model: nn.Module, keep: int = 0, heads=(), floors=None, skipped: dict | None = None):
    """``importance`` that leaves a group it fails on whole (None: torch-pruning skips it) and records it in
    ``skipped`` ({its modules: the error}): torch-pruning traces some couplings it cannot index (a fused qkv
    Linear cut by ``chunk``, a token-mixing Linear over a transposed axis, a grouped convolution with a channel
    multiplier), and the model's other groups can still be cut. With ``keep``,
    each group's ``keep`` most important channels score +inf. torch-pruning's global threshold has no
    per-group cap: a group whose every channel falls under it is skipped whole (measured on a ViT: an FFN
    cut to 16 of 256 neurons at one ratio came back to 256 at a higher one), so the cost stops falling.
    Groups holding an attention's ``heads`` layers are left as scored: their heads are ranked on their own,
    and +inf there made the heads' threshold infinite (every head went). ``floors`` ({module: n}): a group
    whose channels are that module's inputs keeps at least n of them, rounded up to ``keep`` (the classifier
    head's inputs: a 10-class head read 8 features, a rank-8 map to 10 logits, and kept 65% of the accuracy)."""
    names = {m: n for n, m in model.named_modules()}
    floors = floors or {}

    class Named(type(importance)):
        def __call__(self, group, **kw):
            try:
                imp = importance(group, **kw)
            except Exception as e:
                if not _raised_in_torch_pruning(e):  # our own scoring code: a bug to see, not a group to skip
                    raise
                mods = ", ".join(dict.fromkeys(said(dep.target.module) for dep, _ in group
                                               if dep.target.module in names))
                if skipped is not None:
                    skipped.setdefault(mods, first_line(e, 160))
                return None
            k = keep
            for dep, _ in group if keep else ():
                floor = floors.get(dep.target.module)
                if floor and getattr(dep.handler, "__name__", "") == "prune_in_channels":
                    k = max(k, -(-floor // keep) * keep)
            if k and imp is not None and len(imp) > k and not any(d.target.module in heads for d, _ in group):
                imp = imp.clone()
                imp[torch.topk(imp, k).indices] = float("inf")
            return imp

    def said(m):
        if isinstance(m, nn.modules.conv._ConvNd) and m.groups > 1:
            return f"{names[m]} ({type(m).__name__} {m.in_channels}->{m.out_channels} in {m.groups} groups)"
        return names[m]

    named = Named.__new__(Named)
    named.__dict__.update(importance.__dict__)
    return named
