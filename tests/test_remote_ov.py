"""OpenVINO over SSH: bench_openvino.py on the loopback board (the real sshd of test_remote.py) measures
the quickstart student as ONNX and as an IR (.xml + .bin copied together), at the shapes the profile
stage hands it; a refused host key is still refused."""
import json
import subprocess
import sys

import pytest
import torch

from devices import DeviceError, get_device
from devices.bench_openvino import resolve_shapes
from devices.remote import RemoteDevice, onnx_shapes
from test_remote import Sshd, _board_tmp_dirs, pytestmark, student, sshd  # noqa: F401 (fixtures)

pytest.importorskip("openvino")


@pytest.fixture(scope="module")
def student_ir(student):
    from exporters.openvino import export_openvino

    art = export_openvino(student, student.with_suffix(".xml"), precision="fp32", role="student")
    return student.with_suffix(".xml"), art


def test_resolve_shapes_like_the_local_device():
    ins = [("ids", [None, None]), ("image", [None, 3, 8, 8])]
    assert resolve_shapes(ins, 2, {"ids": [2, 32]}) == {"ids": [2, 32], "image": [2, 3, 8, 8]}
    assert resolve_shapes(ins, 4, dims={"sequence": 16}) == {"ids": [4, 16], "image": [4, 3, 8, 8]}
    with pytest.raises(SystemExit, match="dynamic axis 1 besides the batch .* --shape ids="):
        resolve_shapes(ins, 1)
    with pytest.raises(SystemExit, match="does not fit"):
        resolve_shapes(ins, 1, {"image": [1, 4, 8, 8], "ids": [1, 2]})


def test_onnx_shapes_resolve_named_axes(tmp_path):
    from exporters.onnx import export_onnx

    class Tokens(torch.nn.Module):
        def forward(self, ids, mask):
            return (ids.float() * mask).sum(-1)

    path = tmp_path / "tokens.onnx"
    torch.onnx.export(Tokens(), (torch.zeros(1, 8, dtype=torch.long), torch.ones(1, 8)), str(path),
                      input_names=["ids", "mask"], dynamo=False,
                      dynamic_axes={"ids": {0: "batch", 1: "sequence"}, "mask": {0: "batch", 1: "sequence"}})
    assert onnx_shapes(path, 3, {"sequence": 32}) == {"ids": [3, 32], "mask": [3, 32]}
    with pytest.raises(DeviceError, match="axis 1 \\(sequence\\) has no size"):
        onnx_shapes(path, 1, {})
    static = tmp_path / "static.onnx"
    export_onnx(torch.nn.Linear(4, 2), (torch.zeros(1, 4),), static, dynamic_batch=False)
    assert onnx_shapes(static, 1, {}, dynamic_only=True) == {}


def test_openvino_onnx_and_ir_through_loopback_sshd(sshd, student, student_ir, tmp_path):
    before = _board_tmp_dirs(sshd)
    dev = get_device(str(sshd.profile(tmp_path / "ov.yaml", runtime="openvino", precisions=["fp32", "bf16"])))
    assert isinstance(dev, RemoteDevice) and dev.why_unavailable() is None
    m = dev.measure(student, batch=2, warmup=2, runs=10, max_seconds=5)
    assert not m.estimated and m.label == "measured" and m.runtime == "openvino" and m.runs == 10
    assert m.input_shapes == {"input": [2, 1, 16, 16]} and m.provider == "CPU" and m.threads == 1
    assert m.extra["inference_precision_hint"] == "f32" and m.extra["compiled"]["INFERENCE_PRECISION_HINT"] == "f32"
    assert m.host["connection"].endswith(f"127.0.0.1:{sshd.port}") and "cpu_model" in m.host
    # The IR: its .bin travels with the .xml; shapes as the profile stage gives them (full, per input).
    xml, art = student_ir
    assert art.inputs[0]["shape"][0] == "?"  # the IR kept no axis name
    m = dev.measure(xml, batch=3, warmup=1, runs=5, max_seconds=5, dims={"input": [3, 1, 16, 16]})
    assert m.input_shapes == {"input": [3, 1, 16, 16]} and m.artifact == "student.xml" and m.runs == 5
    m = dev.measure(xml, batch=1, warmup=1, runs=5, max_seconds=5, precision="bf16")
    assert m.extra["inference_precision_hint"] == "bf16" and m.input_shapes == {"input": [1, 1, 16, 16]}
    assert _board_tmp_dirs(sshd) == before, "the temporary directory on the board is removed"


def test_openvino_ir_without_its_bin_is_one_line(sshd, student_ir, tmp_path):
    xml, _ = student_ir
    lonely = tmp_path / "lonely.xml"
    lonely.write_bytes(xml.read_bytes())
    dev = get_device(str(sshd.profile(tmp_path / "ov.yaml", runtime="openvino")))
    with pytest.raises(DeviceError, match="weights lonely.bin are not beside it"):
        dev.measure(lonely, runs=5)


def test_openvino_cli_profile_through_ssh(sshd, student, tmp_path):
    prof = sshd.profile(tmp_path / "ov.yaml", runtime="openvino", target_cv=10.0)
    r = subprocess.run([sys.executable, "-m", "compressor.cli", "profile", str(student), "--device", str(prof),
                        "--runs", "500", "--warmup", "1", "--json"], capture_output=True, text=True, timeout=180)
    assert r.returncode == 0, r.stderr
    (m,) = json.loads(r.stdout)
    assert m["runtime"] == "openvino" and m["extra"]["stop"] == "stable" and m["runs"] == 20


def test_openvino_board_without_openvino_and_unknown_host_key(sshd, student, tmp_path):
    fake = tmp_path / "fake-python"
    fake.write_text("#!/bin/sh\necho \"ModuleNotFoundError: No module named 'openvino'\" >&2\nexit 1\n")
    fake.chmod(0o755)
    dev = get_device(str(sshd.profile(tmp_path / "a.yaml", runtime="openvino", python=str(fake))))
    assert "cannot import openvino and numpy" in dev.why_unavailable()
    (tmp_path / "empty_known_hosts").write_text("")
    dev = get_device(str(sshd.profile(tmp_path / "b.yaml", runtime="openvino",
                                      known_hosts=str(tmp_path / "empty_known_hosts"))))
    assert "not in known_hosts" in dev.why_unavailable()
    with pytest.raises(DeviceError, match="not in known_hosts") as e:
        dev.measure(student, runs=5)
    assert "\n" not in str(e.value)
    assert (tmp_path / "empty_known_hosts").read_text() == "", "the key is never added silently"
