import pytest

import compressor
from compressor import stages
from compressor.errors import UserError


def test_api_run_reports_quality_and_speed(tiny_bundle):
    m = compressor.verify(tiny_bundle)
    q = m["quality"]
    assert q["student"]["onnx_accuracy"] == pytest.approx(q["student"]["accuracy"], abs=0.01)
    assert q["retained"] == pytest.approx(q["student"]["accuracy"] / q["teacher"]["accuracy"])
    export = next(s for s in m["stages"] if s["name"] == "export")
    assert export["metrics"]["student"]["parity_max_abs"] < 1e-4
    prof = next(s for s in m["stages"] if s["name"] == "profile")
    assert prof["metrics"]["local-cpu"]["speedup_b1"] > 0


def test_stage_order_is_data():
    assert list(stages.NAMES).index("distill") < list(stages.NAMES).index("export")
    for stage in stages.ORDER:  # one interface for every stage
        assert {"name", "needs", "skip", "run", "restore"} <= set(vars(stage)), stage.__name__
        assert stage.__name__.endswith("." + stage.name)


def test_resume_after_a_failed_stage(tiny_recipe, tmp_path, monkeypatch):
    out = tmp_path / "run"
    calls = {"distill": 0}
    real_distill = stages.distill.run

    def counting_distill(ctx):
        calls["distill"] += 1
        return real_distill(ctx)

    def crash(ctx):
        raise RuntimeError("board unplugged")

    monkeypatch.setattr(stages.distill, "run", counting_distill)
    with monkeypatch.context() as m:
        m.setattr(stages.profile, "run", crash)
        with pytest.raises(RuntimeError, match="board unplugged"):
            compressor.run(tiny_recipe, out, log=lambda s: None)
    partial = tmp_path / "run.partial"
    assert not out.exists() and partial.is_dir()
    finished = {p.stem for p in (partial / "stages").glob("*.json")}
    assert {"analyze", "distill", "export"} <= finished and "profile" not in finished

    with pytest.raises(UserError, match="unfinished run"):
        compressor.run(tiny_recipe, out, log=lambda s: None)
    changed = dict(tiny_recipe, seed=1)
    with pytest.raises(UserError, match="recipe differs"):
        compressor.run(changed, out, resume=True, log=lambda s: None)

    logs = []
    bundle = compressor.run(tiny_recipe, out, resume=True, log=logs.append)
    assert calls["distill"] == 1  # not repeated
    assert any("[distill] done earlier" in l for l in logs)
    m = compressor.verify(bundle)
    assert [s["name"] for s in m["stages"]] == [n for n in stages.NAMES if n in finished | {"profile"}]
    assert not partial.exists()
    distilled = next(s for s in m["stages"] if s["name"] == "distill")
    assert m["quality"]["student"]["accuracy"] == distilled["metrics"]["accuracy"]
    assert "kept" not in distilled["metrics"]  # a student from random weights is not scored before training


def test_force_replaces_a_bundle(tiny_recipe, tmp_path):
    out = tmp_path / "b"
    out.mkdir()
    (out / "old.txt").write_text("old")
    tiny_recipe["distill"]["epochs"] = 1
    compressor.run(tiny_recipe, out, force=True, log=lambda s: None)
    assert not (out / "old.txt").exists() and compressor.verify(out)


def test_budgets_are_checked(tiny_recipe, tmp_path):
    tiny_recipe["budgets"] = {"size_mb": 1e-6, "latency_ms": {"local-cpu": 1000}, "max_quality_drop": 1.0}
    tiny_recipe["distill"]["epochs"] = 1
    m = compressor.verify(compressor.run(tiny_recipe, tmp_path / "b", log=lambda s: None))
    met = {b["budget"]: b["met"] for b in m["budgets"]}
    assert met == {"size_mb": False, "latency_ms[local-cpu]": True, "max_quality_drop": True}
