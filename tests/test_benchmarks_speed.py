"""benchmarks/quickstart_time.py and distill_speed.py: their cheap parts (a fresh run of a tiny recipe, the rows
of an embedding recipe)."""
import importlib.util
from pathlib import Path

import pytest
import yaml
from conftest import TINY

ROOT = Path(__file__).resolve().parent.parent


def _bench(name: str = "quickstart_time"):
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.slow
def test_a_fresh_run_trains_its_teacher_and_is_summarised(tmp_path):
    qt = _bench()
    recipe = tmp_path / "tiny.yaml"
    recipe.write_text(yaml.safe_dump({**TINY, "teacher": {**TINY["teacher"], "train": {"epochs": 1, "lr": 0.02}},
                                      "distill": {"epochs": 1, "lr": 0.01}}))
    row = qt.one_run(ROOT, str(recipe), "this checkout", "abc1234")
    # An empty cache each time: the teacher trained in this run, and the manifest's figures came back.
    assert row["teacher_train_s"] is not None and row["teacher_train_s"] > 0
    assert row["pipeline_s"] is not None and row["wall_s"] >= row["pipeline_s"]
    assert {"analyze", "distill", "profile"} <= set(row["stages_s"]) and 0 <= row["student_accuracy"] <= 1
    other = {**row, "setting": "against", "commit": "def5678", "wall_s": row["wall_s"] * 2}
    res = {"recipe": "tiny", "rows": [row, other], "summary": qt.summarise([row, other]),
           "host": {"date": "2026-01-01T00:00:00Z", "cpu": "x", "cores": 2, "cpu_flags": {"avx2": True}}}
    assert res["summary"]["wall_ratio"] == 0.5
    page = qt.markdown(res)
    assert "| this checkout | abc1234 |" in page and "0.50x the wall time" in page


def test_a_run_past_the_timeout_is_a_lower_bound(tmp_path):
    """--timeout: the run is stopped and recorded as such; the ratio against it is an upper bound."""
    qt = _bench()
    stopped = qt.one_run(ROOT, "quickstart", "against", "def5678", timeout=0.5)
    assert stopped["stopped"] and stopped["pipeline_s"] is None and stopped["wall_s"] >= 0.5
    stopped["wall_s"] = 1000.0
    done = {"setting": "this checkout", "commit": "abc1234", "wall_s": 250.0, "pipeline_s": 240, "teacher_train_s": None,
            "stages_s": {"distill": 200.0}, "quality": {"agreement": 0.85}, "p50_ms": {}}
    s = qt.summarise([done, stopped])
    assert s["wall_ratio"] == 0.25 and s["wall_ratio_bound"] == "at most" and s["against"]["stopped"] == 1
    page = qt.markdown({"recipe": "minilm-l6", "rows": [done, stopped], "summary": s,
                        "host": {"date": "2026-01-01T00:00:00Z", "cpu": "x", "cores": 2, "cpu_flags": {"avx2": True}}})
    assert "> 1000.0 (stopped)" in page and "at most 0.25x the wall time" in page and "agreement 0.8500" in page


def test_distill_speed_rows_for_an_embedding_recipe():
    """distill_speed on a recipe without labels: the student alone, then the recipe's own losses with the
    teacher live and cached, all at one precision, and cached again with batches of random lengths."""
    mod = _bench("distill_speed")
    from compressor.recipe import load_recipe

    rows = mod.settings_for(load_recipe("minilm-l6"))
    assert [r[2] for r in rows] == [True, False, True, True]
    assert rows[3][4] == {"group_by_length": False} and all(len(r) == 4 for r in rows[:3])
    assert rows[0][1] == [{"name": "cosine", "weight": 1.0}]
    assert [l["name"] for l in rows[1][1]] == ["cosine", "minilm"] == [l["name"] for l in rows[2][1]]
    assert rows[1][1][1]["pairs"][0][0] == "model.encoder.layer.-1.attention.self"  # the loss's own parameters kept
    assert mod.settings_for(load_recipe("quickstart")) is mod.SETTINGS
