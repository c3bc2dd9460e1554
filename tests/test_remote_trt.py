"""TensorRT over SSH: bench_trtexec.py parses trtexec's --exportTimes trace and its performance summary
into the measurement JSON. TensorRT does not install here, so the parsing runs on a hand-written sample
in trtexec's format (tests/trtexec_sample/), replayed on the loopback board by a fake `trtexec`; a board
without trtexec says so in one line."""
import json
import os
from pathlib import Path

import pytest

from devices import DeviceError, get_device
from devices.bench_trtexec import parse_summary, parse_times, result, trtexec_args
from devices.remote import RemoteDevice
from test_remote import Sshd, _board_tmp_dirs, pytestmark, student, sshd  # noqa: F401 (fixtures)

SAMPLE = Path(__file__).parent / "trtexec_sample"
TIMED = [38.356, 38.372, 38.391, 38.349, 38.418, 38.402, 38.365, 38.377, 38.511, 38.384, 38.396, 38.361]


def test_parse_recorded_trtexec_output():
    s = parse_summary((SAMPLE / "trtexec.log").read_text())
    assert s["tensorrt_version"] == "10.3.0" and s["gpu"] == "Orin" and s["compute_capability"] == "8.7"
    assert s["warmup_queries"] == 5 and s["queries"] == 12 and s["throughput_qps"] == pytest.approx(25.9931)
    gpu = s["metrics"]["GPU Compute Time"]
    assert gpu == {"min": 38.349, "max": 38.511, "mean": 38.3902, "median": 38.3805, "p90": 38.418,
                   "p95": 38.511, "p99": 38.511}
    assert s["metrics"]["Latency"]["median"] == 38.4415 and "H2D Latency" in s["metrics"]
    assert "Total GPU Compute Time" not in s["metrics"]
    # the trace holds the 5 warm-up queries too; trtexec's rule (compute started before --warmUp) drops them
    compute, latency = parse_times(json.loads((SAMPLE / "times.json").read_text()), 200)
    assert compute == TIMED and len(latency) == 12 and latency[0] == pytest.approx(38.417)
    r = result(compute, latency, s, batch=1, threads=0, shapes={"input": [1, 1, 16, 16]}, precision="int8",
               warmup_ms=200, command=["trtexec", "--onnx=student.onnx", "--int8", "--fp16"])
    assert r["runtime"] == "tensorrt" and r["runtime_version"] == "10.3.0" and not r["estimated"]
    assert r["runs"] == 12 and r["warmup"] == 5 and r["min_ms"] == 38.349
    assert r["p50_ms"] == pytest.approx(gpu["median"]) and r["mean_ms"] == pytest.approx(gpu["mean"], abs=1e-4)
    assert 0 < r["cv"] < 0.01 and r["host"]["gpu"] == "Orin" and r["host"]["compute_capability"] == "8.7"
    assert r["extra"]["precision_flags"] == ["--int8", "--fp16"]
    assert r["extra"]["latency_with_transfers"]["p50_ms"] == pytest.approx(38.4415)
    # no trace: the summary line is the measurement, and says so
    r = result([], [], s, batch=1, threads=0, shapes={}, precision="fp32", warmup_ms=200, command=["trtexec"])
    assert (r["p50_ms"], r["p90_ms"], r["p99_ms"]) == (38.3805, 38.418, 38.511) and "summary" in r["notes"][0]
    with pytest.raises(SystemExit, match="no timing"):
        result([], [], {"metrics": {}}, batch=1, threads=0, shapes={}, precision="fp32", warmup_ms=1, command=[])


def test_trtexec_arguments():
    a = trtexec_args("m.onnx", precision="int8", shapes={"input": [2, 1, 16, 16]}, warmup_ms=200, runs=50)
    assert a == ["--onnx=m.onnx", "--int8", "--fp16", "--shapes=input:2x1x16x16", "--warmUp=200",
                 "--iterations=50", "--duration=0", "--exportTimes=times.json"]
    assert "--noTF32" in trtexec_args("m.onnx") and "--fp16" in trtexec_args("m.onnx", precision="fp16")
    assert trtexec_args("m.engine")[0] == "--loadEngine=m.engine"
    with pytest.raises(SystemExit, match="precision 'bf16'"):
        trtexec_args("m.onnx", precision="bf16")


def _fake_trtexec(where: Path) -> Path:
    """A `trtexec` that replays the sample: copies the trace to --exportTimes, prints the log, and keeps
    its arguments for the test to read."""
    fake = where / "trtexec"
    fake.write_text(f"""#!/bin/sh
echo "$@" > {where / 'args'}
for a in "$@"; do
  case "$a" in --exportTimes=*) cp {SAMPLE / 'times.json'} "${{a#--exportTimes=}}";; esac
done
cat {SAMPLE / 'trtexec.log'}
""")
    fake.chmod(0o755)
    return fake


def test_tensorrt_through_loopback_sshd(sshd, student, tmp_path):
    fake = _fake_trtexec(tmp_path)
    before = _board_tmp_dirs(sshd)
    prof = sshd.profile(tmp_path / "trt.yaml", runtime="tensorrt", precisions=["fp32", "fp16", "int8"],
                        trtexec=str(fake), warmup_ms=200)
    dev = get_device(str(prof))
    assert isinstance(dev, RemoteDevice) and dev.why_unavailable() is None
    m = dev.measure(student, batch=2, runs=12, precision="int8")
    assert not m.estimated and m.runtime == "tensorrt" and m.runtime_version == "10.3.0" and m.runs == 12
    assert m.provider == "trtexec" and m.input_shapes == {"input": [2, 1, 16, 16]} and m.precision == "int8"
    assert m.p50_ms == pytest.approx(38.3805) and m.host["gpu"] == "Orin"
    assert m.host["connection"].endswith(f"127.0.0.1:{sshd.port}")
    args = (tmp_path / "args").read_text().split()
    assert args[:3] == ["--onnx=student.onnx", "--int8", "--fp16"] and "--shapes=input:2x1x16x16" in args
    assert "--warmUp=200" in args and "--iterations=12" in args
    assert _board_tmp_dirs(sshd) == before, "the temporary directory on the board is removed"


def test_board_without_trtexec_is_one_line(sshd, student, tmp_path):
    prof = sshd.profile(tmp_path / "trt.yaml", runtime="tensorrt", trtexec=str(tmp_path / "no-such-trtexec"))
    dev = get_device(str(prof))
    why = dev.why_unavailable()
    assert why.startswith("remote board") and "trtexec not found on the board" in why and "\n" not in why
    assert "options.trtexec" in why
    with pytest.raises(DeviceError, match="failed: trtexec not found on the board") as e:
        dev.measure(student, runs=5)
    assert "\n" not in str(e.value)
    # the default search: PATH, then JetPack's place (neither exists here)
    if not any(os.access(os.path.join(p, "trtexec"), os.X_OK) for p in os.environ.get("PATH", "").split(":")):
        dev = get_device(str(sshd.profile(tmp_path / "d.yaml", runtime="tensorrt")))
        assert "looked for trtexec, /usr/src/tensorrt/bin/trtexec" in dev.why_unavailable()


def test_trtexec_failure_is_one_line(sshd, student, tmp_path):
    bad = tmp_path / "trtexec"
    bad.write_text("#!/bin/sh\necho '[11/28/2026-09:14:03] [E] Error[4]: [network.cpp::validate::3100] Error Code 4: "
                   "Internal Error (input: dynamic input is missing dimensions in profile 0.)'\n"
                   "echo '&&&& FAILED TensorRT.trtexec [TensorRT v100300]'\nexit 1\n")
    bad.chmod(0o755)
    dev = get_device(str(sshd.profile(tmp_path / "t.yaml", runtime="tensorrt", trtexec=str(bad))))
    with pytest.raises(DeviceError, match=r"trtexec failed \(exit status 1\): Error\[4\].*missing dimensions") as e:
        dev.measure(student, runs=5)
    assert "\n" not in str(e.value)
