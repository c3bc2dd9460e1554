"""The latency predictor: recovers known cost models, picks its method by cross-validation, is always an
estimate, round-trips through JSON with its device and fit date, refits on new measurements; and
`compress calibrate` end to end on a few digits candidates."""
import json
import random

import pytest

from devices import DeviceError
from devices.predictor import LatencyPredictor, Prediction, accuracy, cross_validate


def _additive(n, seed=0):
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        f = {"flops": rng.uniform(1e6, 5e8), "activations": rng.uniform(1e4, 2e6), "n_Conv2d": rng.randint(3, 20),
             "input_elements": 1024}
        y = 0.05 + 2e-8 * f["flops"] + 1e-7 * f["activations"] + 0.01 * f["n_Conv2d"]
        out.append((f, y))
    return out


def _power(n, seed=0):
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        f = {"flops": 10 ** rng.uniform(5, 9), "params": 10 ** rng.uniform(3, 6)}
        out.append((f, 3e-4 * f["flops"] ** 0.6 * f["params"] ** 0.1))
    return out


def test_additive_model_is_recovered_and_labelled_estimated():
    p = LatencyPredictor.fit("board", _additive(40), method="additive")
    acc = accuracy(p, _additive(20, seed=1))
    assert acc["n"] == 20 and acc["within_10pct"] == 1.0 and acc["mape"] < 0.01
    r = p.predict(_additive(1, seed=2)[0][0])
    assert isinstance(r, Prediction) and r.estimated and r.label == "estimated" and r.device == "board"
    assert "input_elements" not in p.features and p.constants == {"input_elements": 1024.0}
    assert all(c >= 0 for c in p.coef) and p.intercept >= 0  # more work never predicts less time


def test_cross_validation_holds_out_every_point_once():
    cv = cross_validate(LatencyPredictor.fit("board", _additive(25), method="additive"))
    assert cv["n"] == 25 and cv["within_10pct"] == 1.0 and cv["mape"] < 0.01


def test_auto_picks_the_method_that_cross_validates_better():
    pa = LatencyPredictor.fit("board", _additive(40))
    pp = LatencyPredictor.fit("board", _power(40))
    assert set(pa.cv_mape) == set(pp.cv_mape) == {"additive", "loglinear"}
    assert pa.method == "additive" and pp.method == "loglinear"
    assert accuracy(pp, _power(20, seed=3))["mape"] < 0.05


def test_json_round_trip_keeps_device_date_and_predictions(tmp_path):
    p = LatencyPredictor.fit("raspberry-pi-5", _additive(30), space="digits")
    path = p.save(tmp_path / "pi.json")
    d = json.loads(path.read_text())
    assert d["device"] == "raspberry-pi-5" and d["space"] == "digits" and d["fitted_at"].startswith("20")
    q = LatencyPredictor.load(path)
    f = _additive(1, seed=5)[0][0]
    assert q.predict_ms(f) == pytest.approx(p.predict_ms(f), rel=1e-12)
    with pytest.raises(DeviceError, match="does not exist: run `compress calibrate"):
        LatencyPredictor.load(tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text(json.dumps({**d, "schema": 99}))
    with pytest.raises(DeviceError, match="schema 99"):
        LatencyPredictor.load(tmp_path / "bad.json")


def test_update_refits_on_old_and_new_points():
    p = LatencyPredictor.fit("board", _additive(10))
    q = p.update(_additive(10, seed=7))
    assert len(q.points) == 20 and len(p.points) == 10 and q.device == "board"


def test_notes_for_what_calibration_did_not_cover():
    p = LatencyPredictor.fit("board", _additive(30), method="additive")
    f = {**_additive(1)[0][0], "flops": 1e12, "n_MultiheadAttention": 2, "input_elements": 4096}
    notes = " ".join(p.predict(f).notes)
    assert "outside the calibrated range" in notes and "n_MultiheadAttention" in notes and "input_elements" in notes


def test_bad_input():
    with pytest.raises(ValueError, match="at least 3"):
        LatencyPredictor.fit("board", _additive(2))
    with pytest.raises(ValueError, match="positive"):
        LatencyPredictor.fit("board", [({"flops": 1}, 1.0), ({"flops": 2}, 0.0), ({"flops": 3}, 1.0)])
    with pytest.raises(ValueError, match="method"):
        LatencyPredictor.fit("board", _additive(5), method="gbm")


def test_features_count_attention_and_layers():
    from compressor.calibrate import SPACES, features

    m, x = SPACES["transformer"][1]({"d_model": 32, "nhead": 2, "layers": 2, "ffn": 64})
    f = features(m, x)
    assert f["flops_attention"] == 2 * 4 * 64 * 64 * 32 and f["n_MultiheadAttention"] == 2
    assert f["flops"] == f["flops_matmul"] + f["flops_attention"] + f.get("flops_other", 0)
    m, x = SPACES["digits"][1]({"widths": [4, 8], "depths": [1, 1], "kernel": 3})
    f = features(m, x)
    assert f["n_Conv2d"] == 6 and f["flops_conv"] > 0 and f["activations"] > 0 and f["params"] > 0


def test_compress_calibrate_end_to_end(tmp_path, capsys, monkeypatch):
    from compressor import calibrate
    from compressor.cli import main

    # on a busy CI machine every 2-thread round may be disturbed: this test is about the plumbing
    monkeypatch.setattr(calibrate, "SPARE_CORES", 99.0)

    rc = main(["calibrate", "local-cpu", "--samples", "6", "--rounds", "1", "--runs", "10", "--max-seconds", "0.5",
               "--out", str(tmp_path), "--json"])
    assert rc == 0
    report = json.loads(capsys.readouterr().out)["digits"]
    assert report["n"] == 2 and report["train"] == 4 and 0 <= report["within_10pct"] <= 1 and report["mape"] >= 0
    p = LatencyPredictor.load(tmp_path / "local-cpu-digits.json")
    assert p.device == "local-cpu" and len(p.points) == 6 and p.meta["held_out"]["n"] == 2
    assert p.meta["cross_validation"]["n"] == 6 and 0 <= report["cv_within_10pct"] <= 1
    assert report["rounds_within_10pct"] is None and report["halves_within_10pct"] is None  # one round
    raw = json.loads((tmp_path / "local-cpu-digits.measurements.json").read_text())
    assert len(raw) == 6 and {"genome", "features", "rounds_ms", "min_ms", "latency_ms"} <= set(raw[0])
    assert raw[0]["features"]["kernels"][0]["op"] == "conv"  # the kernel list is kept for refits
    assert len(raw[0]["disturbed"]) == len(raw[0]["other_cores"]) == 1  # each round records the others' load
    assert any(k.startswith("k_conv_") for k in p.points[0]["features"])
    # --refit: the saved measurements, the same split, no new measurement
    capsys.readouterr()
    assert main(["calibrate", "local-cpu", "--samples", "6", "--refit", "--out", str(tmp_path), "--json"]) == 0
    again = json.loads(capsys.readouterr().out)["digits"]
    assert again["n"] == 2 and again["mape"] == pytest.approx(report["mape"])
    assert main(["calibrate", "local-cpu", "--refit", "--out", str(tmp_path / "none")]) == 2
    assert main(["calibrate", "no-such-device", "--out", str(tmp_path)]) == 2


def test_kernels_fold_bn_and_activation_into_conv():
    from compressor.calibrate import SPACES, features, kernels

    m, x = SPACES["digits"][1]({"widths": [8, 16], "depths": [1, 1], "kernel": 3})
    ks = kernels(m, x)
    # stem, block 1 (conv, conv, add), block 2 (conv, conv, 1x1 shortcut, add), pool, head
    assert [k["op"] for k in ks] == ["conv"] * 3 + ["add"] + ["conv"] * 3 + ["add", "pool", "linear"]
    assert ks[0] == {"op": "conv", "cin": 1, "cout": 8, "h": 32, "w": 32, "k": 3, "stride": 1, "groups": 1,
                     "out": 8 * 32 * 32, "act": "relu", "flops": 2 * 8 * 32 * 32 * 9}
    assert ks[2]["act"] == "" and ks[3]["act"] == "relu"  # conv2+bn2 has no ReLU; the add after it does
    assert ks[6]["k"] == 1 and ks[6]["stride"] == 2 and ks[4]["stride"] == 2
    f = features(m, x)
    assert sum(k["flops"] for k in ks if k["op"] in ("conv", "linear")) == f["flops_conv"] + f["flops_matmul"]
    m, x = SPACES["transformer"][1]({"d_model": 32, "nhead": 2, "layers": 2, "ffn": 64})
    ks = kernels(m, x)
    ops = [k["op"] for k in ks]
    from devices.predictor import kernel_features

    kf = kernel_features(ks)  # softmax elements: layers x heads x 64 queries x 64 keys
    assert kf["k_attention_scores"] == 2 * 2 * 64 * 64 and kf["k_attention_heads"] == 4
    assert ops.count("attention") == 2 and ops.count("norm") == 4 and ops.count("linear") == 2 * 4 + 1


def _conv(cin, cout, h=16, k=3, stride=1):
    ho = h // stride
    return {"op": "conv", "cin": cin, "cout": cout, "h": h, "w": h, "k": k, "stride": stride, "groups": 1,
            "out": cout * ho * ho, "act": "relu", "flops": 2 * cout * ho * ho * cin * k * k}


def test_kernel_features_split_conv_flops_by_alignment():
    from devices.predictor import expand, kernel_features

    f = kernel_features([_conv(16, 32), _conv(1, 16), _conv(12, 24), {"op": "add", "out": 100}])
    assert f["k_conv_flops_aa"] == _conv(16, 32)["flops"] and f["k_conv_flops_ao"] == _conv(1, 16)["flops"]
    assert f["k_conv_flops_ua"] == _conv(12, 24)["flops"] and f["k_conv_n"] == 3 and f["k_n"] == 4
    assert f["k_conv_flops"] == sum(_conv(*c)["flops"] for c in ((16, 32), (1, 16), (12, 24)))
    # 12 -> 24 channels pad to 16 -> 32: the vector unit does 16*32/(12*24) times the work
    pad = f["k_conv_padflops"] - _conv(16, 32)["flops"] - 16 * _conv(1, 16)["flops"]
    assert pad == pytest.approx(_conv(12, 24)["flops"] * 16 * 32 / (12 * 24))
    assert f["k_add_elements"] == 100 and f["k_add_n"] == 1
    assert expand({"flops": 5, "kernels": [_conv(16, 32)]})["k_conv_n"] == 1 and "kernels" not in expand({"flops": 5})


def test_per_kernel_costs_are_recovered_from_whole_model_latencies():
    """Aligned convolutions run at twice the FLOP rate of misaligned ones and each kernel has a fixed
    cost: the additive model over kernel features recovers it; FLOPs and params alone cannot."""
    rng = random.Random(0)

    def model():
        ks = [_conv(rng.choice([4, 8, 12, 16, 24, 32, 48, 64]), rng.choice([8, 12, 16, 24, 32, 48, 64]),
                    h=rng.choice([8, 16, 32]), k=rng.choice([1, 3, 5])) for _ in range(rng.randint(2, 8))]
        ms = 0.02 + sum(0.004 + k["flops"] * (1e-9 if k["cin"] % 16 == 0 and k["cout"] % 16 == 0 else 2e-9)
                        for k in ks)
        return {"flops": sum(k["flops"] for k in ks), "kernels": ks}, ms

    train, test = [model() for _ in range(60)], [model() for _ in range(20)]
    p = LatencyPredictor.fit("board", train, method="additive")
    assert accuracy(p, test)["within_10pct"] == 1.0 and "k_conv_flops_aa" in p.features
    assert "kernels" not in p.points[0]["features"]  # stored expanded: JSON numbers, refits without torch
    q = LatencyPredictor.fit("board", train, method="additive", only=["flops"])
    assert q.features == ["flops"] and q.only == ["flops"] and accuracy(q, test)["within_10pct"] < 0.9
    assert q.predict(test[0][0]).notes == []  # features left out on purpose are not "outside calibration"
    assert LatencyPredictor.from_dict(json.loads(q.to_json())).update(test).only == ["flops"]


def test_contention_counts_the_cores_other_processes_kept_busy():
    from devices.bench_onnxruntime import contention, cpu_snapshot

    # 1 s: this process used 2 CPU s, all CPUs together were busy 3 s: others held 1 core
    d = contention((10.0, 5.0, 100.0, 2), (11.0, 7.0, 103.0, 2))
    assert d == {"own_cores": 2.0, "cpus": 2, "other_cores": 1.0}
    assert "other_cores" not in contention((0.0, 0.0, None, 2), (1.0, 1.0, None, 2))  # no /proc/stat
    wall, own, busy, cpus = cpu_snapshot()
    assert wall > 0 and own > 0 and cpus >= 1 and (busy is None or busy > 0)


def test_a_round_is_disturbed_when_others_take_the_cores_the_run_needs():
    from compressor.calibrate import disturbed

    assert disturbed(1.0, 2, 2) and not disturbed(0.1, 2, 2)  # 2 threads on 2 cores: both must be free
    assert not disturbed(1.0, 2, 1) and disturbed(1.5, 2, 1)  # 1 thread: one free core is enough
    assert disturbed(0.5, 2, 0)  # threads 0: the runtime takes every core
    assert not disturbed(None, 2, 2) and not disturbed(1.0, None, 2)  # unknown: an old file, no /proc/stat


def _measured(genome_w, ms, flags):
    f = {"flops": 1e6 * genome_w, "activations": 1e3 * genome_w}
    return {"genome": {"w": genome_w}, "features": f, "rounds_ms": list(ms), "min_ms": list(ms), "cv": [0.0] * len(ms),
            **({"disturbed": flags, "other_cores": [1.0 if d else 0.0 for d in flags]} if flags is not None else {})}


def test_fit_leaves_out_candidates_that_never_had_the_cores_free(tmp_path):
    from compressor.calibrate import fit_and_report
    from compressor.errors import UserError

    # true latency 0.1 + 0.01 ms per unit of width; disturbed rounds ran at 1.8x (one core instead of two),
    # except that a small model may run faster with the other core taken: its best round counts
    pts = [_measured(w, [1.8 * (0.1 + 0.01 * w), 0.1 + 0.01 * w], [True, False]) for w in range(1, 16)]
    pts += [_measured(16, [0.26, 0.27], [True, False])]
    pts += [_measured(w, [1.8 * (0.1 + 0.01 * w)] * 2, [True, True]) for w in (17, 18, 19, 20)]
    logs = []
    r = fit_and_report("board", "digits", pts, holdout=0.25, seed=0, rounds=2, statistic="min", out_dir=tmp_path,
                       log=logs.append)
    assert r["disturbed_candidates"] == 4 and r["disturbed_rounds"] == 16 + 8 and r["rounds_measured"] == 40
    assert r["n"] + r["train"] == 16 and r["within_10pct"] == 1.0 and r["max_ms"] == pytest.approx(0.26)
    assert any("4 of 20 candidates" in line for line in logs)
    saved = json.loads((tmp_path / "board-digits.measurements.json").read_text())
    assert len(saved) == 20  # all kept, for refits
    # --count-disturbed: nothing is left out (the behaviour before)
    c = fit_and_report("board", "digits", [dict(p) for p in pts], holdout=0.25, seed=0, rounds=2, statistic="min",
                       out_dir=tmp_path / "c", count_disturbed=True, log=logs.append)
    assert c["disturbed_candidates"] == 0 and c["n"] + c["train"] == 20 and c["count_disturbed"]
    # a file from before the disturbance record: every candidate counts, as it did
    old = [_measured(w, [0.1 + 0.01 * w, 0.2 + 0.01 * w], None) for w in range(1, 13)]
    assert fit_and_report("board", "old", old, holdout=0.25, seed=0, rounds=2, statistic="min", out_dir=tmp_path,
                          log=logs.append)["disturbed_candidates"] == 0
    # nearly everything disturbed: no predictor of 1-thread speeds under a 2-thread name
    worse = [_measured(w, [1.0, 1.0], [True, True]) for w in range(1, 19)] + pts[:2]
    with pytest.raises(UserError, match="quieter machine"):
        fit_and_report("board", "busy", worse, holdout=0.25, seed=0, rounds=2, statistic="min", out_dir=tmp_path,
                       log=logs.append)


def test_candidates_without_an_undisturbed_round_are_measured_again(monkeypatch):
    from types import SimpleNamespace

    from compressor import calibrate

    calls = []

    class Busy:  # the first 3 windows find another process on a core, then the machine is quiet
        profile = SimpleNamespace(threads=2)

        def measure(self, path, **kw):
            calls.append(path)
            other = 1.0 if len(calls) <= 3 else 0.0
            return SimpleNamespace(p50_ms=2.0 if other else 1.0, min_ms=1.8 if other else 1.0, cv=0.0,
                                   extra={"other_cores": other, "cpus": 2})

    monkeypatch.setattr(calibrate, "SPACES", {"digits": (calibrate.sample_digits,
                                                         lambda g: calibrate.build_digits({**g, "widths": [4, 4], "depths": [1, 1]}))})
    pts = calibrate.measure_space("digits", Busy(), 2, rounds=1, extra_rounds=2, log=lambda s: None)
    # round 1: both disturbed; extra round 1: first disturbed, second clean; extra round 2: first only
    assert len(calls) == 2 + 2 + 1 and [p["disturbed"] for p in pts] == [[True, True, False], [True, False]]
    assert [p["latency_ms"] for p in pts] == [1.0, 1.0]  # the best round (here the undisturbed one)


def test_narrow_convolutions_pay_an_output_reorder():
    """ONNX Runtime reorders the output of a conv with fewer than 16 output channels back from its
    blocked layout: a cost per output element that wider convs do not pay; the fit recovers it."""
    from devices.predictor import kernel_features

    f = kernel_features([_conv(1, 8), _conv(8, 8), _conv(12, 24), _conv(16, 32)])
    assert f["k_conv_reorder"] == 2 * 8 * 16 * 16  # the two 8-wide outputs; 24 and 32 stay blocked
    assert "k_conv_reorder" not in kernel_features([_conv(12, 24)])
    rng = random.Random(1)

    def model():
        ks = [_conv(rng.choice([1, 4, 8, 16, 32]), rng.choice([4, 8, 16, 32, 64]), h=rng.choice([8, 16, 32]))
              for _ in range(rng.randint(2, 8))]
        ms = 0.02 + sum(0.003 + 1e-9 * k["flops"] + (2e-6 * k["out"] if k["cout"] < 16 else 0) for k in ks)
        return {"kernels": ks}, ms

    train, test = [model() for _ in range(80)], [model() for _ in range(20)]
    p = LatencyPredictor.fit("board", train, method="additive")
    assert "k_conv_reorder" in p.features and accuracy(p, test)["within_10pct"] == 1.0


def test_a_predictor_fitted_before_a_kernel_feature_existed_ignores_it():
    from devices.predictor import KERNEL_FEATURES

    rng = random.Random(2)
    samples = [({"kernels": [_conv(rng.choice([8, 16]), rng.choice([8, 16, 32]))] * rng.randint(1, 4)},
                rng.uniform(0.1, 0.3)) for _ in range(12)]
    d = json.loads(LatencyPredictor.fit("board", samples, method="additive").to_json())
    assert d["kernel_features"] == KERNEL_FEATURES
    # an older file: no k_conv_reorder among its inputs, no kernel_features field
    d["features"] = [k for k in d["features"] if k != "k_conv_reorder"]
    d["coef"], d["scale"] = d["coef"][:len(d["features"])], d["scale"][:len(d["features"])]
    for pt in d["points"]:
        pt["features"].pop("k_conv_reorder", None)
    del d["kernel_features"]
    old = LatencyPredictor.from_dict(d)
    assert old.kernel_features == 1 and old.predict(samples[0][0]).notes == []  # not "outside calibration"
    again = old.update(samples[:3])
    assert "k_conv_reorder" not in again.features and again.kernel_features == 1
    assert again.predict(samples[0][0]).notes == []
