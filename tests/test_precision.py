"""compressor.precision: bf16 only where the CPU's flags (or the GPU) say it runs natively; the teacher's
training on first use follows it and the manifest's origin says which."""
import pytest
import torch
from torch import nn

from compressor import precision


def _flags(monkeypatch, flags):
    import devices.bench_onnxruntime as ort

    monkeypatch.setattr(ort, "cpu_flags", lambda: set(flags))


def test_auto_follows_the_cpu_flags(monkeypatch):
    _flags(monkeypatch, {"avx2", "avx512f", "amx_bf16"})
    assert precision.resolve("auto", "cpu") == ("bf16-mixed", "this CPU has amx_bf16")
    _flags(monkeypatch, {"avx2", "avx512_bf16"})
    assert precision.resolve("auto", "cpu")[0] == "bf16-mixed"
    _flags(monkeypatch, {"avx2", "avx512f", "avx512_vnni"})  # VNNI is int8, not bf16
    assert precision.resolve("auto", "cpu") == ("32-true", "this CPU has neither AMX nor AVX512-BF16")
    assert precision.resolve("bf16-mixed", "cpu") == ("bf16-mixed", "set in the recipe")


def test_autocast_runs_bf16_only_when_asked():
    x, w = torch.randn(4, 8), torch.randn(8, 8)
    with precision.autocast("bf16-mixed"):
        assert (x @ w).dtype == torch.bfloat16
    with precision.autocast("32-true"):
        assert (x @ w).dtype == torch.float32


def test_the_teacher_trains_at_the_resolved_precision_and_says_so(tiny_recipe, monkeypatch, tmp_path):
    from compressor.context import load_inputs
    from compressor.recipe import load_recipe

    monkeypatch.setenv("COMPRESSOR_CACHE", str(tmp_path))
    seen = []
    real = precision.autocast

    def spy(prec, device="cpu"):
        seen.append(prec)
        return real(prec, device)

    monkeypatch.setattr(precision, "autocast", spy)
    tiny_recipe["teacher"]["train"] = {"epochs": 1, "lr": 0.01, "precision": "bf16-mixed"}
    lines = []
    _, teacher, origin = load_inputs(load_recipe(tiny_recipe), log=lines.append)
    assert origin["precision"] == "bf16-mixed" and set(seen) == {"bf16-mixed"}
    assert any("precision bf16-mixed (set in the recipe)" in line for line in lines)
    assert all(p.dtype == torch.float32 for p in teacher.parameters())  # autocast keeps fp32 weights


class _Unused(nn.Module):
    """A classifier with a parameter its forward never reads (as the taps of a kernel that only see padding),
    holding NaN: the output is fine, the weights are not."""

    def __init__(self):
        super().__init__()
        self.fc, self.spare = nn.Linear(64, 10), nn.Parameter(torch.full((3,), float("nan")))

    def forward(self, x):
        return self.fc(x.flatten(1))


def test_weights_that_training_left_non_finite_are_named_with_the_setting_to_change():
    """PyTorch's CPU bf16 conv backward gave SwiftFormer's padding-only taps NaN (its forward skips them): every
    check passed until ONNX Runtime's calibrator stopped on a bare 'scale issue'."""
    from compressor.data import load_data
    from compressor.errors import UserError
    from compressor.recipe.sections import DataSpec, TrainSpec
    from compressor.teacher import train_supervised

    data = load_data(DataSpec(dataset="digits", kwargs={"image_size": 8}), seed=0)
    with pytest.raises(UserError, match=r"the teacher has NaN or inf in 1 parameter\(s\) after training at "
                                        r"bf16-mixed \(spare\); set teacher.train.precision: 32-true"):
        train_supervised(_Unused(), data, TrainSpec(epochs=1), 64, 0, log=lambda s: None, precision="bf16-mixed")
