"""Capture intermediate outputs by module path with forward hooks (as torchdistill addresses layers).

    with capture(model, ["stages.0", "stages.1.0"]) as feats:
        model(x)
    feats["stages.0"]  # that module's output (the first tensor, when the module returns a tuple)

Hooks live only inside the ``with`` block, so a model never leaves distillation carrying hooks (an
exported student must not store tensors on every call).
"""
from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import nn

from ..errors import UserError
from ..intake import first_tensor  # noqa: F401  (re-exported: the tensor a hooked module produced)


def _walk(model: nn.Module, path: str) -> nn.Module:
    """``model.get_submodule(path)``, where a negative index counts from the end of a ModuleList or Sequential
    (``encoder.layer.-1``: the last layer, however many a pruned or searched student kept)."""
    m = model
    for part in path.split(".") if path else []:
        if part.startswith("-") and part[1:].isdigit() and isinstance(m, (nn.ModuleList, nn.Sequential)):
            if int(part) < -len(m):
                raise AttributeError(part)
            m = m[int(part)]
        else:
            m = m.get_submodule(part)
    return m


def resolve(model: nn.Module, path: str, role: str) -> nn.Module:
    """The submodule at ``path`` (a negative index counts from the end of a list of layers), or a UserError
    naming it and what exists at that level."""
    try:
        return _walk(model, path)
    except AttributeError:
        parent, _, _ = path.rpartition(".")
        try:
            names = [n for n, _ in _walk(model, parent).named_children()]
        except AttributeError:
            names = [n for n, _ in model.named_children()]
            parent = ""
        where = f"{parent}'s children" if parent else "its top-level modules"
        raise UserError(f"the {role} has no module {path!r} ({where}: {', '.join(names) or 'none'}); "
                        "name layers by their path in model.named_modules()") from None


def check_paths(model: nn.Module, paths, role: str) -> None:
    for p in paths:
        resolve(model, p, role)


@contextmanager
def capture(model: nn.Module, paths, role: str = "model"):
    """Yield a dict that fills with {path: output} while the block runs; the hooks go when it ends."""
    feats: dict[str, torch.Tensor] = {}
    handles = []

    def hook_for(path):
        def hook(module, args, out):
            t = first_tensor(out)
            if t is None:
                raise UserError(f"the {role}'s module {path!r} returned {type(out).__name__}, no tensor to distil")
            feats[path] = t
        return hook

    try:
        for p in dict.fromkeys(paths):  # each module once, even when several terms name it
            handles.append(resolve(model, p, role).register_forward_hook(hook_for(p)))
        yield feats
    finally:
        for h in handles:
            h.remove()
