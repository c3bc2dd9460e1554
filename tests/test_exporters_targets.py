"""export_for_target: the files each runtime needs; a missing toolchain is a problem line, not a crash."""
import pytest
import torch
from torch import nn

from devices import DEVICES, load_profile
from exporters.onnx import export_onnx
from exporters.targets import FORMATS, export_for_target


@pytest.fixture(scope="module")
def student(tmp_path_factory):
    d = tmp_path_factory.mktemp("targets")
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                          nn.Linear(8, 10)).eval()
    art = export_onnx(model, (torch.randn(2, 1, 16, 16),), d / "student.onnx")
    return d, model, art


def test_every_runtime_has_formats():
    assert set(FORMATS) == set(DEVICES)


def test_onnxruntime_needs_nothing_more(student):
    d, _, art = student
    assert export_for_target("onnxruntime", {}, art, d) == ([], [])


def test_openvino_target(student):
    pytest.importorskip("openvino")
    d, _, art = student
    arts, problems = export_for_target("openvino", {"device": "CPU"}, art, d)
    assert problems == [] and [a.format for a in arts] == ["openvino"] and (d / "student.xml").is_file()


def test_tensorrt_target_without_tensorrt_still_writes_the_script(student):
    try:
        import tensorrt  # noqa: F401
        pytest.skip("TensorRT is installed")
    except (ImportError, OSError):
        pass
    d, _, art = student
    p = load_profile("jetson-orin-nano")
    arts, problems = export_for_target(p.runtime, p.options, art, d, precisions=p.precisions)
    assert arts == [] and len(problems) == 1 and "TensorRT is not installed" in problems[0]
    script = (d / "build_student.fp16.sh").read_text()
    assert "--fp16" in script and "--maxShapes=input:8x1x16x16" in script


def test_two_ethos_targets_share_one_tflite(student):
    pytest.importorskip("litert_torch", reason="litert-torch is not installed")
    d, model, art = student
    x = torch.randn(1, 1, 16, 16)
    seen = []
    for name in ("ethos-u55-128", "ethos-u85-256"):
        p = load_profile(name)
        arts, problems = export_for_target(p.runtime, p.options, art, d, model=model, example_inputs=(x,),
                                           calibration=[torch.randn(8, 1, 16, 16)])
        assert problems == []
        seen += [a.format for a in arts]
    assert seen == ["tflite", "vela", "vela"]
    assert (d / "student.int8_ethos-u55-128_vela.tflite").is_file() and (d / "student.int8_ethos-u85-256_vela.tflite").is_file()
    arts, problems = export_for_target("vela", load_profile("ethos-u55-128").options, art, d)
    assert arts == [] and "needs the torch module" in problems[0]
