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
        given = dict(zip(names, args))
        twice = given.keys() & kwargs.keys()
        if twice:
            raise TypeError(f"{type(self).__name__}.forward got multiple values for {', '.join(sorted(twice))}")
        kwargs = {**given, **kwargs}
        args = ()
    out = type(self).forward(self, *args, **kwargs)
    kind, mask = getattr(self, ADAPTED, "logits"), kwargs.get("attention_mask")
    if kind == "embedding" and mask is None and args:  # positional inputs of a model without the data's names
        try:
            mask = inspect.signature(type(self).forward).bind(self, *args, **kwargs).arguments.get("attention_mask")
        except TypeError:
            pass
    return select_output(out, kind, mask)


def _signature(model: nn.Module) -> inspect.Signature:
    """What the adapted forward shows: the data's input names where known (exporters pass inputs by position
    in that order, and TorchScript's exporter pads them with every defaulted parameter it sees), else the
    class's own (NNCF binds the model's inputs to these names and quantizes those it finds)."""
    names = getattr(model, INPUTS, None)
    if not names:
        return inspect.signature(type(model).forward)
    P = inspect.Parameter
    return inspect.Signature([P("self", P.POSITIONAL_OR_KEYWORD), *(P(n, P.POSITIONAL_OR_KEYWORD) for n in names),
                              P("kwargs", P.VAR_KEYWORD)])


def adapt(model: nn.Module, kind: str = "logits", names: tuple[str, ...] | None = None) -> nn.Module:
    """Give ``model`` (in place) a forward that returns the one tensor ``kind`` names; returns it. ``names``:
    the data's input names, which positional inputs go in by.

    The new forward shows a signature (``_signature``), not ``(*args, **kwargs)``: behind that NNCF found no
    input to quantize (a model returning a dict failed the int8 file's Q/DQ check)."""
    if names:
        setattr(model, INPUTS, tuple(names))
    if getattr(model, ADAPTED, None) != kind or names:
        setattr(model, ADAPTED, kind)

        def forward(self, *args, **kwargs):
            return _adapted_forward(self, *args, **kwargs)

        forward.__signature__ = _signature(model)
        forward.__doc__ = type(model).forward.__doc__
        # The name a bound method pickles by: loading fails loudly, as it did, instead of binding the class's
        # forward back (a model that returns a dict while is_adapted says otherwise).
        forward.__name__ = forward.__qualname__ = "_adapted_forward"
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
    names (a dict of tensors): an adapted model then takes positional inputs in that order by name. A Hugging Face
    decoder stops keeping a key/value cache: nothing here generates, and torch-pruning's dependency graph of a
    model that returns one never finished (its torch.cat of the cache)."""
    if is_hf_model(model) and getattr(model.config, "use_cache", False):
        model.config.use_cache = False
    if is_adapted(model):
        return adapt(model, getattr(model, ADAPTED), names) if names else model
    if isinstance(out, torch.Tensor):  # a tensor forward takes the data's order as it is
        return model
    select_output(out, task_output)  # a UserError now if nothing in it is a tensor
    return adapt(model, task_output, names)
