"""The GPU device: what can be checked without a GPU runs here; the CUDA/TensorRT paths skip with a reason."""
import json

import pytest
import torch
from torch import nn

import devices.gpu as gpu
from devices import DeviceError, get_device
from devices.remote import RemoteDevice

NO_CUDA = "no CUDA GPU on this machine (torch.cuda.is_available() is False)"


def test_unavailable_without_cuda_says_why():
    if torch.cuda.is_available():
        pytest.skip("a CUDA GPU is present")
    dev = get_device("h100")
    assert not dev.available() and "no CUDA GPU here" in dev.why_unavailable()
    with pytest.raises(DeviceError, match="not available"):
        dev.measure("model.onnx")
    # a board over SSH is a RemoteDevice; the shipped Jetson's host does not resolve here
    jetson = get_device("jetson-orin-nano")
    assert isinstance(jetson, RemoteDevice) and not jetson.available()
    assert "jetson-orin-nano.local" in jetson.why_unavailable()
    # the local-only class, handed a remote profile directly, says where remote boards go
    assert "RemoteDevice" in gpu.GPUDevice(jetson.profile).why_unavailable()


@pytest.fixture
def fake_h100(monkeypatch):
    """Pretend TensorRT and CUDA exist, to reach the checks that run before any GPU call."""
    class FakeTRT:
        __version__ = "10.13.0.35"

    monkeypatch.setattr(gpu, "_trt", lambda: FakeTRT)
    monkeypatch.setattr(gpu, "_torch_cuda", lambda: torch)
    monkeypatch.setattr(gpu, "_ort_cuda", lambda: False)
    monkeypatch.setattr(gpu, "gpu_host", lambda: {"gpu": "NVIDIA H100 80GB HBM3", "compute_capability": "9.0"})
    return get_device("h100")


def _engine(tmp_path, **meta):
    e = tmp_path / "student.engine"
    e.write_bytes(b"\0engine")
    e.with_name("student.engine.json").write_text(json.dumps(
        {"tensorrt": "10.13.0.35", "gpu": "Orin", "compute_capability": "8.7", "precision": "fp16", **meta}))
    return e


def test_engine_built_for_another_gpu(fake_h100, tmp_path):
    with pytest.raises(DeviceError, match=r"built for compute capability 8.7 \(Orin\), this GPU is 9.0") as e:
        fake_h100.measure(_engine(tmp_path), precision="fp16")
    assert "\n" not in str(e.value)


def test_engine_built_with_another_tensorrt(fake_h100, tmp_path):
    with pytest.raises(DeviceError, match="built with TensorRT 8.6.1"):
        fake_h100.measure(_engine(tmp_path, compute_capability="9.0", tensorrt="8.6.1"), precision="fp16")


def test_precision_and_file_checks(fake_h100, tmp_path):
    with pytest.raises(DeviceError, match="does not list precision 'int4'"):
        fake_h100.measure(_engine(tmp_path), precision="int4")
    with pytest.raises(DeviceError, match="was built for fp16, not fp32"):
        fake_h100.measure(_engine(tmp_path, compute_capability="9.0"), precision="fp32")
    onnx = tmp_path / "m.onnx"
    onnx.write_bytes(b"x")
    with pytest.raises(DeviceError, match="no CUDAExecutionProvider"):
        fake_h100.measure(onnx)
    with pytest.raises(DeviceError, match="needs example="):
        fake_h100.measure(nn.Linear(2, 2))


@pytest.mark.skipif(not torch.cuda.is_available(), reason=NO_CUDA)
def test_torch_cuda_measures_a_small_cnn():
    model = nn.Sequential(nn.Conv2d(1, 8, 3), nn.ReLU(), nn.Flatten(), nn.LazyLinear(10))
    model(torch.randn(1, 1, 16, 16))
    m = get_device("h100").measure(model, example=torch.randn(1, 1, 16, 16), batch=4, warmup=3, runs=10)
    assert m.runtime == "torch-cuda" and m.extra["timer"] == "cuda events" and m.p50_ms > 0
    assert m.host["compute_capability"]


@pytest.mark.skipif(not torch.cuda.is_available(), reason=NO_CUDA)
def test_tensorrt_engine_measures(tmp_path):
    pytest.importorskip("tensorrt", reason="TensorRT is not installed")
    from exporters.onnx import export_onnx
    from exporters.tensorrt import export_tensorrt

    model = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                          nn.Linear(8, 10)).eval()
    export_onnx(model, (torch.randn(2, 1, 16, 16),), tmp_path / "m.onnx")
    art = export_tensorrt(tmp_path / "m.onnx", tmp_path / "m.engine", precision="fp16", batch=(1, 1, 8))
    m = get_device("h100").measure(art.path, batch=2, precision="fp16", warmup=3, runs=10)
    assert m.runtime == "tensorrt" and m.input_shapes["input"][0] == 2
    with pytest.raises(DeviceError, match="outside its optimisation profile"):
        get_device("h100").measure(art.path, batch=64, precision="fp16")


def test_the_scripts_one_line_errors_are_this_devices_errors(fake_h100, tmp_path, monkeypatch):
    """A model that fails on the synthetic inputs (BART finds no <eos>) ended the run from the GPU's ONNX
    Runtime path: the script's SystemExit passed the profile stage's `except DeviceError`."""
    from devices import bench_onnxruntime

    def fails(*a, **k):
        raise SystemExit("m.onnx does not run on the synthetic inputs the benchmark feeds")

    monkeypatch.setattr(gpu, "_ort_cuda", lambda: True)
    monkeypatch.setattr(bench_onnxruntime, "measure", fails)
    onnx = tmp_path / "m.onnx"
    onnx.write_bytes(b"x")
    with pytest.raises(DeviceError, match="h100: m.onnx does not run on the synthetic inputs"):
        fake_h100.measure(onnx)


def test_gpu_check_runs_the_quickstart_and_brings_back_its_report(tmp_path, tiny_recipe):
    """scripts/gpu_check.py's end-to-end step (issue 20): the whole run with the distill stage on the accelerator it
    is given, the bundle verified, its report and manifest brought back and the distill stage's seconds and training
    device given. Here on the CPU, with the tiny recipe; on a GPU machine the script runs it with accelerator gpu."""
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location("gpu_check", Path(__file__).parent.parent / "scripts" / "gpu_check.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    said = []
    got = mod.quickstart(tmp_path, "cpu", ["local-cpu"], said.append, recipe=tiny_recipe)
    assert got["trained_on"]["device"] == "cpu" and got["distill_seconds"] > 0
    assert {m["device"] for m in got["measurements"]} == {"local-cpu"} and not any(m["estimated"] for m in got["measurements"])
    assert (tmp_path / "quickstart-cpu.report.md").is_file()
    assert json.loads((tmp_path / "quickstart-cpu.manifest.json").read_text())["stages"]
    assert any("distilled on the CPU: distill stage" in s for s in said)
