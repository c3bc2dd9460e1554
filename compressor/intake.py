"""Model intake: any nn.Module is a teacher or a student.

A model's forward takes a tensor or a dict of tensors and returns one of:
- a tensor (logits, or an embedding for ``task: embedding``): taken as it is;
- a tuple or list whose first tensor is that output;
- a Hugging Face ``ModelOutput`` (a dict): ``logits`` for classification; for an embedding,
  ``embedding``/``sentence_embedding``, else ``pooler_output``, else the mean of ``last_hidden_state``.

A model of the last two kinds is *adapted in place*: its instance gets a ``forward`` that calls the
class's own and picks the output. The model object, its module paths (``encoder.layer.3``, as the user
wrote them in the recipe) and its state_dict stay the user's; ``copy.deepcopy`` rebinds the forward to
the copy, so pruned and searched students inherit it. Everything downstream (distillation, pruning,
FLOP counting, ONNX export and parity) then sees one tensor.
"""
from __future__ import annotations

import functools
import inspect
import types
from contextlib import contextmanager

import torch
from torch import nn

from .errors import UserError

ADAPTED = "_compressor_output"  # the attribute that marks an adapted model: "logits" or "embedding"
INPUTS = "_compressor_inputs"  # the data's input names (token inputs), in the order exports pass them


def first_tensor(out):
    """The first tensor in what a model or module returned (a tensor, a tuple, a list or a dict of them)."""
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, dict):
        out = list(out.values())
    if isinstance(out, (tuple, list)):
        for o in out:
            t = first_tensor(o)
            if t is not None:
                return t
    return None


def select_output(out, kind: str = "logits", attention_mask=None):
    """The one tensor a task needs from whatever the model returned (see the module docstring)."""
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, dict):  # transformers' ModelOutput is an OrderedDict of its non-None fields
        if kind == "logits" and out.get("logits") is not None:
            return out["logits"]
        if kind == "embedding":
            for key in ("embedding", "sentence_embedding", "pooler_output"):
                if out.get(key) is not None:
                    return out[key]
            h = out.get("last_hidden_state")
            if h is not None:
                if attention_mask is not None:
                    m = attention_mask.unsqueeze(-1).to(h.dtype)
                    return (h * m).sum(1) / m.sum(1).clamp_min(1)
                return h.mean(1)
    t = first_tensor(out)
    if t is None:
        raise UserError(f"the model returned {type(out).__name__} with no tensor in it; a model returns logits, "
                        "a tuple led by them, or a Hugging Face ModelOutput")
    return t


def _adapted_forward(self, *args, **kwargs):
    names = getattr(self, INPUTS, None)
    if args and names and len(args) <= len(names):
        # Exporters and tracers pass inputs by position, in the data's order; the class's forward may order
        # them otherwise (GPT-2: input_ids, past_key_values, attention_mask), so they go in by name.
        kwargs = {**dict(zip(names, args)), **kwargs}
        args = ()
    out = type(self).forward(self, *args, **kwargs)
    kind, mask = getattr(self, ADAPTED, "logits"), kwargs.get("attention_mask")
    if kind == "embedding" and mask is None and args:  # positional inputs of a model without the data's names
        try:
            mask = inspect.signature(type(self).forward).bind(self, *args, **kwargs).arguments.get("attention_mask")
        except TypeError:
            pass
    return select_output(out, kind, mask)


def adapt(model: nn.Module, kind: str = "logits") -> nn.Module:
    """Give ``model`` (in place) a forward that returns the one tensor ``kind`` names; returns it.

    The new forward shows the class's own signature (``functools.wraps``): NNCF binds the model's inputs to
    forward's parameter names and quantizes the ones it finds; behind ``(*args, **kwargs)`` it found none, and
    the first layer's input went unquantized (a model returning a dict failed the int8 file's Q/DQ check)."""
    if getattr(model, ADAPTED, None) != kind:
        setattr(model, ADAPTED, kind)

        @functools.wraps(type(model).forward)
        def forward(self, *args, **kwargs):
            return _adapted_forward(self, *args, **kwargs)

        model.forward = types.MethodType(forward, model)
    return model


def is_adapted(model: nn.Module) -> bool:
    return getattr(model, ADAPTED, None) is not None


@contextmanager
def unadapted(model: nn.Module):
    """A context in which ``model`` runs its class's own forward (Optimum's exporter reads ModelOutput names)."""
    fwd = model.__dict__.pop("forward", None)
    try:
        yield model
    finally:
        if fwd is not None:
            model.forward = fwd


def is_hf_model(model: nn.Module) -> bool:
    """A transformers PreTrainedModel (duck-typed, so transformers is never imported for the check)."""
    return hasattr(model, "config") and hasattr(model, "base_model_prefix") and callable(getattr(model, "save_pretrained", None))


def intake(model: nn.Module, out, task_output: str = "logits", names: tuple[str, ...] | None = None) -> nn.Module:
    """Adapt ``model`` when ``out`` (what it returned on a sample) is not a tensor. ``names``: the data's input
    names (a dict of tensors): an adapted model then takes positional inputs in that order by name."""
    if names:
        setattr(model, INPUTS, tuple(names))
    if isinstance(out, torch.Tensor) or is_adapted(model):
        return model
    select_output(out, task_output)  # a UserError now if nothing in it is a tensor
    return adapt(model, task_output)
