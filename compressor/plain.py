"""Linear and convolution layers that compute their own weight, made the plain layers they compute.

NNCF puts its quantizers on what a plain nn.Linear or nn.Conv*d computes with: ``F.linear`` / ``F.conv*d`` on the
module's own ``weight``. A subclass with its own forward hides that: Falcon's Linear is ``x @ self.weight.T``
(NNCF quantized the weight but not the input), BiT's convolution standardises its weight first (NNCF saw no
constant weight), and the Q/DQ check refused both files. ``plain_layers`` replaces each such layer by the plain
one with the weight it uses (and a padding child it runs first, as BiT's ``pad``), where that computes the same
outputs on the example; the student then trains the plain weight (as a weight_norm's is folded).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from .surgery import first_inputs, set_module

_CONVS = {F.conv1d: nn.Conv1d, F.conv2d: nn.Conv2d, F.conv3d: nn.Conv3d}
_PLAIN = (nn.Linear.forward, nn.Conv1d.forward, nn.Conv2d.forward, nn.Conv3d.forward)


class _Calls(TorchFunctionMode):
    def __init__(self):
        super().__init__()
        self.convs = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in _CONVS:
            self.convs.append((func, args, kwargs or {}))
        return func(*args, **(kwargs or {}))


def _own_forward(m: nn.Module) -> bool:
    return isinstance(m, (nn.Linear, nn.modules.conv._ConvNd)) and type(m).forward not in _PLAIN


@torch.no_grad()
def plain_layers(model: nn.Module, example) -> list[str]:
    """Replace, in place, the Linear and convolution layers whose class computes its own forward by the plain
    layer with the weight they use, where it gives the same outputs on ``example``; return their paths."""
    layers = {p: m for p, m in model.named_modules() if _own_forward(m)}
    if not layers:
        return []
    was = model.training
    try:
        inputs = first_inputs(model.eval(), example, layers)
    finally:
        model.train(was)
    done = []
    for p, m in layers.items():
        x = inputs.get(p)
        try:  # a layer the probes do not fit (reshapes its input, casts it) stays as it is
            new = _plain(m, x) if isinstance(x, torch.Tensor) and x.is_floating_point() else None
        except Exception:
            new = None
        if new is not None:
            set_module(model, p, new.train(m.training))
            done.append(p)
    return done


def _same(m: nn.Module, new: nn.Module, x: torch.Tensor) -> bool:
    """The same outputs on the example's input, scaled and negated, and on random inputs of its shape and spread
    (a clamp or a ReLU inside a layer can agree with the plain layer on one input alone)."""
    gen = torch.Generator(device=x.device).manual_seed(0)
    noise = torch.randn(x.shape, generator=gen, device=x.device, dtype=x.dtype) * x.float().std().clamp_min(1e-3)
    for t in (x, -x, 1e3 * x, noise, 1e3 * noise):  # far outside the example's range too
        a, b = m(t), new(t)
        if a.shape != b.shape or not torch.allclose(a, b, rtol=1e-4, atol=1e-5 * (1 + float(a.abs().max()))):
            return False
    return True


def _plain(m: nn.Module, x: torch.Tensor) -> nn.Module | None:
    """The plain layer ``m`` computes on ``x`` (each candidate checked by ``_same``), or None."""
    w = m.weight
    if isinstance(m, nn.Linear):
        new = nn.Linear(m.in_features, m.out_features, bias=m.bias is not None, device=w.device, dtype=w.dtype)
        new.weight.copy_(w)  # most often it computes with its own weight after all
        if m.bias is not None:
            new.bias.copy_(m.bias)
        if _same(m, new, x):
            return new.requires_grad_(w.requires_grad)
        if m.in_features > 8192:  # the probe below holds in_features squared values
            return None
        # an affine map: its weight and bias read back from the unit vectors and zero
        b = m(torch.zeros(1, m.in_features, dtype=x.dtype, device=x.device))[0]
        eye = torch.eye(m.in_features, dtype=x.dtype, device=x.device)
        new = nn.Linear(m.in_features, m.out_features, bias=m.bias is not None or bool(b.any()), device=w.device,
                        dtype=w.dtype)
        new.weight.copy_((m(eye) - b).T)
        if new.bias is not None:
            new.bias.copy_(b)
        return new.requires_grad_(w.requires_grad) if _same(m, new, x) else None
    calls, ran = _Calls(), []
    hooks = [c.register_forward_hook(lambda c, a, o: ran.append((c, a[0], o))) for c in m.children()]
    try:
        with calls:
            m(x)
    finally:
        for h in hooks:
            h.remove()
    if len(calls.convs) != 1:
        return None
    func, args, kw = calls.convs[0]
    names = ("input", "weight", "bias", "stride", "padding", "dilation", "groups")
    a = {**dict(zip(names, args)), **kw}
    pre = [c for c, i, o in ran if i is x and o is a["input"]]  # a child run first: BiT's pad
    if a["input"] is not x and not pre:
        return None
    weight, bias = a["weight"], a.get("bias")
    conv = _CONVS[func](weight.shape[1] * a.get("groups", 1), weight.shape[0], tuple(weight.shape[2:]),
                        stride=a.get("stride", 1), padding=a.get("padding", 0), dilation=a.get("dilation", 1),
                        groups=a.get("groups", 1), bias=bias is not None, device=w.device, dtype=w.dtype)
    conv.weight.copy_(weight)
    if bias is not None:
        conv.bias.copy_(bias)
    conv.requires_grad_(w.requires_grad)
    new = nn.Sequential(pre[0], conv) if pre else conv
    return new if _same(m, new, x) else None
