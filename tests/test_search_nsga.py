"""NSGA-II search (Optuna): budgets as constraints, a resumable SQLite study, the pipeline's search stage."""
import json
from types import SimpleNamespace

import pytest

from compressor.errors import UserError
from compressor.search import PROXIES
from compressor.search.nsga import pareto, search, tightest
from conftest import mlp_space

optuna = pytest.importorskip("optuna")


class FakeDevice:
    """Latency proportional to the ONNX file size: deterministic, and it counts what it measured."""

    def __init__(self):
        self.measured = 0

    def measure(self, path, **kw):
        import os

        self.measured += 1
        return SimpleNamespace(p50_ms=os.path.getsize(path) / 1e4)


DEFAULTS = {"in_features": 16, "num_classes": 4}


def test_search_meets_budgets_and_resumes(tmp_path, batch):
    dev = FakeDevice()
    kw = dict(defaults=DEFAULTS, devices={"fake": dev}, size_mb=0.004, latency_ms={"fake": 0.5},
              population=4, seed=0, storage=f"sqlite:///{tmp_path / 's.db'}", calibration=3, log=lambda s: None)
    r = search(mlp_space(), PROXIES["naswot"], batch, trials=10, **kw)
    assert len(r.candidates) == 10 and dev.measured == 3  # only the calibration candidates were measured
    assert r.best is not None and r.best.feasible
    assert r.best.metrics["size_mb"] <= 0.004 and r.best.metrics["latency_ms"]["fake"] <= 0.5
    assert r.best.metrics["latency_label"] == "predicted"
    assert r.best.metrics["score"] == max(c.metrics["score"] for c in r.candidates if c.feasible)
    assert all(c.feasible for c in r.front) and r.best in r.front
    lm = r.latency_models["fake"]
    assert lm["label"] == "predicted" and lm["predictor"] == "devices.predictor.LatencyPredictor"
    assert lm["fitted_on"] == 3 and lm["held_out"]["n"] == 3 and lm["model"]["points"]
    # Resume: the study keeps its trials and its latency model; only the missing trials run.
    r2 = search(mlp_space(), PROXIES["naswot"], batch, trials=14, **kw)
    assert len(r2.candidates) == 14 and dev.measured == 3
    assert r2.scored <= 4


def test_pareto_front_is_non_dominated():
    from compressor.search.nsga import Candidate

    def c(k, score, size, feasible=True):
        return Candidate("mlp", {}, k, {"score": score, "size_mb": size}, feasible)

    cands = [c("a", 1.0, 1.0), c("b", 2.0, 2.0), c("c", 1.5, 2.5), c("d", 3.0, 0.5, feasible=False)]
    assert [x.key for x in pareto(cands, ["score", "size_mb"])] == ["b", "a"]


def test_no_candidate_meets_the_budgets_names_the_tightest(tmp_path, batch):
    r = search(mlp_space(), PROXIES["params"], batch, defaults=DEFAULTS, size_mb=1e-6, trials=4, population=2,
               storage=f"sqlite:///{tmp_path / 's.db'}", log=lambda s: None)
    assert r.best is None and r.front == []
    msg = tightest(r, 1e-6, {})
    assert "size_mb 1e-06" in msg and "\n" not in msg
    # With a latency budget further out of reach than the size budget, latency is named.
    r = search(mlp_space(), PROXIES["params"], batch, defaults=DEFAULTS, devices={"fake": FakeDevice()},
               size_mb=0.002, latency_ms={"fake": 1e-6}, trials=4, population=2, calibration=3,
               storage=f"sqlite:///{tmp_path / 't.db'}", log=lambda s: None)
    assert r.best is None
    assert "tightest is latency_ms[fake] 1e-06" in tightest(r, 0.002, {"fake": 1e-6})


@pytest.mark.slow
def test_pipeline_search_stage(tmp_path, tiny_recipe):
    import compressor
    from compressor.bundle import read_manifest, verify
    from compressor.models import build_model

    # No targets: latency (measured through ONNX Runtime) is covered above with a fake device, and
    # keeping it out keeps this test quick on a shared machine.
    tiny_recipe["search"] = {"trials": 8, "population": 4, "batch_size": 32}
    tiny_recipe["budgets"] = {"size_mb": 0.05}
    tiny_recipe["targets"] = []
    tiny_recipe["distill"]["epochs"] = 1
    out = compressor.run(tiny_recipe, tmp_path / "b", log=lambda s: None)
    m = read_manifest(out)
    verify(out)
    rec = next(s for s in m["stages"] if s["name"] == "search")
    assert rec["outputs"]["plot"] == "search/pareto.png" and (out / "search" / "pareto.png").stat().st_size > 1000
    assert rec["metrics"]["front"] and rec["metrics"]["best"]["feasible"]
    student = m["student"]
    assert student["search"]["genes"] == rec["metrics"]["best"]["genome"]
    rebuilt = build_model(student["model"], student["config"], student["defaults"])
    assert sum(p.numel() for p in rebuilt.parameters()) == rec["metrics"]["best"]["metrics"]["params"]
    cands = json.loads((out / "search" / "candidates.json").read_text())
    assert len(cands["candidates"]) == 8


@pytest.mark.slow
def test_pipeline_search_budget_nobody_meets(tmp_path, tiny_recipe):
    import compressor

    tiny_recipe["search"] = {"trials": 3, "population": 2, "batch_size": 16}
    tiny_recipe["budgets"] = {"size_mb": 1e-5}
    tiny_recipe["targets"] = []
    with pytest.raises(UserError, match=r"tightest is size_mb 1e-05"):
        compressor.run(tiny_recipe, tmp_path / "b", log=lambda s: None)


@pytest.mark.slow
def test_cli_search_writes_best_and_resumes(tmp_path, tiny_recipe):
    import yaml

    from compressor.cli import main

    tiny_recipe["search"] = {"trials": 6, "population": 3, "batch_size": 16}
    tiny_recipe["budgets"] = {"size_mb": 0.05}
    tiny_recipe["targets"] = []
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(tiny_recipe))
    out = tmp_path / "s"
    assert main(["search", str(path), "--out", str(out)]) == 0
    best = json.loads((out / "best.json").read_text())
    assert best["student"]["model"] == "resnet" and best["metrics"]["size_mb"] <= 0.05
    assert (out / "pareto.png").is_file() and (out / "search.db").is_file()
    # Rerun with more trials: the study resumes from search.db.
    assert main(["search", str(path), "--out", str(out), "--set", "search.trials=8"]) == 0
    assert json.loads((out / "best.json").read_text())["trials"] == 8
    # A budget nobody meets: one line, exit code 2.
    assert main(["search", str(path), "--out", str(tmp_path / "t"), "--set", "budgets.size_mb=0.00001"]) == 2


def test_search_latency_predictor_is_devices_predictor(batch):
    """The search fits devices.predictor on its measured candidates: few points, few features; its
    cross-validated error and the whole predictor go into the record, which loads back."""
    from devices.predictor import LatencyPredictor
    from compressor.search.latency import FEW, calibrate, candidate_features, record

    space, dev = mlp_space(), FakeDevice()
    genomes = [{"layers": 1, "width_0": w, "width_1": 8} for w in (8, 16, 32, 64)]

    def build(g):
        return space.build(g, DEFAULTS)

    p = calibrate("fake", dev, build, genomes, batch[0][:1], log=lambda s: None)
    assert isinstance(p, LatencyPredictor) and dev.measured == 4 and set(p.features) <= set(FEW)
    rec = record(p)
    assert rec["fitted_on"] == 4 and rec["held_out"]["n"] == 4 and rec["label"] == "predicted"
    q = LatencyPredictor.from_dict(rec["model"])
    f = candidate_features(build({"layers": 2, "width_0": 32, "width_1": 16}), batch[0][:1])
    assert [k["op"] for k in f["kernels"]] == ["linear", "linear", "linear"]
    assert q.predict_ms(f) == p.predict_ms(f) > 0
    # the bigger model never predicts faster than the smaller (non-negative additive costs)
    small = candidate_features(build(genomes[0]), batch[0][:1])
    big = candidate_features(build(genomes[-1]), batch[0][:1])
    assert p.method != "additive" or p.predict_ms(big) >= p.predict_ms(small)


def test_search_uses_a_given_predictor_without_measuring(tmp_path, batch):
    from devices.predictor import LatencyPredictor

    pts = [({"flops": f, "params": f / 10}, 0.01 + f * 1e-6) for f in (1e3, 5e3, 2e4, 8e4)]
    pred = LatencyPredictor.fit("fake", pts, method="additive")
    dev = FakeDevice()
    r = search(mlp_space(), PROXIES["params"], batch, defaults=DEFAULTS, devices={"fake": dev}, trials=4,
               population=2, storage=f"sqlite:///{tmp_path / 's.db'}", predictors={"fake": pred}, log=lambda s: None)
    assert dev.measured == 0 and r.latency_models["fake"]["fitted_on"] == 4
    assert all(c.metrics["latency_label"] == "predicted" for c in r.candidates)
    c = r.candidates[0]
    assert c.metrics["latency_ms"]["fake"] == pytest.approx(0.01 + c.metrics["flops"] * 1e-6, rel=1e-6)


def test_recipe_search_predictor_from_compress_calibrate(tmp_path, tiny_recipe, capsys, monkeypatch):
    """search.predictor: a file `compress calibrate` wrote predicts its target; nothing is measured, and
    the record names the file and its stored cross-validated error."""
    import shutil

    import yaml

    from compressor import calibrate
    from compressor.cli import main
    from compressor.data import load_data
    from compressor.models import ResNet
    from compressor.recipe import load_recipe
    from compressor.search import latency, nsga
    from compressor.stages import search as stage
    from devices.predictor import LatencyPredictor

    monkeypatch.setattr(calibrate, "SPARE_CORES", 99.0)  # a busy CI machine: this test is not about load

    assert main(["calibrate", "local-cpu", "--samples", "6", "--rounds", "1", "--runs", "10", "--max-seconds", "0.3",
                 "--out", str(tmp_path / "predictors"), "--json"]) == 0
    capsys.readouterr()
    path = tmp_path / "predictors" / "local-cpu-digits.json"
    stored = LatencyPredictor.load(path).meta["cross_validation"]

    def no_measuring(*a, **k):
        raise AssertionError("a target with a calibrated predictor is never measured by the search")

    monkeypatch.setattr(latency, "measure_model", no_measuring)
    monkeypatch.setattr(nsga, "measure_model", no_measuring)
    search = {"proxy": "params", "trials": 4, "population": 2, "batch_size": 16, "predictor": str(path)}
    r = load_recipe({**tiny_recipe, "search": search})
    data = load_data(r.data, 0)
    teacher = ResNet(widths=(8, 16), depths=(1, 1), in_channels=1)
    lines = []
    _, result, _ = stage.run_search(r, data, teacher, r.search, tmp_path / "run", log=lines.append)
    rec = result.latency_models["local-cpu"]
    assert rec["source"] == str(path) and rec["held_out"] == stored and rec["fitted_on"] == 6
    assert rec["device"] == "local-cpu" and rec["space"] == "digits"
    assert any(f"predicted by {path}" in ln and "5-fold MAPE" in ln for ln in lines)
    assert all(c.metrics["latency_label"] == "predicted" and c.metrics["latency_ms"]["local-cpu"] > 0
               for c in result.candidates)

    # A target that cannot be reached now is still predicted (a board over SSH, here a closed port).
    if shutil.which("ssh"):
        board = tmp_path / "board.yaml"
        board.write_text(yaml.safe_dump({"name": "far-board", "kind": "cpu", "runtime": "onnxruntime",
                                         "connection": "ssh://nobody@127.0.0.1:1", "options": {"connect_timeout_s": 2}}))
        far = LatencyPredictor.load(path)
        far.device = "far-board"
        far.save(tmp_path / "far.json")
        r = load_recipe({**tiny_recipe, "targets": [str(board)],
                         "search": {**search, "predictor": str(tmp_path / "far.json")}})
        lines = []
        _, result, _ = stage.run_search(r, data, teacher, r.search, tmp_path / "far", log=lines.append)
        assert any("cannot be measured now" in ln for ln in lines)
        assert result.latency_models[str(board)]["source"] == str(tmp_path / "far.json")

    # One line each: a missing file, a malformed one, another device's predictor, and measure with a predictor.
    for bad, msg in ((tmp_path / "nope.json", "search.predictor: latency predictor .* does not exist"),
                     (tmp_path / "bad.json", "search.predictor: latency predictor .* is not readable"),
                     (tmp_path / "far.json", "calibrated for device 'far-board', which is not one of the recipe's targets")):
        (tmp_path / "bad.json").write_text("[1, 2]")
        with pytest.raises(UserError, match=msg) as e:
            latency.load_predictors(load_recipe({**tiny_recipe, "search": {**search, "predictor": str(bad)}}))
        assert "\n" not in str(e.value)
    with pytest.raises(Exception, match="predictor goes with latency: predict"):
        load_recipe({**tiny_recipe, "search": {**search, "latency": "measure"}})
