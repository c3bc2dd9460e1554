"""Zero-cost proxies: score an untrained candidate without training it. Larger is better for every one.

Each proxy is ``fn(student, batch, teacher=None) -> float`` where ``batch`` is an (inputs, labels) pair
and the inputs are a tensor or a dict of tensors (Hugging Face: input_ids, attention_mask); PROXIES (in
compressor/search/__init__.py) maps names to them. A proxy that needs the teacher takes a ``TeacherView``,
computed once per search, so the teacher runs once and is never modified.

For ``task: embedding`` (a sentence encoder: no classifier, no logits) DisWOT keeps its relation term
alone, over the embeddings; NASWOT, params and FLOPs need no classifier either; synflow is refused
(``check_task``). ``FORMS`` says in words what each proxy computes for each task, for the stage record.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import UserError
from ..models import count_flops, count_params
from ..tasks import call, take


# --------------------------------------------------------------------------------------- helpers

def classifier(model: nn.Module) -> nn.Linear:
    """The final classifier: the last nn.Linear registered in the model (a timm/torchvision habit)."""
    last = None
    for m in model.modules():
        if isinstance(m, nn.Linear):
            last = m
    if last is None:
        raise UserError(f"{type(model).__name__} has no nn.Linear classifier, which DisWOT needs")
    return last


def _forward_with_features(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits and the features the classifier sees before pooling (``model.features`` when there is one,
    else the classifier's input), flattened to (batch, D)."""
    if hasattr(model, "features") and callable(model.features) and hasattr(model, "head"):
        feats = model.features(x)
        logits = model.head(torch.flatten(model.pool(feats), 1)) if hasattr(model, "pool") else model(x)
        return logits, feats.flatten(1)
    seen = {}
    h = classifier(model).register_forward_pre_hook(lambda m, args: seen.__setitem__("f", args[0]))
    try:
        logits = model(x)
    finally:
        h.remove()
    return logits, seen["f"].flatten(1)


def _gram(f: torch.Tensor) -> torch.Tensor:
    return F.normalize(f @ f.t(), dim=1)


# ----------------------------------------------------------------------------------------- DisWOT

@dataclass
class TeacherView:
    """What DisWOT needs from the teacher for one batch: classifier-weight gradient and feature Gram.
    ``grad`` is None for an embedding teacher: the relation term alone, over its embeddings."""

    grad: torch.Tensor | None  # (classes, channels); None: task embedding (no classifier)
    gram: torch.Tensor  # (batch, batch), row-normalised

    @classmethod
    def of(cls, teacher: nn.Module, batch, task: str = "classification") -> "TeacherView":
        x, y = batch
        if task == "embedding":
            return cls(None, _embedding_gram(teacher, x))
        # A copy in train mode (BatchNorm on batch statistics, as DisWOT does) so the real teacher's
        # running statistics and gradients stay untouched.
        t = copy.deepcopy(teacher).train()
        g, gram = _grad_and_gram(t, x, y)
        return cls(g, gram)


@torch.no_grad()
def _embedding_gram(model: nn.Module, x) -> torch.Tensor:
    """Row-normalised batch Gram of a sentence encoder's embeddings, centred over the batch first.

    Centred because sentence embeddings share one dominant direction, and an encoder at init far more
    so: the tiny test BERT's pairwise cosines are 0.977 +- 0.009, so every uncentred Gram is nearly the
    all-ones matrix and every candidate scored within 1e-5 of every other. Centring (as linear CKA
    does) compares how the batch is arranged around its mean. In eval mode: an encoder has no
    BatchNorm whose batch statistics DisWOT's train mode is for, and dropout would only add noise."""
    was = model.training
    model.eval()
    try:
        e = call(model, x).float().flatten(1)
    finally:
        model.train(was)
    return _gram(e - e.mean(0, keepdim=True))


def _grad_and_gram(model: nn.Module, x, y) -> tuple[torch.Tensor, torch.Tensor]:
    head = classifier(model)
    model.zero_grad(set_to_none=True)
    logits, feats = _forward_with_features(model, x)
    g, = torch.autograd.grad(F.cross_entropy(logits, y), head.weight)
    return g.detach(), _gram(feats.detach())


def semantic_distance(g_s: torch.Tensor, g_t: torch.Tensor, form: str = "auto") -> float:
    """DisWOT's semantic similarity, as a distance between classifier-weight gradients (K x C).

    "channel": per class k, g_k g_k^T (C x C) row-normalised; sum_k ||N_s - N_t||_F^2 / (K * C). Needs
    equal channel counts. "gram": the K x K Gram G G^T row-normalised; ||.||_F^2 / K^2, which works for
    any channel counts. "auto" takes "channel" when the counts match.
    """
    if form == "auto":
        form = "channel" if g_s.shape == g_t.shape else "gram"
    if form == "channel":
        if g_s.shape != g_t.shape:
            raise ValueError(f"channel form needs equal shapes, got {tuple(g_s.shape)} and {tuple(g_t.shape)}")
        k, c = g_s.shape
        n_s = F.normalize(g_s.unsqueeze(2) @ g_s.unsqueeze(1), dim=2)
        n_t = F.normalize(g_t.unsqueeze(2) @ g_t.unsqueeze(1), dim=2)
        return float(((n_s - n_t) ** 2).sum() / (k * c))
    k = g_s.shape[0]
    return float(((_gram(g_s) - _gram(g_t)) ** 2).sum() / (k * k))


def relation_distance(gram_s: torch.Tensor, gram_t: torch.Tensor) -> float:
    """||G_t - G_s||_F^2 / B^2 over row-normalised batch Gram matrices of the features."""
    b = gram_s.shape[0]
    return float(((gram_s - gram_t) ** 2).sum() / (b * b))


def diswot(student: nn.Module, batch, teacher: TeacherView | nn.Module, form: str = "gram") -> float:
    """-(semantic + relation) distance to the teacher. ``form`` "gram" by default so that candidates
    with and without the teacher's channel count are scored on one scale within a search. With an
    embedding teacher's view (no classifier gradient) it is -relation over the embeddings: the batch
    Gram of the student's embeddings against the teacher's, which compares any two widths."""
    if isinstance(teacher, nn.Module):
        teacher = TeacherView.of(teacher, batch)
    x, y = batch
    if teacher.grad is None:
        return -relation_distance(_embedding_gram(student, x), teacher.gram)
    was = student.training
    student.train()
    try:
        g_s, gram_s = _grad_and_gram(student, x, y)
    finally:
        student.train(was)
    return -(semantic_distance(g_s, teacher.grad, form) + relation_distance(gram_s, teacher.gram))


# ------------------------------------------------------------------------------------------ NASWOT

class _ActivationCodes(torch.overrides.TorchFunctionMode):
    """Collects which units a ReLU lets through, for each sample. A torch-function mode, not module
    hooks, so functional F.relu calls (as in our BasicBlock) are seen too."""

    RELUS = {F.relu, torch.relu, torch.relu_, F.relu_}

    def __init__(self):
        super().__init__()
        self.codes = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func in self.RELUS and isinstance(out, torch.Tensor):
            self.codes.append((out.detach() > 0).flatten(1).to(torch.float32))
        elif func is F.gelu and isinstance(args[0], torch.Tensor):
            self.codes.append((args[0].detach() > 0).flatten(1).to(torch.float32))
        return out


@torch.no_grad()
def naswot(student: nn.Module, batch, teacher=None) -> float:
    """log |det K|, K = sum over ReLU layers of c c^T + (1 - c)(1 - c)^T (Mellor et al. 2021): how
    differently the untrained network partitions the samples of one batch."""
    x, _ = batch
    was = student.training
    student.train()
    mode = _ActivationCodes()
    try:
        with mode:
            call(student, x)
    finally:
        student.train(was)
    if not mode.codes:
        return 0.0
    # sum_l c c^T + (1-c)(1-c)^T = 2 C C^T - r 1^T - 1 r^T + N over all layers' codes C (r: row sums,
    # N: units): one matmul instead of two per layer. float32 is exact for these integer counts < 2^24.
    c = torch.cat(mode.codes, dim=1)
    r = c.sum(1, keepdim=True)
    k = (2 * (c @ c.t()) - r - r.t() + c.shape[1]).to(torch.float64)
    return float(torch.linalg.slogdet(k)[1])


# ----------------------------------------------------------------------------------------- synflow

def _swap_batchnorm(model: nn.Module) -> list[tuple[nn.Module, str, nn.Module]]:
    swapped = []
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.modules.batchnorm._BatchNorm):
                setattr(parent, name, nn.Identity())
                swapped.append((parent, name, child))
    return swapped


def synflow(student: nn.Module, batch, teacher=None) -> float:
    """Synaptic flow (Tanaka et al. 2020): weights -> |weights| in float64, BatchNorm off, an input of
    ones, R = sum of outputs, score = sum |theta * dR/dtheta|. Data-free. The model is given back as it
    came: dtype, signs and BatchNorm layers restored. Token ids (a tensor or a dict) have no all-ones
    input: the first sample's are used. For task: embedding it is refused (check_task)."""
    x, _ = batch
    dtype = next(student.parameters()).dtype
    was = student.training
    swapped = _swap_batchnorm(student)
    signs = {}
    student.double()
    try:
        with torch.no_grad():
            for n, p in student.state_dict().items():
                if p.is_floating_point():
                    signs[n] = torch.sign(p)
                    p.abs_()
        student.eval()  # dropout off
        student.zero_grad(set_to_none=True)
        inp = torch.ones((1, *x.shape[1:]), dtype=torch.float64) \
            if isinstance(x, torch.Tensor) and x.is_floating_point() else take(x, 1)
        torch.sum(call(student, inp)).backward()
        score = sum(float((p.detach() * p.grad).abs().sum()) for p in student.parameters() if p.grad is not None)
    finally:
        with torch.no_grad():
            for n, p in student.state_dict().items():
                if n in signs:
                    p.mul_(signs[n])
        student.zero_grad(set_to_none=True)
        for parent, name, bn in swapped:
            setattr(parent, name, bn)
        student.to(dtype)
        student.train(was)
    return score


# ------------------------------------------------------------------------------------ size proxies

def params(student: nn.Module, batch, teacher=None) -> float:
    """Parameter count: the baseline few proxies beat consistently; always reported beside them."""
    return float(count_params(student))


def flops(student: nn.Module, batch, teacher=None) -> float:
    return float(count_flops(student, batch[0]))  # the search itself counts at the profiled length


# What each proxy computes, per task: the stage record says which form a search used.
FORMS = {
    "classification": {
        "diswot": "semantic (row-normalised K x K Gram of the classifier-weight gradients) + relation "
                  "(row-normalised batch Gram of the pre-pooling features)",
        "naswot": "log|det K| of ReLU/GELU activation codes",
        "synflow": "synaptic flow: |weights|, float64, all-ones input",
        "params": "parameter count",
        "flops": "forward FLOPs of one sample",
    },
    "embedding": {
        "diswot": "relation only: row-normalised batch Gram of the batch-centred embeddings, student "
                  "against teacher (no classifier, so no semantic term)",
        "naswot": "log|det K| of ReLU/GELU activation codes, every token of the batch",
        "params": "parameter count",
        "flops": "forward FLOPs of one sample of the proxy batch (the candidates' flops metric is at the "
                 "profiled sequence length)",
    },
}


def check_task(proxy: str, task: str) -> str:
    """The form ``proxy`` takes for ``task``; a UserError naming the alternatives when it has none."""
    forms = FORMS.get(task, FORMS["classification"])
    if not any(proxy in f for f in FORMS.values()):
        return "a proxy registered outside compressor: its own form"
    if proxy not in forms:
        why = {"synflow": "it feeds an all-ones input and sums the outputs, and token ids have no all-ones "
                          "input while an L2-normalised embedding's sum does not grow with the weights"}
        raise UserError(f"search.proxy {proxy!r} does not apply to task: {task} ({why.get(proxy, 'it needs class logits')}); "
                        f"use {', '.join(forms)}")
    return forms[proxy]


def conv_linear_flops(model: nn.Module, example: torch.Tensor) -> int:
    """FLOPs of one sample counted by forward hooks on Conv2d and Linear, as torch.utils.flop_counter
    counts them (2 per multiply-add, biases free). About 20x cheaper than the counter; only right for
    models whose arithmetic is all in those modules (our ResNet and MLP: tests check it), so the search
    uses it for them alone."""
    total = 0

    def conv(m, i, o):
        nonlocal total
        total += 2 * o.numel() * m.weight[0].numel()

    def linear(m, i, o):
        nonlocal total
        total += 2 * o.numel() * m.in_features

    hooks = [m.register_forward_hook(conv if isinstance(m, nn.Conv2d) else linear)
             for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    was = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(example[:1])
    finally:
        for h in hooks:
            h.remove()
        model.train(was)
    return total


def cost(build, example) -> tuple[int, int]:
    """(params, FLOPs) of the model ``build()`` makes, built on the meta device: shapes only, no
    weights and no arithmetic, so it is cheap enough to call for every candidate. ``example``: a
    tensor or a dict of tensors (token inputs). A model whose forward reads values (a Hugging Face
    encoder checks its attention mask with .item()) cannot run on meta: it is built on the CPU instead."""
    x = take(example, 1)
    try:
        with torch.device("meta"):
            model = build()
        meta = {k: v.to("meta") for k, v in x.items()} if isinstance(x, dict) else x.to("meta")
        return count_params(model), count_flops(model, meta)
    except (RuntimeError, NotImplementedError):
        model = build()
        return count_params(model), count_flops(model, x)
