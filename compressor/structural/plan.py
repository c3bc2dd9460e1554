"""The plan: what pruning changed, as plain data (attributes and tensor shapes per module), and the
skeleton rebuilt from it that the pruned weights load into."""
from __future__ import annotations

import torch
from torch import nn

# Plain attributes DepGraph changes on the modules it prunes, and the Hugging Face attention fields.
_ATTRS = ("in_channels", "out_channels", "groups", "in_features", "out_features", "num_features",
          "normalized_shape", "embed_dim", "kdim", "vdim", "num_heads", "head_dim", "num_embeddings",
          "embedding_dim", "num_attention_heads", "n_heads", "attention_head_size", "all_head_size", "dim",
          "scaling", "hidden_size", "input_size")


def _attrs(m: nn.Module) -> dict:
    out = {}
    for a in _ATTRS:
        v = m.__dict__.get(a)
        if isinstance(v, (int, float)) and not isinstance(v, bool) or isinstance(v, tuple) and all(isinstance(i, int) for i in v):
            out[a] = list(v) if isinstance(v, tuple) else v
    return out


def parametrized(model: nn.Module) -> bool:
    """Whether any module computes a tensor from others (fold_parametrizations has something to fold)."""
    from torch.nn.utils import parametrize

    return any(parametrize.is_parametrized(m) for m in model.modules())


def fold_parametrizations(model: nn.Module) -> list[str]:
    """Fold parametrizations (``torch.nn.utils.parametrizations.weight_norm``, ...) into plain tensors, in place,
    leaving them as parametrized (the model computes the same function). DepGraph cuts tensors, not the
    ``original0``/``original1`` a weight is computed from: torch-pruning failed with "attribute 'weight' already
    exists". Returns the paths of the modules folded."""
    from torch.nn.utils import parametrize

    done = []
    for path, m in list(model.named_modules()):
        if parametrize.is_parametrized(m):
            kept = {}  # name: (value, a Parameter?, requires_grad), as the original tensor was
            for name, plist in m.parametrizations.items():
                origs = [t for n, t in [*plist.named_parameters(recurse=False), *plist.named_buffers(recurse=False)]
                         if n.startswith("original")]  # weight_norm's g and v: trained if either is
                kept[name] = (getattr(m, name).detach().clone(), any(isinstance(t, nn.Parameter) for t in origs),
                              any(t.requires_grad for t in origs))
            # Not parametrize.remove_parametrizations: it deletes the property from the module's class, which a
            # deep copy shares with the module it was copied from (the teacher lost its weight)
            m.__class__ = m.__class__.__bases__[0]
            del m._modules["parametrizations"]
            for name, (v, param, grad) in kept.items():
                if param:
                    m.register_parameter(name, nn.Parameter(v, requires_grad=grad))
                else:
                    m.register_buffer(name, v)
            done.append(path)
    return done


def folded_said(folded: list[str]) -> str:
    """The log's words for fold_parametrizations' result."""
    return (f"weight normalisation folded into plain weights first ({', '.join(folded[:4])}"
            f"{' ...' if len(folded) > 4 else ''})")


def plan_of(before: nn.Module, after: nn.Module) -> dict:
    """What changed, as plain data: per module path, its changed attributes and tensor shapes."""
    modules = {}
    old = dict(before.named_modules())
    for path, m in after.named_modules():
        o = old.get(path)
        if o is None:
            continue
        before_attrs = _attrs(o)
        attrs = {k: v for k, v in _attrs(m).items() if before_attrs.get(k) != v}
        old_tensors = {**o._parameters, **o._buffers}
        shapes = {n: list(t.shape) for n, t in [*m._parameters.items(), *m._buffers.items()]
                  if t is not None and old_tensors.get(n) is not None and t.shape != old_tensors[n].shape}
        if attrs or shapes:
            modules[path] = {"attrs": attrs, "shapes": shapes}
    return {"modules": modules}


def apply_plan(model: nn.Module, plan: dict) -> nn.Module:
    """The skeleton of the pruned model: ``model`` (the unpruned one) with the plan's attributes and
    tensor shapes, in place (parametrizations folded first where the cut folded them). Load the pruned weights
    into it."""
    for path in plan.get("folded", []):
        fold_parametrizations(model.get_submodule(path) if path else model)
    for path, change in plan.get("modules", {}).items():
        m = model.get_submodule(path) if path else model
        for k, v in change["attrs"].items():
            setattr(m, k, tuple(v) if isinstance(getattr(m, k, None), tuple) else v)
        for n, shape in change["shapes"].items():
            if n in m._parameters:
                p = m._parameters[n]
                m._parameters[n] = nn.Parameter(torch.zeros(shape, dtype=p.dtype), requires_grad=p.requires_grad)
            else:
                m._buffers[n] = torch.zeros(shape, dtype=m._buffers[n].dtype)
        if isinstance(m, nn.RNNBase):  # its flat weight list still holds the replaced tensors
            m._init_flat_weights()
    return model
