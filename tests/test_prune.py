"""Layer pruning: units, the output-loss criterion, the knapsack, the pruned student, the stage."""
import itertools

import pytest
import torch
from torch import nn

from compressor import prune as P
from compressor.errors import UserError
from compressor.models import ResNet


def resnet():
    torch.manual_seed(0)
    return ResNet(widths=(8, 16), depths=(2, 2), in_channels=1).eval()


class Layer(nn.Module):
    """A Transformer-style layer that returns a tuple, as Hugging Face layers do."""

    def __init__(self, d):
        super().__init__()
        self.ff = nn.Sequential(nn.Linear(d, d), nn.Tanh())

    def forward(self, hidden_states, mask=None):
        return (hidden_states + self.ff(hidden_states),)


class Encoder(nn.Module):
    def __init__(self, n=4, d=6):
        super().__init__()
        self.embed = nn.Linear(3, d)
        self.layer = nn.ModuleList(Layer(d) for _ in range(n))
        self.head = nn.Linear(d, 2)

    def forward(self, x):
        h = self.embed(x)
        for layer in self.layer:
            h = layer(h, mask=None)[0]
        return self.head(h)


def test_units_of_a_resnet_are_its_constant_shape_blocks():
    m = resnet()
    units = P.find_units(m, torch.randn(2, 1, 16, 16))
    # stages.1.0 changes width and stride; the stem and head are not blocks in a container.
    assert [u.path for u in units] == ["stages.0.0", "stages.0.1", "stages.1.1"]
    assert units[0].params == sum(p.numel() for p in m.stages[0][0].parameters())


def test_units_of_a_transformer_stack_and_removal_from_the_list():
    torch.manual_seed(0)
    m = Encoder().eval()
    x = torch.randn(2, 5, 3)
    units = P.find_units(m, x)
    assert [u.path for u in units] == [f"layer.{i}" for i in range(4)]
    pruned = P.build_pruned(m, ["layer.1", "layer.3"])
    assert len(pruned.layer) == 2 and len(m.layer) == 4
    assert torch.equal(pruned.layer[1].ff[0].weight, m.layer[2].ff[0].weight)  # teacher's weights, shifted
    # The removed layers skipped by hand give the same output.
    h = m.embed(x)
    for i in (0, 2):
        h = m.layer[i](h)[0]
    torch.testing.assert_close(pruned(x), m.head(h))


def test_criterion_is_the_output_loss_of_each_unit_alone():
    m = resnet()
    x = torch.randn(4, 1, 16, 16)
    units = P.score_units(m, P.find_units(m, x), [x[:2], x[2:]])
    with torch.no_grad():
        y = m(x)
        for u in units:
            parent, idx = u.path.rsplit(".", 1)
            seq = m.get_submodule(parent)
            keep = seq[int(idx)]
            seq[int(idx)] = nn.Identity()
            want = ((m(x) - y) ** 2).sum(1).mean().item()
            seq[int(idx)] = keep
            assert u.loss == pytest.approx(want, rel=1e-5)
            assert u.flops > 0
    torch.testing.assert_close(m(x), y)  # scoring restored the model


def test_knapsack_matches_brute_force():
    units = [P.Unit(f"u{i}", params=p, loss=l)
             for i, (p, l) in enumerate([(10, 0.5), (30, 0.9), (20, 0.2), (25, 0.6), (5, 0.05), (40, 2.0)])]
    for budget in (5, 21, 44, 60, 90):
        got = P.select(units, "params", budget)
        assert sum(u.params for u in got) >= budget
        best = min((s for k in range(1, 6) for s in itertools.combinations(units, k)
                    if sum(u.params for u in s) >= budget), key=lambda s: sum(u.loss for u in s))
        assert sum(u.loss for u in got) == pytest.approx(sum(u.loss for u in best))
    assert [u.path for u in P.select(units, "units", 2)] == ["u2", "u4"]


def test_budget_that_removes_every_unit_is_a_user_error():
    units = [P.Unit("a", 10, loss=1.0), P.Unit("b", 10, loss=1.0)]
    with pytest.raises(UserError, match="removes every prunable unit \\(a, b\\)"):
        P.select(units, "params", 15)
    with pytest.raises(UserError, match="short of the"):
        P.select(units, "params", 25)
    with pytest.raises(UserError, match="removes every prunable unit"):
        P.select(units, "units", 2)


def test_prune_teacher_and_rebuild_from_genome():
    m = resnet()
    x = torch.randn(8, 1, 16, 16)
    student, info = P.prune_teacher(m, [x], "units", 1, log=lambda s: None)
    assert len(info["removed"]) == 1 and info["params"] < sum(p.numel() for p in m.parameters())
    assert info["measured_loss"] == pytest.approx(info["predicted_loss"], rel=1e-5)  # one unit: exact
    rebuilt = P.rebuild({"model": "resnet", "config": {"widths": [8, 16], "depths": [2, 2]},
                         "defaults": {"in_channels": 1}, "removed": info["removed"]})
    rebuilt.load_state_dict(student.state_dict())
    torch.testing.assert_close(rebuilt.eval()(x), student.eval()(x))


def test_recipe_prune_section_is_validated(tiny_recipe):
    from compressor.recipe import load_recipe

    tiny_recipe["prune"] = {"by": "params", "remove": 1.5}
    with pytest.raises(UserError, match="prune.*fraction below 1"):
        load_recipe(tiny_recipe)
    tiny_recipe["prune"] = {"by": "units", "remove": 1, "typo": 2}
    with pytest.raises(UserError, match="prune.typo: unknown key"):
        load_recipe(tiny_recipe)



def test_pipeline_prunes_the_teacher_into_the_student(deep_tiny, tmp_path):
    import compressor
    from compressor.bundle import read_manifest

    deep_tiny["prune"] = {"by": "units", "remove": 1, "calibration_batches": 2}
    deep_tiny["distill"]["losses"] = [{"name": "kd", "weight": 1.0},
                                      {"name": "feature_norm", "weight": 1.0, "pairs": ["stages.0", "stages.1"]}]
    out = compressor.run(deep_tiny, tmp_path / "b", log=lambda s: None)
    man = read_manifest(out)
    rec = next(s for s in man["stages"] if s["name"] == "prune")
    assert len(rec["outputs"]["removed"]) == 1 and len(rec["metrics"]["units"]) == 3
    assert man["student"]["removed"] == rec["outputs"]["removed"]
    # a student cut from the teacher competes as epoch 0 of its distillation (distill.train's as_it_came)
    distill = next(s for s in man["stages"] if s["name"] == "distill")["metrics"]
    assert "start_val_acc" in distill and distill["kept"] in ("best epoch", "as it came")
    # The genome and the shipped weights rebuild the student.
    student = P.rebuild(man["student"])
    student.load_state_dict(torch.load(out / "model" / "student.pt", weights_only=True))


def test_pipeline_budget_removing_everything(deep_tiny, tmp_path):
    import compressor

    deep_tiny["prune"] = {"by": "units", "remove": 3}
    with pytest.raises(UserError, match="removes every prunable unit"):
        compressor.run(deep_tiny, tmp_path / "b", log=lambda s: None)


def test_every_unit_but_the_ignored_ones_may_go(deep_tiny):
    """With prune.ignore the ignored blocks remain: removing every other unit leaves a model (it was refused
    as leaving none, so a user could not choose which layers stay)."""
    from compressor.data import load_data
    from compressor.recipe import load_recipe
    from compressor.teacher import load_teacher

    recipe = load_recipe(deep_tiny)
    data = load_data(recipe.data, recipe.seed)
    teacher, _ = load_teacher(recipe, data, log=lambda s: None)
    x = next(iter(data.loader("train", 64)))[0]
    student, info = P.prune_teacher(teacher, [x], "units", 2, log=lambda s: None, ignore=["stages.0.0"])
    assert info["removed"] == ["stages.0.1", "stages.1.1"]
    assert student(x).shape == teacher(x).shape


def test_additivity_report():
    """The mechanics of the additivity check (the figure on the quickstart teacher comes from
    ``python benchmarks/prune_additivity.py``; an untrained net here keeps the test fast)."""
    torch.manual_seed(0)
    m = ResNet(widths=(8, 16), depths=(3, 3), in_channels=1).eval()
    x = torch.randn(32, 1, 16, 16)
    from compressor.additivity import additivity

    r = additivity(m, [x[:16], x[16:]], n_sets=12)
    assert r["sets"] == 12 and len(r["units"]) == 5
    row = r["rows"][0]
    assert 2 <= len(row["removed"]) <= 4
    assert row["measured"] == pytest.approx(P.set_loss(m, row["removed"], [x]), rel=1e-4)
    assert -1 <= r["spearman"] <= 1


def test_restore_rebuilds_the_student_from_the_record():
    from types import SimpleNamespace

    from compressor.bundle import StageRecord
    from compressor.stages import prune as stage

    m = resnet()
    rec = StageRecord("prune", outputs={"removed": ["stages.0.1"], "genome": {"removed": ["stages.0.1"]}})
    ctx = SimpleNamespace(teacher=m, student=None, genome={})
    stage.restore(ctx, rec)
    assert isinstance(ctx.student.stages[0][1], nn.Identity) and ctx.genome["removed"] == ["stages.0.1"]
    ctx = SimpleNamespace(teacher=m, student="kept", genome={})
    stage.restore(ctx, StageRecord("prune", skipped="no prune section in the recipe"))
    assert ctx.student == "kept"


# ------------------------------------------------------------------------------ latency as the budget

class SizeDevice:
    """Latency proportional to the ONNX file size: deterministic, close to additive over blocks."""

    def __init__(self):
        self.measured = 0

    def measure(self, path, **kw):
        import os
        from types import SimpleNamespace

        self.measured += 1
        return SimpleNamespace(p50_ms=os.path.getsize(path) / 1e4)


def test_knapsack_by_latency_matches_brute_force():
    units = [P.Unit(f"u{i}", 1, loss=l, latency_ms=ms)
             for i, (l, ms) in enumerate([(0.3, 0.12), (0.1, 0.05), (0.25, 0.31), (0.05, 0.02), (0.4, 0.2)])]
    for budget in (0.05, 0.1, 0.22, 0.4, 0.6):
        best = min((s for r in range(1, 5) for s in itertools.combinations(units, r)
                    if sum(u.latency_ms for u in s) >= budget), key=lambda s: sum(u.loss for u in s))
        assert [u.path for u in P.select(units, "latency", budget)] == [u.path for u in best]


def test_prune_by_measured_latency():
    m = resnet()
    x = torch.randn(8, 1, 16, 16)
    dev = SizeDevice()
    logs = []
    student, info = P.prune_teacher(m, [x], "latency", 0.3, device=dev, log=logs.append,
                                    measure_kw={"runs": 5})
    # 3 rounds of the teacher and its 3 one-unit variants, then 3 rounds of the teacher and the pruned model.
    assert dev.measured == 3 * 4 + 3 * 2
    units = {u["path"]: u for u in info["units"]}
    # The wide block (16 channels) is the costly one on this device; its removal meets 30%.
    assert units["stages.1.1"]["latency_ms"] > units["stages.0.0"]["latency_ms"] > 0
    lat = info["latency"]
    assert lat["saved_ms"] >= 0.3 * lat["teacher_ms"] * 0.99
    assert lat["pruned_ms"] == pytest.approx(lat["teacher_ms"] - lat["sum_of_unit_savings_ms"], rel=0.05)
    assert any("measured" in l for l in logs)


def test_prune_by_predicted_latency():
    from devices.predictor import LatencyPredictor

    from compressor.calibrate import features

    # A predictor fitted on three ResNets whose "latency" is their FLOPs: removing a block saves its FLOPs.
    x = torch.randn(4, 1, 16, 16)
    samples = []
    for w in ((4, 8), (8, 16), (8, 8), (16, 16)):
        for d in ((1, 1), (2, 1), (2, 2), (1, 3)):
            f = features(ResNet(widths=w, depths=d, in_channels=1), x)
            samples.append(({"flops": f["flops"], "params": f["params"], "n_Identity": f["n_Identity"]},
                            f["flops"] / 1e6))
    pred = LatencyPredictor.fit("fake", samples, method="additive")
    m = resnet()
    student, info = P.prune_teacher(m, [x], "latency", 0.2, predictor=pred, log=lambda s: None)
    assert info["latency"]["how"].startswith("predicted")
    assert all(u["latency_ms"] > 0 for u in info["units"])
    assert info["latency"]["saved_ms"] >= 0.2 * info["latency"]["teacher_ms"] * 0.99


def test_latency_needs_a_device_or_predictor():
    with pytest.raises(UserError, match="needs a device"):
        P.prune_teacher(resnet(), [torch.randn(2, 1, 16, 16)], "latency", 0.3, log=lambda s: None)


def test_recipe_prune_by_latency_is_validated(tiny_recipe):
    from compressor.recipe import load_recipe

    tiny_recipe["prune"] = {"by": "latency", "remove": 0.3, "latency": "predict"}
    with pytest.raises(UserError, match="predict needs predictor"):
        load_recipe(tiny_recipe)
    tiny_recipe["prune"] = {"by": "params", "remove": 0.3, "device": "local-cpu"}
    with pytest.raises(UserError, match="go with by: latency"):
        load_recipe(tiny_recipe)
    tiny_recipe["prune"] = {"by": "latency", "remove": 0.3, "device": "local-cpu"}
    assert load_recipe(tiny_recipe).prune.latency == "measure"
    tiny_recipe["targets"] = []
    tiny_recipe["prune"] = {"by": "latency", "remove": 0.3}
    r = load_recipe(tiny_recipe)
    from compressor.stages.prune import latency_source

    with pytest.raises(UserError, match="needs prune.device"):
        latency_source(r.prune, r.targets)


def test_shipped_prune_recipe():
    from compressor.recipe import load_recipe

    r = load_recipe("quickstart-prune")
    assert r.prune.by == "latency" and (r.prune.device or r.targets)


@pytest.mark.slow
def test_pipeline_prunes_by_latency(deep_tiny, tmp_path, monkeypatch):
    """The prune stage with by: latency: the device comes from prune.device (a fake that times ONNX size)."""
    import devices

    import compressor
    from compressor.bundle import read_manifest

    dev = SizeDevice()
    dev.why_unavailable = lambda: None
    monkeypatch.setattr(devices, "get_device", lambda profile: dev)
    deep_tiny["prune"] = {"by": "latency", "remove": 0.2, "device": "local-cpu", "calibration_batches": 1}
    out = compressor.run(deep_tiny, tmp_path / "b", log=lambda s: None)
    rec = next(s for s in read_manifest(out)["stages"] if s["name"] == "prune")
    lat = rec["metrics"]["latency"]
    assert rec["config"]["by"] == "latency" and rec["outputs"]["removed"]
    assert lat["saved_ms"] >= 0.2 * lat["teacher_ms"] * 0.99 and "warning" not in lat
    assert all(u["latency_ms"] > 0 for u in rec["metrics"]["units"])
