"""The model families `compress calibrate` samples candidates from (compressor/calibrate.py): a genome
sampler and a builder (genome -> (model, example input at batch 1)) per space."""
from __future__ import annotations

import random

import torch
from torch import nn

IMAGE = 32  # the digits space at the quickstart teacher's resolution
SEQ = 64  # tokens per sample in the Transformer space


class TinyTransformer(nn.Module):
    """Token embeddings in, class logits out: a small nn.TransformerEncoder with a mean-pooled head."""

    def __init__(self, d_model=64, nhead=4, layers=2, ffn=128, num_classes=10):
        super().__init__()
        layer = nn.TransformerEncoderLayer(d_model, nhead, ffn, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.head = nn.Linear(d_model, num_classes)

    def forward(self, x):
        return self.head(self.encoder(x).mean(1))


def sample_digits(rng: random.Random) -> dict:
    stages = rng.choice([2, 3])
    widths, w = [], rng.choice([4, 8, 12, 16, 24, 32])
    for _ in range(stages):
        widths.append(w)
        w = min(128, w * rng.choice([1, 2, 2]))
    return {"widths": widths, "depths": [rng.choice([1, 1, 2, 3]) for _ in range(stages)],
            "kernel": rng.choice([3, 3, 5])}


def sample_transformer(rng: random.Random) -> dict:
    d = rng.choice([32, 64, 96, 128, 192])
    return {"d_model": d, "nhead": rng.choice([h for h in (2, 4, 8) if d % h == 0]),
            "layers": rng.choice([1, 2, 3, 4, 6]), "ffn": d * rng.choice([2, 4])}


def build_digits(g: dict):
    from .models import ResNet

    return ResNet(in_channels=1, num_classes=10, **g), torch.randn(1, 1, IMAGE, IMAGE)


def build_transformer(g: dict):
    return TinyTransformer(**g), torch.randn(1, SEQ, g["d_model"])


SPACES = {"digits": (sample_digits, build_digits), "transformer": (sample_transformer, build_transformer)}
