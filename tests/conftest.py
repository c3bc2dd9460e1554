import os
import tempfile
from pathlib import Path

import pytest

# Teachers trained on first use are cached; tests keep their cache out of the user's home.
os.environ.setdefault("COMPRESSOR_CACHE", tempfile.mkdtemp(prefix="compressor-test-cache-"))

# A recipe small enough for tests: digits at 16x16, a two-stage teacher trained for two epochs.
TINY = {
    "name": "tiny",
    "seed": 0,
    "teacher": {"model": "resnet", "kwargs": {"widths": [8, 16], "depths": [1, 1]},
                "train": {"epochs": 8, "lr": 0.02}},
    "data": {"dataset": "digits", "kwargs": {"image_size": 16}, "batch_size": 128},
    "student": {"model": "resnet", "config": {"widths": [4, 8], "depths": [1, 1]}},
    "distill": {"epochs": 2, "lr": 0.01},
    "profile": {"batch_sizes": [1], "warmup": 2, "runs": 10, "max_seconds": 5},
    "targets": ["local-cpu"],
}


@pytest.fixture
def tiny_recipe():
    import copy

    return copy.deepcopy(TINY)


@pytest.fixture(scope="session")
def tiny_bundle(tmp_path_factory) -> Path:
    """One finished tiny run, shared by the tests that only read a bundle."""
    import compressor

    out = tmp_path_factory.mktemp("bundles") / "tiny"
    return compressor.run(dict(TINY), out, log=lambda s: None)


@pytest.fixture
def deep_tiny(tiny_recipe):
    """Two blocks per stage, so the teacher has three prunable units (stages.0.0, stages.0.1, stages.1.1)."""
    tiny_recipe["teacher"]["kwargs"]["depths"] = [2, 2]
    tiny_recipe["distill"]["epochs"] = 1
    tiny_recipe["targets"] = []
    return tiny_recipe


def mlp_space():
    """A small MLP search space over 16 features and 4 classes (with the ``batch`` fixture)."""
    from compressor.search.spaces import Space

    return Space("mlp", "mlp", {"layers": [1, 2], "width_0": [8, 16, 32, 64], "width_1": [8, 16, 32]})


@pytest.fixture
def batch():
    import torch

    g = torch.Generator().manual_seed(0)
    return torch.randn(32, 16, generator=g), torch.randint(0, 4, (32,), generator=g)
