"""TensorRT's side that runs without a GPU: polygraphy checks and sanitize on a tiny ONNX, TensorRT's
Q/DQ rules, the trtexec script; the engine build itself skips unless TensorRT and CUDA are here."""
import os
import shutil

import numpy as np
import pytest
import torch
from torch import nn

from exporters import ExportError
from exporters.onnx import export_onnx
from exporters.tensorrt import check_onnx, export_tensorrt, sanitize, trtexec_command, write_trtexec_script


def _has_trt():
    try:
        import tensorrt  # noqa: F401
    except (ImportError, OSError):
        return False
    return torch.cuda.is_available()


def quantize_qdq(src, dst, workdir, symmetric=True, shape=(1, 1, 32, 32)):
    """ONNX Runtime static QDQ int8 (weights per channel); symmetric activations suit TensorRT too."""
    import os

    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    class Reader(CalibrationDataReader):
        def __init__(self):
            rng = np.random.default_rng(0)
            self.batches = iter([{"input": rng.standard_normal(shape).astype(np.float32)} for _ in range(8)])

        def get_next(self):
            return next(self.batches, None)

    cwd = os.getcwd()
    os.chdir(workdir)  # the quantizer leaves temporary files in the working directory
    try:
        quantize_static(str(src), str(dst), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                        activation_type=QuantType.QInt8 if symmetric else QuantType.QUInt8,
                        weight_type=QuantType.QInt8,
                        extra_options={"ActivationSymmetric": symmetric, "WeightSymmetric": True})
    finally:
        os.chdir(cwd)
    return dst


NO_TRT = "TensorRT and a CUDA GPU are needed to build an engine; neither is on this machine"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    d = tmp_path_factory.mktemp("trt")
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                          nn.Flatten(), nn.Linear(8, 10)).eval()
    export_onnx(model, (torch.randn(2, 1, 16, 16),), d / "tiny.onnx")
    return d, model




def test_polygraphy_check_passes_on_tiny_onnx(tiny):
    pytest.importorskip("polygraphy")
    d, _ = tiny
    r = check_onnx(d / "tiny.onnx")
    assert r["ok"] and r["problems"] == [] and r["ops"]["Conv"] == 1 and r["qdq_nodes"] == 0
    assert "ONNX Model" in r["inspect"] and "input" in r["inspect"]


def test_sanitize_folds_constants_and_keeps_outputs(tiny):
    pytest.importorskip("polygraphy")
    import onnxruntime as ort

    d, model = tiny
    out = sanitize(d / "tiny.onnx", d / "tiny.sanitized.onnx")
    assert out.is_file() and not (d / ".tiny.sanitized.onnx.tmp").exists()
    x = torch.randn(3, 1, 16, 16)
    got = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"]).run(None, {"input": x.numpy()})[0]
    with torch.no_grad():
        np.testing.assert_allclose(got, model(x).numpy(), atol=1e-4, rtol=1e-3)
    assert check_onnx(out, inspect=False)["ok"]


def test_qdq_rules(tiny, tmp_path):
    pytest.importorskip("onnxruntime.quantization")
    d, _ = tiny
    sym = quantize_qdq(d / "tiny.onnx", tmp_path / "sym.onnx", tmp_path, symmetric=True, shape=(1, 1, 16, 16))
    asym = quantize_qdq(d / "tiny.onnx", tmp_path / "asym.onnx", tmp_path, symmetric=False, shape=(1, 1, 16, 16))
    r = check_onnx(sym, inspect=False)
    assert r["ok"] and r["qdq_nodes"] > 0, r["problems"]
    bad = check_onnx(asym, inspect=False)
    assert not bad["ok"] and any("uint8" in p or "zero point" in p for p in bad["problems"])
    with pytest.raises(ExportError, match="breaks TensorRT's rules"):
        export_tensorrt(asym, tmp_path / "asym.engine", precision="int8")
    with pytest.raises(ExportError, match="needs a QDQ ONNX"):
        export_tensorrt(d / "tiny.onnx", tmp_path / "fp.engine", precision="int8")


def test_trtexec_script_matches_the_build_settings(tiny, tmp_path):
    d, _ = tiny
    cmd = trtexec_command(d / "tiny.onnx", d / "tiny.engine", precision="fp16", batch=(1, 4, 16), workspace_mb=512)
    assert cmd[0] == "trtexec" and "--fp16" in cmd and "--int8" not in cmd
    assert "--minShapes=input:1x1x16x16" in cmd and "--optShapes=input:4x1x16x16" in cmd
    assert "--maxShapes=input:16x1x16x16" in cmd and "--memPoolSize=workspace:512M" in cmd
    s = write_trtexec_script(d / "tiny.onnx", tmp_path / "tiny.engine", tmp_path / "build.sh", precision="int8")
    text = s.read_text()
    assert os.access(s, os.X_OK) and text.startswith("#!/usr/bin/env bash")
    assert "--int8" in text and "--onnx=" in text and "tiny.onnx" in text
    if shutil.which("bash"):
        import subprocess

        assert subprocess.run(["bash", "-n", str(s)]).returncode == 0  # at least it parses


def test_bad_arguments(tiny, tmp_path):
    d, _ = tiny
    with pytest.raises(ExportError, match="precision 'bf8'"):
        export_tensorrt(d / "tiny.onnx", tmp_path / "x.engine", precision="bf8")
    with pytest.raises(ExportError, match="min <= opt <= max"):
        export_tensorrt(d / "tiny.onnx", tmp_path / "x.engine", batch=(4, 2, 8))


@pytest.mark.skipif(_has_trt(), reason="TensorRT is installed: the real build test runs instead")
def test_without_tensorrt_the_script_is_still_written(tiny, tmp_path):
    d, _ = tiny
    with pytest.raises(ExportError, match="TensorRT is not installed here.*build_tiny.fp16.sh"):
        export_tensorrt(d / "tiny.onnx", tmp_path / "tiny.fp16.engine", check=False)
    assert (tmp_path / "build_tiny.fp16.sh").is_file()
    assert not (tmp_path / "tiny.fp16.engine").exists()


@pytest.mark.skipif(not _has_trt(), reason=NO_TRT)
def test_engine_build_records_gpu_and_version(tiny, tmp_path):
    import json

    d, _ = tiny
    art = export_tensorrt(d / "tiny.onnx", tmp_path / "tiny.engine", precision="fp16", batch=(1, 2, 8),
                          timing_cache=tmp_path / "timing.cache")
    assert art.format == "tensorrt" and art.extra["compute_capability"] and art.toolchain["tensorrt"]
    side = json.loads((tmp_path / "tiny.engine.json").read_text())
    assert side["compute_capability"] == art.extra["compute_capability"]
    assert (tmp_path / "timing.cache").stat().st_size > 0 and (tmp_path / "build_tiny.sh").is_file()
