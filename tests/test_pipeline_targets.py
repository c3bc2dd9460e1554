"""One run for several target families: each gets its own file, measured or estimated, and a target that
cannot be reached or built here is reported while the rest of the bundle is written."""
import json

import pytest

import compressor
from conftest import TINY


def test_targets_get_their_own_files(tmp_path):
    pytest.importorskip("openvino")
    pytest.importorskip("litert_torch")
    r = json.loads(json.dumps(TINY))
    r["distill"]["epochs"] = 1
    r["targets"] = ["local-cpu", "openvino-cpu", "ethos-u55-128", "ethos-u85-256", "jetson-orin-nano"]
    m = compressor.verify(compressor.run(r, tmp_path / "b", log=lambda s: None))
    files = set(m["files"])
    assert {"model/student.xml", "model/student.bin", "model/student.int8.tflite"} <= files
    assert any(f.endswith("ethos-u55-128_vela.tflite") for f in files)
    assert any(f.endswith("ethos-u85-256_vela.tflite") for f in files)
    assert any(f.endswith(".sh") for f in files)  # the trtexec script, even without TensorRT

    by_device = {}
    for x in m["measurements"]:
        by_device.setdefault(x["device"], []).append(x)
    assert all(not x["estimated"] for x in by_device["local-cpu"] + by_device["openvino-cpu"])
    assert {x["artifact"] for x in by_device["openvino-cpu"]} == {"model/student.xml", "work/teacher.onnx"}
    for npu in ("ethos-u55-128", "ethos-u85-256"):
        assert [x["estimated"] for x in by_device[npu]] == [True]
    assert "jetson-orin-nano" not in by_device
    export = next(s for s in m["stages"] if s["name"] == "export")["metrics"]["targets"]
    assert export["jetson-orin-nano"]["problems"] and export["openvino-cpu"]["problems"] == []
    prof = next(s for s in m["stages"] if s["name"] == "profile")["metrics"]
    assert "jetson-orin-nano" in prof["unavailable"]
    assert prof["openvino-cpu"]["speedup_b1"] > 0 and "speedup_b1" not in prof.get("ethos-u55-128", {})
