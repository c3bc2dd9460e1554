"""Distillation: the loss registry and the Lightning module (imported lazily: lightning is slow to import)."""
from __future__ import annotations

import inspect

from .losses import (CE, ICKD, KD, RKD, TAID, AttentionTransfer, Cosine, Feature, FeatureNorm, MiniLM,
                     SimilarityPreserving)

# name -> loss class; the recipe's `distill.losses` entries name these. Feature terms take
# `pairs: [[student module path, teacher module path], ...]` (see losses.py and hooks.py).
LOSSES = {
    "kd": KD,
    "ce": CE,
    "feature": Feature,
    "feature_norm": FeatureNorm,
    "attention_transfer": AttentionTransfer,
    "rkd": RKD,
    "similarity_preserving": SimilarityPreserving,
    "minilm": MiniLM,
    "taid": TAID,
    "ickd": ICKD,
    "cosine": Cosine,
}

# Terms that read class logits or labels: meaningless for an embedding model.
NEEDS_LOGITS = ("kd", "ce", "taid")


def check_params(name: str, params: dict) -> None:
    """Reject parameters that the loss does not take (a typo in the recipe is an error, not a no-op)."""
    sig = inspect.signature(LOSSES[name].__init__)
    accepted = [p for p in sig.parameters if p != "self"]
    unknown = sorted(set(params) - set(accepted))
    if unknown:
        raise ValueError(f"loss {name!r} takes no parameter {', '.join(unknown)} "
                         f"(it takes: {', '.join(accepted) or 'nothing'})")
    try:  # values the loss rejects (pairs of the wrong form) fail here too, in the recipe's validation
        LOSSES[name](**params)
    except TypeError as e:
        raise ValueError(f"loss {name!r}: {e}") from None


def build_loss(name: str, **params):
    check_params(name, params)
    return LOSSES[name](**params)


def __getattr__(attr):
    if attr == "DistillModule":
        from .module import DistillModule

        return DistillModule
    raise AttributeError(attr)


__all__ = ["LOSSES", "CE", "KD", "Feature", "FeatureNorm", "AttentionTransfer", "RKD", "SimilarityPreserving",
           "MiniLM", "TAID", "ICKD", "DistillModule", "build_loss", "check_params"]
