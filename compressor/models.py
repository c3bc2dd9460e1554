"""Built-in model builders, a plain registry (name -> function), in the manner of timm.

Builders take their configuration as keyword arguments; that dict is the student's genome, so a
student is rebuilt from the manifest alone. Builders that accept ``in_channels`` / ``num_classes`` get
them from the data when the recipe leaves them out.
"""
from __future__ import annotations

import importlib
import inspect

import torch
import torch.nn.functional as F
from torch import nn

from .errors import UserError
from .flops import count_flops  # noqa: F401  (the one counter, re-exported where callers found it)
from .hf import is_hf_dir  # noqa: F401  (callers find it here too)


class BasicBlock(nn.Module):
    """Two 3x3 convolutions with a residual connection (a 1x1 projection when the shape changes)."""

    def __init__(self, cin: int, cout: int, stride: int = 1, kernel: int = 3):
        super().__init__()
        pad = kernel // 2
        self.conv1 = nn.Conv2d(cin, cout, kernel, stride, pad, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, kernel, 1, pad, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Identity()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        y = F.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        return F.relu(y + self.shortcut(x))


class ResNet(nn.Module):
    """A CIFAR-style ResNet: a 3x3 stem, stages of BasicBlocks (stride 2 from the second stage), a linear head."""

    def __init__(self, widths=(32, 64, 128), depths=(2, 2, 2), kernel: int = 3, in_channels: int = 3,
                 num_classes: int = 10):
        super().__init__()
        widths, depths = list(widths), list(depths)
        if not widths or len(widths) != len(depths):
            raise ValueError(f"widths {widths} and depths {depths} must be non-empty and of equal length")
        if any(w < 1 for w in widths) or any(d < 1 for d in depths) or kernel % 2 == 0:
            raise ValueError("widths and depths must be positive and the kernel odd")
        self.stem = nn.Sequential(nn.Conv2d(in_channels, widths[0], kernel, 1, kernel // 2, bias=False),
                                  nn.BatchNorm2d(widths[0]), nn.ReLU(inplace=True))
        stages, cin = [], widths[0]
        for i, (w, d) in enumerate(zip(widths, depths)):
            blocks = [BasicBlock(cin, w, 1 if i == 0 else 2, kernel)]
            blocks += [BasicBlock(w, w, 1, kernel) for _ in range(d - 1)]
            stages.append(nn.Sequential(*blocks))
            cin = w
        self.stages = nn.Sequential(*stages)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Linear(cin, num_classes)

    def features(self, x):
        return self.stages(self.stem(x))

    def forward(self, x):
        return self.head(torch.flatten(self.pool(self.features(x)), 1))


class MLP(nn.Module):
    def __init__(self, hidden=(256, 128), in_features: int = 64, num_classes: int = 10, dropout: float = 0.0):
        super().__init__()
        layers, d = [nn.Flatten()], in_features
        for h in hidden:
            layers += [nn.Linear(d, h), nn.ReLU(inplace=True), nn.Dropout(dropout)]
            d = h
        self.body = nn.Sequential(*layers)
        self.head = nn.Linear(d, num_classes)

    def forward(self, x):
        return self.head(self.body(x))


def digits_resnet(in_channels: int = 1, num_classes: int = 10) -> nn.Module:
    """The quickstart teacher: 696k parameters, 210 MFLOPs at 32x32."""
    return ResNet(widths=(32, 64, 128), depths=(2, 2, 2), in_channels=in_channels, num_classes=num_classes)


def hf_encoder(**kwargs) -> nn.Module:
    """A Hugging Face encoder as a sentence encoder (compressor/hf.py; needs transformers)."""
    from .hf import hf_encoder as build

    return build(**kwargs)


def hf_classifier(**kwargs) -> nn.Module:
    """A Hugging Face image or sequence classifier, returning its logits (compressor/hf.py)."""
    from .hf import hf_classifier as build

    return build(**kwargs)


# name -> builder(**config) -> nn.Module
MODELS = {"resnet": ResNet, "digits-resnet": digits_resnet, "mlp": MLP, "hf-encoder": hf_encoder,
          "hf-classifier": hf_classifier}

HF_BUILDERS = ("hf-encoder", "hf-classifier")


def resolve_ref(ref: str, what: str):
    """Import ``module:function``. Only such explicit references ever run user code."""
    mod_name, _, attr = ref.partition(":")
    if not mod_name or not attr:
        raise UserError(f"{what} {ref!r}: expected a built-in name or 'module:function'")
    try:
        mod = importlib.import_module(mod_name)
    except ImportError as e:
        raise UserError(f"{what} {ref!r}: cannot import module {mod_name!r} ({e})") from None
    fn = mod
    for part in attr.split("."):
        fn = getattr(fn, part, None)
        if fn is None:
            raise UserError(f"{what} {ref!r}: module {mod_name!r} has no {attr!r}")
    if not callable(fn):
        raise UserError(f"{what} {ref!r}: {attr!r} is not callable")
    return fn


def build_model(name: str, config: dict, defaults: dict | None = None, what: str = "model") -> nn.Module:
    """Build a model from a registry name or ``module:function``; ``defaults`` fill accepted keywords."""
    if name not in MODELS and ":" not in name and is_hf_dir(name):
        from .hf import is_classifier

        config = {"path": name, **config}  # a local Hugging Face model directory
        name = "hf-classifier" if is_classifier(path=name) else "hf-encoder"
    fn = MODELS.get(name) if ":" not in name else resolve_ref(name, what)
    if fn is None:
        raise UserError(f"{what} {name!r} is not a built-in model ({', '.join(sorted(MODELS))}) "
                        "nor a 'module:function' reference")
    kwargs = dict(config)
    try:
        accepted = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        accepted = {}
    if fn in (hf_encoder, hf_classifier):
        from . import hf

        accepted = inspect.signature(getattr(hf, fn.__name__)).parameters
    for k, v in (defaults or {}).items():
        if k not in kwargs and k in accepted:
            kwargs[k] = v
    try:
        model = fn(**kwargs)
    except UserError:
        raise
    except Exception as e:
        raise UserError(f"{what} {name!r} does not build with {kwargs}: {type(e).__name__}: {e}") from None
    if not isinstance(model, nn.Module):
        raise UserError(f"{what} {name!r} returned {type(model).__name__}, not a torch.nn.Module")
    return model


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
