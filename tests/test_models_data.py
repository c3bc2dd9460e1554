import sys
import types

import pytest
import torch

from compressor.data import load_data
from compressor.errors import UserError
from compressor.models import build_model, count_flops, count_params
from compressor.recipe import DataSpec


def test_quickstart_teacher_size_and_flops():
    m = build_model("digits-resnet", {})
    assert count_params(m) == 696_042
    assert count_flops(m, torch.zeros(1, 1, 32, 32)) == 210_307_584


def test_student_fills_channels_and_classes_from_data():
    m = build_model("resnet", {"widths": [4], "depths": [1]}, {"in_channels": 3, "num_classes": 7})
    assert m(torch.zeros(2, 3, 16, 16)).shape == (2, 7)


def test_unknown_model_and_failing_builder():
    with pytest.raises(UserError, match="not a built-in model"):
        build_model("vgg99", {})
    with pytest.raises(UserError, match="does not build"):
        build_model("resnet", {"widths": [4, 8], "depths": [1]})
    with pytest.raises(UserError, match="cannot import module"):
        build_model("no_such_module_xyz:fn", {})


def test_module_function_reference(monkeypatch):
    mod = types.ModuleType("user_models_for_test")
    mod.make = lambda hidden=4: torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4, hidden))
    mod.not_a_model = lambda: 3
    monkeypatch.setitem(sys.modules, "user_models_for_test", mod)
    assert build_model("user_models_for_test:make", {"hidden": 3})(torch.zeros(1, 4)).shape == (1, 3)
    with pytest.raises(UserError, match="not a torch.nn.Module"):
        build_model("user_models_for_test:not_a_model", {})


def test_digits_split_is_fixed_by_seed():
    spec = DataSpec(dataset="digits", kwargs={"image_size": 16})
    a, b, c = load_data(spec, 0), load_data(spec, 0), load_data(spec, 1)
    assert a.input_shape == (1, 16, 16) and a.num_classes == 10
    assert len(a.train) + len(a.val) + len(a.test) == 1797
    assert len(a.test) == round(1797 * 0.2)
    assert torch.equal(a.tensors("test", 20)[0], b.tensors("test", 20)[0])
    assert not torch.equal(a.tensors("test", 20)[0], c.tensors("test", 20)[0])
    assert a.meta["mean"] and a.meta["std"]


def _register(monkeypatch, **fns):
    mod = types.ModuleType("user_data_for_test")
    for k, v in fns.items():
        setattr(mod, k, v)
    monkeypatch.setitem(sys.modules, "user_data_for_test", mod)


def test_user_data_function(monkeypatch):
    x, y = torch.randn(40, 5), torch.arange(40) % 3
    ds = torch.utils.data.TensorDataset(x, y)
    _register(monkeypatch, splits=lambda: {"train": ds, "test": ds})
    d = load_data(DataSpec(dataset="user_data_for_test:splits"), 0)
    assert d.num_classes == 3 and d.input_shape == (5,)
    assert len(d.val) == 4 and len(d.train) == 36


@pytest.mark.parametrize("fn, needle", [
    (lambda: torch.utils.data.TensorDataset(torch.zeros(0, 3), torch.zeros(0, dtype=torch.long)), "too few|empty"),
    (lambda: {"train": [1, 2]}, "without 'train' and 'test'"),
    (lambda: torch.utils.data.TensorDataset(torch.full((20, 3), float("nan")), torch.zeros(20, dtype=torch.long)), "NaN"),
    (lambda: [(1, 2)] * 20, r"\(input, label\) pair"),
    (lambda: 1 / 0, "raised ZeroDivisionError"),
])
def test_bad_user_data(monkeypatch, fn, needle):
    _register(monkeypatch, bad=fn)
    with pytest.raises(UserError, match=needle):
        load_data(DataSpec(dataset="user_data_for_test:bad"), 0)
