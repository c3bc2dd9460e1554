"""Distillation loss terms. Each is an nn.Module called with keyword arguments from one pool:

    student, teacher   logits (batch x classes) of the student and of the frozen teacher
    target             integer labels (batch,)

A term takes the keywords it needs and ignores the rest, so the DistillModule can call every term the
same way and a user's own training loop can call ``KD(temperature=4)(student=s, teacher=t)``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class KD(nn.Module):
    """Hinton et al.: T^2 * KL(softmax(t/T) || softmax(s/T)), batch-mean.

    The T^2 factor keeps the gradient scale independent of the temperature.
    """

    def __init__(self, temperature: float = 4.0):
        super().__init__()
        if temperature <= 0:
            raise ValueError("temperature must be positive")
        self.temperature = float(temperature)

    def forward(self, *, student: torch.Tensor, teacher: torch.Tensor, **_) -> torch.Tensor:
        t = self.temperature
        log_p_s = F.log_softmax(student / t, dim=-1)
        log_p_t = F.log_softmax(teacher / t, dim=-1)
        return F.kl_div(log_p_s, log_p_t, reduction="batchmean", log_target=True) * t * t


class CE(nn.Module):
    """Cross-entropy with the ground-truth labels (optionally label-smoothed)."""

    def __init__(self, label_smoothing: float = 0.0):
        super().__init__()
        self.label_smoothing = float(label_smoothing)

    def forward(self, *, student: torch.Tensor, target: torch.Tensor, **_) -> torch.Tensor:
        return F.cross_entropy(student, target, label_smoothing=self.label_smoothing)
