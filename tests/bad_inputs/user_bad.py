"""Builders and datasets that go wrong in the ways users' code does (used by tests/bad_inputs)."""
import torch
from torch.utils.data import TensorDataset


def raises():
    raise RuntimeError("weights server down")


def three_classes():
    return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(256, 3))


def wrong_input_size():
    return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(7, 10))


def returns_a_string():
    return "resnet"


def returns_3d():
    return torch.nn.Conv2d(1, 10, 3)


def empty():
    return TensorDataset(torch.zeros(0, 1, 16, 16), torch.zeros(0, dtype=torch.long))


def nan_data():
    x = torch.randn(100, 1, 16, 16)
    x[0, 0, 0, 0] = float("nan")
    return TensorDataset(x, torch.arange(100) % 10)


def not_pairs():
    return [torch.zeros(1, 16, 16)] * 50


def no_test_split():
    return {"train": TensorDataset(torch.zeros(10, 1, 16, 16), torch.zeros(10, dtype=torch.long))}


def tiny_split():
    return TensorDataset(torch.zeros(2, 1, 16, 16), torch.zeros(2, dtype=torch.long))


class _Histogram(torch.nn.Module):
    """A feature no ONNX exporter converts (aten::histc)."""

    def forward(self, x):
        return x + torch.histc(x, 8).sum() * 0


def unexportable():
    return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(256, 32), _Histogram(), torch.nn.Linear(32, 10))


def channel_multiplier():
    """A depthwise convolution with a channel multiplier (8 -> 16 in 8 groups): its channels have no coupling
    torch-pruning's dependency graph can follow."""
    return torch.nn.Sequential(torch.nn.Conv2d(1, 8, 3, padding=1), torch.nn.ReLU(),
                               torch.nn.Conv2d(8, 16, 3, padding=1, groups=8), torch.nn.ReLU(),
                               torch.nn.Conv2d(16, 16, 1), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(),
                               torch.nn.Linear(16, 10))
