"""OpenVINO: IR export and CPU measurements of the quickstart student, fp32 and int8 (QDQ), with the
inference precision set explicitly and read back."""
import numpy as np
import pytest
import torch

ov = pytest.importorskip("openvino")

from devices import DeviceError, get_device  # noqa: E402
from exporters import ExportError  # noqa: E402
from exporters.onnx import export_onnx  # noqa: E402
from exporters.openvino import export_openvino  # noqa: E402
from test_exporters_tensorrt import quantize_qdq  # noqa: E402  (shared helper in this folder)


def quickstart_student():
    from compressor.models import build_model

    torch.manual_seed(0)
    return build_model("resnet", {"widths": [16, 32, 64], "depths": [1, 1, 1]},
                       {"in_channels": 1, "num_classes": 10}).eval()


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    d = tmp_path_factory.mktemp("ov")
    model = quickstart_student()
    x = torch.randn(2, 1, 32, 32)
    export_onnx(model, (x,), d / "student.onnx")
    quantize_qdq(d / "student.onnx", d / "student.int8.onnx", d)
    return {"dir": d, "model": model, "x": x}


def test_ir_export_keeps_fp32_and_matches_pytorch(models):
    d = models["dir"]
    art = export_openvino(d / "student.onnx", d / "student.xml")
    assert art.format == "openvino" and art.precision == "fp32"
    assert (d / "student.bin").is_file() and art.extra["weights"] == "student.bin"
    assert art.inputs[0]["shape"][0] == "?"  # the dynamic batch survives
    compiled = ov.Core().compile_model(str(d / "student.xml"), "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    got = compiled(models["x"].numpy())[0]
    with torch.no_grad():
        ref = models["model"](models["x"]).numpy()
    np.testing.assert_allclose(got, ref, atol=1e-4, rtol=1e-3)
    half = export_openvino(d / "student.onnx", d / "student.fp16.xml", precision="fp16")
    assert half.bytes < art.bytes  # fp16 weights: save_model's compress_to_fp16, set explicitly


def test_ir_export_bad_input(tmp_path):
    with pytest.raises(ExportError, match="does not exist"):
        export_openvino(tmp_path / "missing.onnx", tmp_path / "m.xml")
    with pytest.raises(ExportError, match="ends in .xml"):
        export_openvino(tmp_path / "missing.onnx", tmp_path / "m.bin")


def test_cpu_measures_fp32_with_f32_hint(models):
    d = models["dir"]
    export_openvino(d / "student.onnx", d / "student.xml")
    dev = get_device("openvino-cpu")
    assert dev.available(), dev.why_unavailable()
    m = dev.measure(d / "student.xml", batch=1, warmup=3, runs=20, max_seconds=5)
    assert m.runtime == "openvino" and m.provider == "CPU" and not m.estimated
    assert m.precision == "fp32" and m.extra["inference_precision_hint"] == "f32"
    assert m.extra["compiled"]["INFERENCE_PRECISION_HINT"] == "f32"  # what ran, read back
    assert "bf16" not in m.extra["layer_precisions"]
    assert m.input_shapes == {"input": [1, 1, 32, 32]} and m.runs == 20 and m.p50_ms > 0
    m4 = dev.measure(d / "student.onnx", batch=4, warmup=1, runs=5, max_seconds=5)  # ONNX directly, batch 4
    assert m4.input_shapes["input"][0] == 4


def test_cpu_measures_int8_qdq(models):
    d = models["dir"]
    export_openvino(d / "student.int8.onnx", d / "student.int8.xml", precision="int8")
    m = get_device("openvino-cpu").measure(d / "student.int8.xml", warmup=3, runs=20, max_seconds=5, precision="int8")
    assert m.precision == "int8" and m.extra["inference_precision_hint"] == "f32"
    assert any(p in m.extra["layer_precisions"] for p in ("i8", "u8")), m.extra["layer_precisions"]


def test_bad_precision_and_missing_npu(models):
    d = models["dir"]
    with pytest.raises(DeviceError, match="does not list precision 'fp16'"):
        get_device("openvino-cpu").measure(d / "student.onnx", precision="fp16")
    npu = get_device("intel-core-ultra-npu")
    if "NPU" in ov.Core().available_devices:
        pytest.skip("an NPU is present here")
    assert "NPU" in npu.why_unavailable()
    with pytest.raises(DeviceError, match="not available"):
        npu.measure(d / "student.onnx", precision="int8")


def test_roofline_from_flops(models):
    from compressor.models import count_flops
    from devices import load_profile

    d = models["dir"]
    flops = count_flops(models["model"], models["x"])
    m = get_device("openvino-cpu").measure(d / "student.onnx", warmup=1, runs=5, max_seconds=5)
    m.add_roofline(flops, load_profile("openvino-cpu"))
    assert m.gflops > 0 and m.roofline == pytest.approx(m.gflops / 256)
