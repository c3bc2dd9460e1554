"""The few-labels pieces (digits label_fraction, CE ignoring label -1) and the digits benchmark's summary.
The benchmark itself is a script (minutes); here only its cheap parts run."""
import importlib.util
from pathlib import Path

import pytest
import torch

from compressor.data import HiddenLabels, load_data
from compressor.distill.losses import CE
from compressor.errors import UserError
from compressor.recipe import load_recipe

ROOT = Path(__file__).resolve().parent.parent


def _bench():
    spec = importlib.util.spec_from_file_location("digits_cpu", ROOT / "benchmarks" / "digits_cpu.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_label_fraction_hides_training_labels_only(tiny_recipe):
    tiny_recipe["data"]["kwargs"]["label_fraction"] = 0.05
    data = load_data(load_recipe(tiny_recipe).data, 0)
    assert isinstance(data.train, HiddenLabels)
    _, y = data.tensors("train")
    kept = (y >= 0).nonzero().flatten().tolist()
    assert kept == data.train.labelled and data.meta["labelled"] == len(kept)
    assert set(y.tolist()) - {-1} == set(range(10))  # stratified: every class keeps a label
    assert 0.04 * len(y) <= len(kept) <= 0.07 * len(y)
    assert (data.tensors("test")[1] >= 0).all() and (data.tensors("val")[1] >= 0).all()
    full = load_data(load_recipe({**tiny_recipe, "data": {**tiny_recipe["data"], "kwargs": {"image_size": 16}}}).data, 0)
    assert torch.equal(full.tensors("test")[0], data.tensors("test")[0])  # the same split as with all labels
    assert torch.equal(full.tensors("train")[1][kept], y[kept])


def test_label_fraction_out_of_range(tiny_recipe):
    tiny_recipe["data"]["kwargs"]["label_fraction"] = 0.0
    with pytest.raises(UserError, match="label_fraction"):
        load_data(load_recipe(tiny_recipe).data, 0)


def test_ce_ignores_unlabelled_and_is_zero_without_labels():
    s = torch.randn(4, 3, requires_grad=True)
    y = torch.tensor([2, -1, 0, -1])
    want = torch.nn.functional.cross_entropy(s[[0, 2]], y[[0, 2]])
    assert torch.allclose(CE()(student=s, target=y), want)
    none = CE()(student=s, target=torch.full((4,), -1))
    assert none.item() == 0.0 and torch.isfinite(none)
    none.backward()  # still part of the graph: a batch without labels trains on the other terms
    assert torch.equal(s.grad, torch.zeros_like(s))


def test_gap_closed_and_markdown():
    b = _bench()
    f = b.few_label_summary(0.99, 340.0, 10.0, [0.97, 0.97], {"same_steps": [0.70, 0.72], "subset": [0.78, 0.80]})
    assert f["label_only_best"] == pytest.approx(0.79)  # against the stronger label-only baseline
    assert f["gap_closed"] == pytest.approx((0.97 - 0.79) / (0.99 - 0.79))
    assert f["flops_ratio"] == 34 and f["goal_met"] is True
    assert b.few_label_summary(0.99, 340.0, 100.0, [0.97], {"subset": [0.79]})["goal_met"] is False  # 1/3.4 FLOPs
    f["setup"] = {"labelled": 61, "train": 1258, "epochs": 15, "subset_epochs": 150, "kd_losses": "0.7 kd + 0.3 ce"}
    f["student_flops"] = 10.0
    row = {"setting": "full", "model": "teacher", "params": 10, "flops": 340.0, "bytes": 1, "accuracy": 0.99,
           "b1_p50_ms": 1.0, "b32_p50_ms": 9.0, "b1_gflops": 1.0, "b32_gflops": 2.0, "b1_of_peak": 0.1,
           "b32_of_peak": 0.2}
    res = {"machine": b.machine(), "rows": [row], "few_labels": f, "peak_gflops": 100.0,
           "unavailable": {"searched": "UserError: no space"}}
    md = b.markdown(res)
    assert "90.0%** of the gap" in md and "| searched | not run |" in md and "(goal: >= 80% at <= 1/10: met)" in md
    assert "| teacher | all labels | 0.9900 |" in md and "0.7800, 0.8000" in md


def test_searched_and_pruned_rows():
    """The pruned row is the shipped quickstart-prune recipe; searched and pruned students say what they are,
    and a few-labels section not rerun says when it was measured."""
    import yaml

    b = _bench()
    shipped = yaml.safe_load((b.ROOT / "profiles" / "recipes" / "quickstart-prune.yaml").read_text())
    assert b.recipe_for("pruned", False, None) == {**shipped, "name": "digits-pruned"}
    searched = yaml.safe_load((b.ROOT / "profiles" / "recipes" / "quickstart-search.yaml").read_text())
    assert b.recipe_for("searched", False, None) == {**searched, "name": "digits-searched"}
    assert b.recipe_for("searched", True, None)["search"]["family"] == "teacher"
    base = {"params": 10, "flops": 3.0, "bytes": 1, "accuracy": 0.99, "b1_p50_ms": 1.0, "b32_p50_ms": 9.0,
            "b1_gflops": 1.0, "b32_gflops": 2.0, "b1_of_peak": 0.1, "b32_of_peak": 0.2}
    rows = [{**base, "setting": "searched", "model": "student", "genome": {"widths": [8, 16, 32]},
             "search": {"trials": 40, "feasible": 30, "seconds": 12.0}},
            {**base, "setting": "pruned", "model": "student", "removed": ["stages.1.1", "stages.2.1"]}]
    f = b.few_label_summary(0.99, 340.0, 10.0, [0.97], {"subset": [0.79]})
    md = b.markdown({"machine": b.machine(), "rows": rows, "peak_gflops": 100.0, "few_labels": f,
                     "few_labels_from": "2026-11-27T23:45:54Z"})
    assert "| searched | student |" in md and "| pruned | student |" in md
    assert "chosen {'widths': [8, 16, 32]}" in md and "removed stages.1.1, stages.2.1" in md
    assert "from the run of 2026-11-27T23:45:54Z" in md


def test_retime_puts_every_student_file_side_by_side(tiny_bundle):
    """digits_cpu times the students' files again in interleaved rounds (each bundle's own profile ran at
    another moment of load); a file no longer in its bundle (the teacher's ONNX stays in work/) keeps its
    bundle's figure and says so."""
    b = _bench()
    rows = [{"setting": "full", "model": "student", "file": "model/student.onnx", "precision": "fp32", "flops": 1e6,
             "b1_p50_ms": 99.0, "b32_p50_ms": 99.0},
            {"setting": "full", "model": "teacher", "file": "work/teacher.onnx", "precision": "fp32", "flops": 1e7,
             "b1_p50_ms": 5.0, "b32_p50_ms": 50.0}]
    b.retime(rows, {"full": tiny_bundle}, rounds=2, log=lambda s: None)
    s, t = rows
    assert s["timing"] == "side by side" and s["b1_p50_ms_bundle"] == 99.0 and 0 < s["b1_p50_ms"] < 99.0
    assert s["b32_gflops"] == pytest.approx(1e6 * 32 / (s["b32_p50_ms"] * 1e6))
    assert t["timing"] == "its bundle's profile" and t["b1_p50_ms"] == 5.0 and "b1_p50_ms_bundle" not in t
