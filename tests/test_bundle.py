import json
import shutil

import pytest

from compressor.bundle import BundleError, atomic_write, read_manifest, verify


def copy(bundle, tmp_path):
    dst = tmp_path / "b"
    shutil.copytree(bundle, dst)
    return dst


def test_bundle_layout_and_manifest(tiny_bundle):
    m = verify(tiny_bundle)
    assert {"model/student.onnx", "model/student.pt", "recipe.yaml", "report.md", "bench.py"} <= set(m["files"])
    assert not any(p.name.endswith(".tmp") for p in tiny_bundle.rglob("*"))
    assert not (tiny_bundle.parent / "tiny.partial").exists()
    names = [s["name"] for s in m["stages"]]
    assert {"analyze", "distill", "export", "profile"} <= set(names)
    # Each stage's parent is the last one before it that did something (skipped stages are no parent).
    ran = [s["name"] for s in m["stages"] if not s.get("skipped")]
    assert [s["parent"] for s in m["stages"] if s["name"] in ran] == [None, *ran[:-1]]
    for s in m["stages"]:
        assert s["seconds"] >= 0 and isinstance(s["config"], dict) and isinstance(s["metrics"], dict)
    art = m["artifacts"][0]
    assert art["format"] == "onnx" and art["opset"] == 17 and art["inputs"][0]["shape"][0] == "batch"
    assert art["sha256"] == m["files"]["model/student.onnx"]["sha256"]
    assert {"torch", "onnx", "onnxruntime", "pytorch-lightning"} <= set(m["toolchain"])
    assert 0 <= m["quality"]["teacher"]["accuracy"] <= 1 and 0 <= m["quality"]["student"]["accuracy"] <= 1
    meas = m["measurements"]
    assert {x["artifact"] for x in meas} == {"model/student.onnx", "work/teacher.onnx"}
    assert all(x["estimated"] is False and x["threads"] == 2 and x["p50_ms"] > 0 for x in meas)
    assert m["student"]["config"] == {"widths": [4, 8], "depths": [1, 1]}


def test_flipped_byte_is_caught(tiny_bundle, tmp_path):
    b = copy(tiny_bundle, tmp_path)
    onnx = b / "model" / "student.onnx"
    data = bytearray(onnx.read_bytes())
    data[len(data) // 2] ^= 0x01
    onnx.write_bytes(bytes(data))
    with pytest.raises(BundleError, match="model/student.onnx: modified"):
        verify(b)


def test_missing_and_extra_files(tiny_bundle, tmp_path):
    b = copy(tiny_bundle, tmp_path)
    (b / "report.md").unlink()
    with pytest.raises(BundleError, match="report.md: missing"):
        verify(b)
    b2 = copy(tiny_bundle, tmp_path / "x")
    (b2 / "model" / "evil.onnx").write_bytes(b"x")
    with pytest.raises(BundleError, match="evil.onnx: not listed"):
        verify(b2)


def test_truncated_manifest_and_wrong_schema(tiny_bundle, tmp_path):
    b = copy(tiny_bundle, tmp_path)
    text = (b / "manifest.json").read_text()
    (b / "manifest.json").write_text(text[: len(text) // 2])
    with pytest.raises(BundleError, match="not valid JSON"):
        verify(b)
    m = json.loads(text)
    m["schema"] = "compressor.manifest/99"
    (b / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(BundleError, match="schema"):
        read_manifest(b)
    with pytest.raises(BundleError, match="manifest.json is missing"):
        verify(tmp_path / "nothing")


def test_manifest_paths_cannot_leave_the_bundle(tiny_bundle, tmp_path):
    b = copy(tiny_bundle, tmp_path)
    m = json.loads((b / "manifest.json").read_text())
    m["files"]["../outside"] = {"sha256": "0" * 64}
    (b / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(BundleError, match="leaves the bundle"):
        verify(b)


def test_atomic_write_leaves_no_temp(tmp_path):
    p = atomic_write(tmp_path / "a" / "f.txt", "hello")
    assert p.read_text() == "hello"
    assert [x.name for x in p.parent.iterdir()] == ["f.txt"]


def test_report_has_the_figures(tiny_bundle):
    text = (tiny_bundle / "report.md").read_text()
    assert "| teacher |" in text and "| student |" in text and "local-cpu p50 b1 (ms)" in text
    assert "faster on local-cpu at batch 1" in text and "measured" in text
