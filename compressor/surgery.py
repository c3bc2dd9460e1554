"""Module surgery that pruning builds on: modules got, set and swapped by path, Linears sliced, squared output
gradients by random projection, and the residual stream found and cut.

The residual stream (compressor/width.py's ``hidden``, Minitron's embedding-channel pruning) is found from a
forward pass: its width H is the LayerNorms' most common width; readers are the Linears fed a LayerNorm's output (or a
slice of it, or the sum of the token tables' outputs: a post-LN model's first layer), writers the Linears whose
output is added to an earlier stream tensor (post-LN's ``LayerNorm(x + f(x))``, pre-LN's ``x + f(norm(x))``) or is
the stream itself (a stem), and the token tables are the Embeddings of width H. Permuting the H channels of all of
them together must give the same output (or the same output permuted, when the output is the stream itself: a
sentence embedding); a stream that fails is not cut. What the trace cannot see joins where the check then passes:
Linears of width H reading a pooled stream, convolutions of H output channels and bare parameters along H (a ViT's
patch convolution, class token and position table). nn.MultiheadAttention is split into Linears first
(compressor.width). Channels are scored by width.py's linearised output loss, with the mask on every LayerNorm's
output. Cutting them is not exact (each LayerNorm then normalises over fewer channels) and a sentence encoder's
embedding becomes narrower: distillation recovers the first, the cosine loss's projection and the relation metrics
handle the second.
"""
from __future__ import annotations

import copy
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn

from .errors import UserError
from .flops import count_flops as flops
from .tasks import call, output, take


def get_module(model: nn.Module, path: str) -> nn.Module:
    return model.get_submodule(path) if path else model


def _get_any(model: nn.Module, path: str):
    """The module, or else the parameter, at ``path`` (a stream's bare position table)."""
    try:
        return get_module(model, path)
    except AttributeError:
        return model.get_parameter(path)


def set_module(model: nn.Module, path: str, module: nn.Module) -> None:
    parent, _, child = path.rpartition(".")
    setattr(get_module(model, parent), child, module)


@contextmanager
def swapped(model: nn.Module, modules: dict):
    """``model`` with the modules at the given paths replaced while the block runs."""
    old = {p: _get_any(model, p) for p in modules}
    for p, m in modules.items():
        set_module(model, p, m)
    try:
        yield model
    finally:
        for p, m in old.items():
            set_module(model, p, m)


@contextmanager
def gated(model: nn.Module, gates: dict):
    """Multiply each gate Linear's input by its mask (a tensor over its input channels)."""
    handles = [get_module(model, p).register_forward_pre_hook(
        lambda _m, args, mask=mask: (args[0] * mask, *args[1:])) for p, mask in gates.items()]
    try:
        yield model
    finally:
        for h in handles:
            h.remove()


@torch.no_grad()
def first_inputs(model: nn.Module, example, paths) -> dict:
    """The first positional input each module at ``paths`` is called with on ``example`` (None where it takes
    none); a module that does not run is missing."""
    seen, handles = {}, []

    def keep(p, args):
        seen.setdefault(p, args[0] if args else None)

    for p in paths:
        handles.append(get_module(model, p).register_forward_pre_hook(lambda _m, a, p=p: keep(p, a)))
    try:
        call(model, example)
    finally:
        for h in handles:
            h.remove()
    return seen


def is_conv1d(m: nn.Module) -> bool:
    """Hugging Face's ``Conv1D`` (GPT-2): a Linear whose weight is stored transposed, (in, out)."""
    return type(m).__name__ == "Conv1D" and hasattr(m, "nf") and getattr(m, "weight", None) is not None


def features(m: nn.Module) -> tuple[int, int] | None:
    """(input, output) features of a Linear or a Conv1D; None for any other module."""
    if isinstance(m, nn.Linear):
        return m.in_features, m.out_features
    return tuple(m.weight.shape) if is_conv1d(m) else None


def sliced_linear(lin: nn.Module, *, rows=None, cols=None) -> nn.Linear:
    """A copy of ``lin`` (a Linear or a Conv1D, which becomes the Linear it equals) keeping only the given
    output rows and/or input columns."""
    w = lin.weight.detach().T if is_conv1d(lin) else lin.weight.detach()
    if rows is not None:
        w = w[rows]
    if cols is not None:
        w = w[:, cols]
    out = nn.Linear(w.shape[1], w.shape[0], bias=lin.bias is not None).to(device=w.device, dtype=w.dtype)
    out.weight.data.copy_(w)
    if lin.bias is not None:
        out.bias.data.copy_(lin.bias.detach() if rows is None else lin.bias.detach()[rows])
    return out


def projected_grads(model: nn.Module, batches, masks: dict, acc: dict, projections: int, gen) -> int:
    """Add to ``acc[k]`` the squared gradients of (y . r) with respect to ``masks[k]``, for ``projections`` random
    r ~ N(0, I) per batch (their sum has the per-sample ||dy/dm||^2 as its expectation); returns the samples seen."""
    samples = 0
    for b in batches:
        y = output(model, b)
        samples += len(y)
        for k in range(projections):
            r = torch.randn(y.shape, generator=gen, dtype=y.dtype).to(y.device)
            grads = torch.autograd.grad((y * r).sum(), list(masks.values()), retain_graph=k < projections - 1)
            for key, gr in zip(masks, grads):
                acc[key] += gr.detach().float() ** 2
    return samples


# --------------------------------------------------------------------------------- the residual stream

@dataclass
class Stream:
    width: int  # H
    embeddings: list[str]  # nn.Embedding of width H (columns go)
    norms: list[str]  # LayerNorm over H (entries go)
    readers: list[str]  # Linear fed the stream (input columns go)
    writers: list[str]  # Linear adding to the stream (output rows go)
    scores: list = field(default_factory=list)  # s_j per channel
    stems: list[str] = field(default_factory=list)  # convolutions writing its first tensor (output channels go)
    params: list[str] = field(default_factory=list)  # bare parameters along it (class token, position table: last axis)

    def members(self) -> dict:
        return {"embeddings": self.embeddings, "norms": self.norms, "readers": self.readers, "writers": self.writers,
                **({"stems": self.stems} if self.stems else {}), **({"params": self.params} if self.params else {})}


@torch.no_grad()
def find_stream(model: nn.Module, example, tol: float | None = None) -> Stream | None:
    """The model's residual stream, checked by permuting its channels and by running with a subset of them
    (module docstring); None if there is none that passes. Two samples of ``example`` are used."""
    was = model.training
    model.eval()
    example = take(example, 2)
    if tol is None:  # matches within the rounding of the model's precision
        dtype = next((q.dtype for q in model.parameters() if q.is_floating_point()), torch.float32)
        tol = 1e-4 if dtype in (torch.float32, torch.float64) else 3e-2
    try:
        norms = {p: m for p, m in model.named_modules() if isinstance(m, nn.LayerNorm)
                 and len(m.normalized_shape) == 1 and m.elementwise_affine}
        if not norms:
            return None
        h = Counter(m.normalized_shape[0] for m in norms.values()).most_common(1)[0][0]
        calls, handles = [], []  # (kind, path, input, output) in call order
        for path, m in model.named_modules():
            kind = ("norm" if path in norms and m.normalized_shape[0] == h else
                    "embedding" if isinstance(m, nn.Embedding) and m.embedding_dim == h else
                    "linear" if isinstance(m, nn.Linear) and h in (m.in_features, m.out_features) else None)
            if kind:
                handles.append(m.register_forward_hook(
                    lambda _m, a, o, kind=kind, path=path: calls.append((kind, path, a[0] if a else None, o))))
        try:
            ref = output(model, example)
        finally:
            for hd in handles:
                hd.remove()
        stream, ptrs = [], set()  # the stream's tensors so far
        emb, nrm, readers, writers = [], [], [], []
        pending = []  # outputs of width H not yet seen added to the stream: (path, output)

        def joins(x, itself: bool = False) -> bool:
            """Whether ``x`` is a pending output added to a recent stream tensor (or, ``itself``, for a LayerNorm's
            input: the pending output alone, a stem), marking the writers; then ``x`` belongs to the stream."""
            recent = [st for st in stream[-6:] if st.shape == x.shape]
            hit = []
            for w, wo in pending:
                if wo.shape != x.shape:
                    continue
                rest = x - wo
                if (itself and torch.allclose(x, wo, atol=tol, rtol=tol)) or any(
                        torch.allclose(rest, st, atol=tol, rtol=tol) for st in recent):
                    hit.append((w, wo))
            writers.extend(w for w, _ in hit)
            pending[:] = [pw for pw in pending if all(pw is not hw for hw in hit)]
            return bool(hit)

        tables = []  # the token and position tables' outputs so far

        def tabled(x) -> bool:
            """Whether ``x`` is the sum of the tables' outputs (broadcast): a post-LN model's first attention reads
            it unnormalised, so the stream starts there, not at a LayerNorm."""
            if not tables:
                return False
            try:
                total = sum(tables[1:], tables[0])
            except RuntimeError:
                return False
            return total.shape == x.shape and torch.allclose(total, x, atol=tol, rtol=tol)

        def add(*ts):
            stream.extend(ts)
            ptrs.update(t.data_ptr() for t in ts)

        for kind, path, x, o in calls:
            if kind == "embedding":
                emb.append(path)
                tables.append(o)
            elif kind == "norm":
                if x.data_ptr() not in ptrs:
                    joins(x, itself=True)
                add(x, o)
                nrm.append(path)
            else:
                lin = get_module(model, path)
                if lin.in_features == h and x is not None and (x.data_ptr() in ptrs or joins(x) or tabled(x)):
                    readers.append(path)
                    add(x)
                if lin.out_features == h:
                    pending.append((path, o))
        s = Stream(h, *(list(dict.fromkeys(v)) for v in (emb, nrm, readers, writers)))
        if not s.norms or not (s.readers and s.writers):
            return None
        perm = torch.randperm(h, generator=torch.Generator().manual_seed(0))
        scale = tol * (1 + float(ref.abs().max()))

        def permutes(s: Stream) -> tuple[bool, bool]:
            """(the output unchanged, the output permuted) with the stream's channels permuted."""
            try:
                with swapped(model, _stream_swap(model, s, perm)):
                    got = output(model, example)
            except (RuntimeError, ValueError, IndexError):
                return False, False
            return (got.shape == ref.shape and float((got - ref).abs().max()) <= scale,
                    ref.shape[-1] == h and got.shape == ref.shape and float((got - ref[..., perm]).abs().max()) <= scale)

        same, permuted = permutes(s)
        if not (same or permuted):
            # What the trace cannot see joins where the permutation check then passes: a reader of a pooled stream (a
            # head on ``norm(h).mean(1)``: the mean is a new tensor), then what writes the first stream tensor through
            # other ops (a ViT's patch convolution, flattened, a class token concatenated, a position table added).
            more = [p for kind, p, x, _ in calls if kind == "linear" and p not in s.readers + s.writers
                    and x is not None and get_module(model, p).in_features == h]
            known = (nn.LayerNorm, nn.Linear, nn.Embedding, nn.modules.conv._ConvNd)
            stems = [p for p, m in model.named_modules()
                     if isinstance(m, nn.modules.conv._ConvNd) and m.out_channels == h and m.groups == 1]
            params = [f"{p}.{n}" if p else n for p, m in model.named_modules() if not isinstance(m, known)
                      for n, q in m.named_parameters(recurse=False) if q.dim() >= 1 and q.shape[-1] == h]
            for extra in ((more, [], []), (more, stems, params)):
                if same or permuted or not any(extra):
                    continue
                s = Stream(h, s.embeddings, s.norms, list(dict.fromkeys(s.readers + extra[0])), s.writers,
                           stems=extra[1], params=extra[2])
                same, permuted = permutes(s)
        if not (same or permuted):
            return None
        # A permutation keeps the width; a cut must also run (a width written into the code, a zero-filled slot of
        # width H concatenated in, would pass the first check and fail here).
        keep = sorted(perm[:h - max(1, h // 4)].tolist())
        try:
            with swapped(model, _stream_swap(model, s, keep)):
                cut = output(model, example)
        except (RuntimeError, ValueError, IndexError):
            return None
        return s if cut.shape == (ref.shape if same else (*ref.shape[:-1], len(keep))) else None
    finally:
        model.train(was)


def _stream_swap(model: nn.Module, s: Stream, keep) -> dict:
    """Copies of the stream's modules keeping channels ``keep`` (in that order: a permutation or a subset)."""
    keep = torch.as_tensor(keep, dtype=torch.long)
    swap = {}
    for p in s.embeddings:
        e = copy.deepcopy(get_module(model, p))
        e.weight = nn.Parameter(e.weight.detach()[:, keep].clone())
        e.embedding_dim = len(keep)
        swap[p] = e
    for p in s.norms:
        n = copy.deepcopy(get_module(model, p))
        n.weight = nn.Parameter(n.weight.detach()[keep].clone())
        if n.bias is not None:
            n.bias = nn.Parameter(n.bias.detach()[keep].clone())
        n.normalized_shape = (len(keep),)
        swap[p] = n
    for p in dict.fromkeys(s.readers + s.writers):
        swap[p] = sliced_linear(get_module(model, p), rows=keep if p in s.writers else None,
                                cols=keep if p in s.readers else None)
    for p in s.stems:
        c = copy.deepcopy(get_module(model, p))
        c.weight = nn.Parameter(c.weight.detach()[keep].clone())
        if c.bias is not None:
            c.bias = nn.Parameter(c.bias.detach()[keep].clone())
        c.out_channels = len(keep)
        swap[p] = c
    for p in s.params:
        swap[p] = nn.Parameter(model.get_parameter(p).detach()[..., keep].clone())
    # Weights tied in the model (a token table shared with an output head) stay one Parameter when sliced alike.
    tied: dict[tuple, nn.Parameter] = {}
    for p, new in swap.items():
        if isinstance(new, nn.Parameter):  # a bare parameter ties to nothing here
            continue
        old = get_module(model, p)
        for name in ("weight", "bias"):
            w_old, w_new = getattr(old, name, None), getattr(new, name, None)
            if isinstance(w_old, nn.Parameter) and isinstance(w_new, nn.Parameter):
                k = (id(w_old), tuple(w_new.shape))
                if k in tied and torch.equal(tied[k], w_new):
                    setattr(new, name, tied[k])
                else:
                    tied.setdefault(k, w_new)
    return swap


def score_stream(model: nn.Module, s: Stream, batches, projections: int = 4, seed: int = 0) -> Stream:
    """Fill ``s.scores``: s_j = E ||dy/dm_j||^2 per sample, the mask m on every stream LayerNorm's output."""
    was = model.training
    req = [p.requires_grad for p in model.parameters()]
    model.eval().requires_grad_(False)
    gen = torch.Generator().manual_seed(seed)
    dev = next((q.device for q in model.parameters()), torch.device("cpu"))
    mask = torch.ones(s.width, requires_grad=True, device=dev)
    acc = torch.zeros(s.width, device=dev)
    handles = []
    try:
        handles = [get_module(model, p).register_forward_hook(lambda _m, _a, o: o * mask.to(o.dtype)) for p in s.norms]
        samples = projected_grads(model, batches, {"stream": mask}, {"stream": acc}, projections, gen)
    finally:
        for hd in handles:
            hd.remove()
        for p, r in zip(model.parameters(), req):
            p.requires_grad_(r)
        model.train(was)
    s.scores = (acc / (projections * samples)).cpu().tolist()
    return s


def cut_stream(model: nn.Module, plan: dict) -> nn.Module:
    """Cut the residual stream to ``plan['keep']`` in place (``plan``: a Stream's members and the kept channels)."""
    s = Stream(plan["width"], plan["embeddings"], plan["norms"], plan["readers"], plan["writers"],
               stems=plan.get("stems", []), params=plan.get("params", []))
    for p, m in _stream_swap(model, s, plan["keep"]).items():
        set_module(model, p, m)
    return model


def cut_hidden(model: nn.Module, batches, hidden: float, multiple: int, projections: int, before: float, log):
    """prune.width.hidden: (a copy of ``model`` with ``hidden`` of its residual stream's channels cut, the stream's
    plan, record); ``before``: the model's FLOPs on ``batches[0]``."""
    s = find_stream(model, batches[0])
    if s is None:
        raise UserError(f"prune.width.hidden: {type(model).__name__} has no residual stream whose channels permute "
                        "exactly (LayerNorms, the Linears that read and write them, token Embeddings, a patch "
                        "convolution and bare tables along it, all permuted together); drop prune.width.hidden")
    score_stream(model, s, batches, projections=projections)
    step = multiple if s.width > multiple else 1
    kept = max(step, int(round((1 - hidden) * s.width / step)) * step)  # a multiple of the block, as FFN widths
    cut = s.width - kept
    if cut <= 0:
        raise UserError(f"prune.width.hidden: {hidden} of {s.width} channels leaves no block of {step} to cut")
    keep = sorted(sorted(range(s.width), key=lambda j: -s.scores[j])[:kept])
    plan = {"width": s.width, "keep": keep, **s.members()}
    cut_model = cut_stream(copy.deepcopy(model), plan)
    after = flops(cut_model, batches[0])
    kept_set = set(keep)
    more = (f", {len(s.stems)} convolution stems" if s.stems else "") + (f", {len(s.params)} bare parameters"
                                                                          if s.params else "")
    log(f"prune.width: residual stream {s.width} -> {len(keep)} channels ({len(s.norms)} LayerNorms, "
        f"{len(s.readers)} readers, {len(s.writers)} writers, {len(s.embeddings)} embeddings{more}); FLOPs "
        f"{before / 1e6:.4g} -> {after / 1e6:.4g} M per sample; linearised output loss "
        f"{sum(s.scores[j] for j in range(s.width) if j not in kept_set):.4g}")
    info = {"width": s.width, "kept": len(keep), "flops_before": before, "flops_after": after,
            **{k: len(v) for k, v in s.members().items()}}
    return cut_model, plan, info
