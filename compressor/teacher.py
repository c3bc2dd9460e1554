"""The teacher: built from the recipe, loaded from a checkpoint (weights only), or trained on first use
and cached (built-in demo teachers), then checked against the data."""
from __future__ import annotations

import hashlib
import inspect
import json
import os
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .data import DataSplits
from .errors import UserError
from .models import build_model, resolve_ref
from .precision import check_finite, resolve
from .schedule import adamw


def cache_dir() -> Path:
    return Path(os.environ.get("COMPRESSOR_CACHE", Path.home() / ".cache" / "compressor"))


def load_state(path: str | Path, what: str, allow_pickle: bool = False) -> dict:
    """A state_dict from ``path``; pickled objects are refused unless the user opted in."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{what} checkpoint {path} does not exist")
    try:
        state = torch.load(path, map_location="cpu", weights_only=not allow_pickle)
    except Exception as e:
        if "Unsupported global" in str(e) or "GLOBAL" in str(e):
            raise UserError(f"{what} checkpoint {path} holds pickled Python objects, not only weights: save "
                            "model.state_dict() instead (loading arbitrary pickles can run code)") from None
        raise UserError(f"{what} checkpoint {path} cannot be read: {type(e).__name__}: {str(e).splitlines()[0]}") from None
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if isinstance(state, nn.Module):
        state = state.state_dict()
    if not isinstance(state, dict):
        raise UserError(f"{what} checkpoint {path} is a {type(state).__name__}, not a state_dict")
    return state


@torch.no_grad()
def evaluate(model: nn.Module, loader) -> float:
    """Top-1 accuracy."""
    from .tasks import call

    model.eval()
    correct = total = 0
    for x, y in loader:
        correct += int((call(model, x).argmax(-1) == y).sum())
        total += int(y.numel())
    return correct / max(total, 1)


def train_supervised(model: nn.Module, data: DataSplits, spec, batch_size: int, seed: int,
                     log=print, precision: str = "32-true") -> nn.Module:
    """Plain cross-entropy training (AdamW, one-cycle schedule): how a demo teacher comes to be. ``precision``
    (a Lightning name): ``bf16-mixed`` runs the forward pass under bf16 autocast."""
    torch.manual_seed(seed)
    loader = data.loader("train", batch_size, shuffle=True, seed=seed)
    # Convolutions train in channels-last layout (oneDNN's own): 10% faster per batch under bf16 on an
    # AVX512-BF16 CPU, 20% in fp32; the weights go back to the default layout before they are saved.
    nhwc = any(isinstance(m, nn.Conv2d) for m in model.modules())
    if nhwc:
        model.to(memory_format=torch.channels_last)
    try:
        _epochs(model, loader, spec, precision, nhwc, log)
    finally:
        if nhwc:
            model.to(memory_format=torch.contiguous_format)
    check_finite(model, "the teacher", precision, "teacher.train.precision")
    return model.eval()


def _epochs(model: nn.Module, loader, spec, precision: str, nhwc: bool, log) -> None:
    from .precision import autocast
    from .tasks import call

    opt = adamw(model.parameters(), lr=spec.lr, weight_decay=spec.weight_decay)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=spec.lr, total_steps=spec.epochs * len(loader))
    for epoch in range(spec.epochs):
        model.train()
        t0, seen, loss_sum = time.time(), 0, 0.0
        for x, y in loader:
            if nhwc and isinstance(x, torch.Tensor) and x.dim() == 4:
                x = x.contiguous(memory_format=torch.channels_last)
            with autocast(precision):
                loss = F.cross_entropy(call(model, x), y, ignore_index=-1)  # -1: an unlabelled sample (few-label data)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            loss_sum += float(loss.detach()) * len(y)
            seen += len(y)
        log(f"teacher epoch {epoch + 1}/{spec.epochs}: loss {loss_sum / seen:.4f} ({time.time() - t0:.1f} s)")


def _architecture(model: nn.Module, factory=None) -> str:
    """The model's layers (its repr) and the source files of the function that built it and of every class
    in it that is not torch's own: a user who edits those files, a layer's width or only a forward, gets a
    teacher trained afresh instead of the weights cached for the old code. (A helper module the forward
    imports from elsewhere is not followed.)"""
    h = hashlib.sha256(repr(model).encode())
    files, fileless = set(), set()
    for obj in [factory, *{type(m) for m in model.modules()}]:
        if obj is None or obj.__module__.split(".")[0] == "torch":
            continue
        try:
            files.add(inspect.getsourcefile(obj))
        except (TypeError, OSError):  # defined outside a file (python -c, a notebook, exec)
            fileless.add(f"{obj.__module__}.{obj.__qualname__}")
    for f in sorted(f for f in files if f):
        h.update(Path(f).read_bytes() if Path(f).is_file() else f.encode())
    for name in sorted(fileless):
        h.update(name.encode())
    return h.hexdigest()[:16]


def _cache_key(recipe, model: nn.Module) -> str:
    t, d = recipe.teacher, recipe.data
    # The precision as resolved on this host: an AMX host's bf16 teacher is not an AVX2 host's fp32 one.
    train = {**t.train.model_dump(), "precision": resolve(t.train.precision, "cpu")[0]}
    key = {"model": t.model, "kwargs": t.kwargs, "train": train, "dataset": d.dataset,
           "data_kwargs": d.kwargs, "fractions": [d.val_fraction, d.test_fraction], "seed": recipe.seed,
           "architecture": _architecture(model, resolve_ref(t.model, "teacher") if ":" in t.model else None)}
    return hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:16]


def build_teacher(recipe, data: DataSplits) -> nn.Module:
    """The recipe's teacher model, untrained, with the data's shapes filled in where it takes them."""
    defaults = {"in_channels": data.input_shape[0], "num_classes": data.num_classes,
                "in_features": int(torch.Size(data.input_shape).numel())}
    return build_model(recipe.teacher.model, recipe.teacher.kwargs, defaults, what="teacher")


def teacher_cache_path(recipe, model: nn.Module) -> Path:
    """Where a teacher trained on first use is cached: keyed by the recipe's teacher, data, training and
    seed, the precision as resolved on this host, and the model's code (``_architecture``)."""
    return cache_dir() / "teachers" / f"{recipe.teacher.model.replace(':', '_')}-{_cache_key(recipe, model)}.pt"


def load_teacher(recipe, data: DataSplits, log=print) -> tuple[nn.Module, dict]:
    """The teacher in eval mode, and how it came to be (for the manifest)."""
    spec = recipe.teacher
    model = build_teacher(recipe, data)
    from .tasks import get_task

    task = get_task(recipe.task)
    check_fits(model.eval(), data, "teacher", task)  # before any training: adapts a tuple/ModelOutput forward
    origin = {"model": spec.model, "kwargs": spec.kwargs}
    if spec.checkpoint:
        _load_into(model, load_state(spec.checkpoint, "teacher"), f"teacher checkpoint {spec.checkpoint}")
        origin["checkpoint"] = spec.checkpoint
    elif spec.train is not None:
        path = teacher_cache_path(recipe, model)
        if path.is_file():
            _load_into(model, load_state(path, "cached teacher"), f"cached teacher {path}")
            origin["cached"] = str(path)
        else:
            log(f"training the teacher {spec.model} on {recipe.data.dataset} (first use; cached in {path})")
            t0 = time.time()
            prec, why = resolve(spec.train.precision, "cpu")  # the teacher trains on the CPU
            log(f"teacher: precision {prec} ({why})")
            train_supervised(model, data, spec.train, spec.train.batch_size, recipe.seed, log=log, precision=prec)
            origin["precision"] = prec
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(path.name + f".{os.getpid()}.tmp")
            torch.save(model.state_dict(), tmp)
            os.replace(tmp, path)
            origin.update(trained=spec.train.model_dump(), train_seconds=round(time.time() - t0, 1), cached=str(path))
    check_fits(model.eval(), data, "teacher", task)
    return model, origin


def _load_into(model: nn.Module, state: dict, what: str) -> None:
    """Load ``state`` into ``model``, or one line that fits on a screen: the counts, the first keys, and
    whether it looks like a wrapped model's checkpoint (every key under one prefix) or another architecture."""
    problem = mismatch(model.state_dict(), state)
    if problem:
        raise UserError(f"{what} does not fit the model: {problem}")
    model.load_state_dict(state)


def mismatch(want: dict, have: dict, shown: int = 3) -> str | None:
    """How a state_dict differs from a model's, in one line, with the fix where one is plain; None where
    it fits."""
    missing, unexpected = sorted(set(want) - set(have)), sorted(set(have) - set(want))
    shapes = sorted(k for k in set(want) & set(have) if tuple(want[k].shape) != tuple(have[k].shape))
    if not (missing or unexpected or shapes):
        return None

    def few(keys):
        return ", ".join(keys[:shown]) + (f" and {len(keys) - shown} more" if len(keys) > shown else "")

    parts = []
    if missing:
        parts.append(f"{len(missing)} of the model's {len(want)} keys missing ({few(missing)})")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected ({few(unexpected)})")
    if shapes:
        k = shapes[0]
        parts.append(f"{len(shapes)} of other shapes ({k}: {tuple(have[k].shape)} in the checkpoint, "
                     f"{tuple(want[k].shape)} in the model)")
    line = "; ".join(parts)
    for prefix in ("module.", "model.", "_orig_mod.", "student.", "teacher."):
        if have and all(k.startswith(prefix) for k in have) and {k[len(prefix):] for k in have} >= set(want):
            return (f"{line}: every key starts with {prefix!r}, a checkpoint of a wrapped model (DataParallel, "
                    f"a LightningModule, torch.compile): save model.{prefix.rstrip('.')}.state_dict() instead, or "
                    f"strip the prefix: {{k.removeprefix({prefix!r}): v for k, v in state.items()}}")
    if missing and not (set(want) & set(have)):
        return f"{line}: no key in common, a checkpoint of another architecture"
    return line + ": a checkpoint of another configuration or architecture; build the model it was saved from"


def check_fits(model: nn.Module, data: DataSplits, what: str, task=None) -> int:
    """Run two samples through the model: data of the wrong shape fails here, with the shapes named.

    Returns the model's output width (classes, or embedding dimensions)."""
    from .tasks import Classification, call, size

    x, _ = data.tensors("train", limit=2)
    from .intake import intake

    try:
        with torch.no_grad():
            y = call(model.eval(), x)
            names = tuple(x) if isinstance(x, dict) else None
            intake(model, y, (task or Classification()).output, names)
            if not isinstance(y, torch.Tensor):  # a tuple or a Hugging Face ModelOutput: take its logits
                y = call(model, x)
    except UserError:
        raise
    except Exception as e:
        shapes = {k: tuple(v.shape) for k, v in x.items()} if isinstance(x, dict) else tuple(x.shape)
        raise UserError(f"{what} cannot take the data: input of shape {shapes} raised "
                        f"{type(e).__name__}: {str(e).splitlines()[0][:200]}") from None
    return (task or Classification()).check_output(y, size(x), data, what)
