"""Layer pairs by module path: hooks, the errors a user sees, adapters that train but do not ship."""
import pytest
import torch

from compressor.distill import build_loss
from compressor.distill.hooks import capture, first_tensor
from compressor.errors import UserError
from compressor.models import ResNet


def models():
    torch.manual_seed(0)
    return (ResNet(widths=(4, 8), depths=(1, 1), in_channels=1),
            ResNet(widths=(8, 16), depths=(1, 1), in_channels=1).eval())


def test_capture_records_outputs_and_removes_its_hooks():
    _, t = models()
    x = torch.randn(2, 1, 16, 16)
    with capture(t, ["stages.0", "stages.1.0", "stages.0"]) as f:
        t(x)
    assert f["stages.0"].shape == (2, 8, 16, 16) and f["stages.1.0"].shape == (2, 16, 8, 8)
    assert not any(m._forward_hooks for m in t.modules())


def test_a_negative_index_names_the_last_layers_whatever_the_depth():
    """`layer.-1` is the last layer of a list however many a pruned or searched student kept, so one recipe's
    pairs fit every student the search may pick."""
    from compressor.distill.module import DistillModule
    from compressor.prune import build_pruned

    _, t = models()
    x = torch.randn(2, 1, 16, 16)
    with capture(t, ["stages.-1", "stages.1.-1"]) as f:
        t(x)
    with capture(t, ["stages.1"]) as g:
        t(x)
    assert torch.equal(f["stages.-1"], g["stages.1"]) and torch.equal(f["stages.1.-1"], g["stages.1"])
    short = build_pruned(t, ["stages.1"])  # one stage left: -1 is stage 0 now
    DistillModule(short, t, [(1.0, build_loss("feature", pairs=[["stages.-1", "stages.-1"]]))])
    with pytest.raises(UserError, match=r"no module 'stages\.-3'"):
        DistillModule(short, t, [(1.0, build_loss("feature", pairs=[["stages.-3", "stages.-1"]]))])


def test_first_tensor_of_tuples_and_dicts():
    a = torch.zeros(1)
    assert first_tensor((a, None)) is a and first_tensor({"last_hidden_state": a}) is a and first_tensor(3) is None


def test_missing_module_is_one_line_naming_it():
    from compressor.distill.module import DistillModule

    s, t = models()
    with pytest.raises(UserError, match=r"the teacher has no module 'stages\.7' \(stages's children: 0, 1\)") as e:
        DistillModule(s, t, [(1.0, build_loss("feature", pairs=[["stages.0", "stages.7"]]))])
    assert "\n" not in str(e.value)
    with pytest.raises(UserError, match="the student has no module 'stem2'.*top-level modules: stem, stages, pool, head"):
        DistillModule(s, t, [(1.0, build_loss("feature_norm", pairs=["stem2"]))])


def test_unadaptable_pair_fails_when_the_module_is_built():
    from compressor.distill.module import DistillModule

    s, t = models()
    with pytest.raises(UserError, match="layer pair stages.1 -> head: student output 2x8x8x8 and teacher output 2x10"):
        DistillModule(s, t, [(1.0, build_loss("feature", pairs=[["stages.1", "head"]]))],
                      example=torch.randn(2, 1, 16, 16))


def test_adapters_train_with_the_student_and_stay_out_of_it():
    from compressor.distill.module import DistillModule

    s, t = models()
    x, y = torch.randn(8, 1, 16, 16), torch.randint(0, 10, (8,))
    term = build_loss("feature", pairs=[["stages.0", "stages.0"], ["stages.1", "stages.1"]])
    m = DistillModule(s, t, [(1.0, term), (1.0, build_loss("kd"))], example=x[:2], schedule="constant")
    assert [tuple(a.weight.shape) for a in term.adapters] == [(8, 4, 1, 1), (16, 8, 1, 1)]
    opt = m.configure_optimizers()
    before = term.adapters[1].weight.detach().clone()
    total, parts, _, _ = m._loss(x, y)
    total.backward()
    opt.step()
    assert not torch.equal(before, term.adapters[1].weight)
    assert set(parts) == {"feature", "kd"}
    assert not any("adapter" in k for k in s.state_dict())
    assert not any(mod._forward_hooks for mod in s.modules())  # nothing left on the student to export


def test_pipeline_distils_with_feature_pairs(tiny_recipe, tmp_path):
    import compressor
    from compressor.bundle import read_manifest

    tiny_recipe["distill"] = {"epochs": 1, "lr": 0.01, "losses": [
        {"name": "kd", "weight": 0.5},
        {"name": "feature_norm", "weight": 1.0, "pairs": [["stages.0", "stages.0"], ["stages.1", "stages.1"]]},
        {"name": "attention_transfer", "weight": 500, "pairs": ["stages.1"]},
    ]}
    tiny_recipe["targets"] = []
    out = compressor.run(tiny_recipe, tmp_path / "b", log=lambda s: None)
    man = read_manifest(out)
    distill = next(s for s in man["stages"] if s["name"] == "distill")
    assert distill["metrics"]["accuracy"] > 0
    assert man["artifacts"][0]["path"] == "model/student.onnx"


def test_pipeline_bad_module_path(tiny_recipe, tmp_path):
    import compressor

    tiny_recipe["distill"]["losses"] = [{"name": "feature", "pairs": [["stages.0", "stages.9"]]}]
    tiny_recipe["targets"] = []
    with pytest.raises(UserError, match="teacher has no module 'stages.9'"):
        compressor.run(tiny_recipe, tmp_path / "b", log=lambda s: None)
