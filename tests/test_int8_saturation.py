"""int8 on x86 CPUs without VNNI: u8 x s8 products summed in pairs in int16 (vpmaddubsw) saturate when the
weights use the full int8 range. On an AVX2 AMD EPYC host a QDQ Linear 8-16-4 came out 8-48% (median 24%) of its output
range off in ONNX Runtime and OpenVINO; 7-bit weights (ORT's reduce_range, NNCF's overflow fix) do not saturate."""
import copy

import numpy as np
import pytest
import torch
from torch import nn

from compressor.stages.quantize import weight_range
from compressor.recipe import load_recipe
from devices.bench_onnxruntime import host_info, int8_saturates
from exporters.onnx import export_onnx
from exporters.qdq import quantize_dynamic, quantize_static, run_onnxruntime

SATURATES = bool(int8_saturates())


@pytest.mark.parametrize("machine, flags, want", [
    ("x86_64", {"sse4_2", "avx2", "fma"}, True),              # AVX2 only: vpmaddubsw
    ("x86_64", {"avx2", "avx512bw"}, True),                   # AVX-512 without VNNI (Skylake-SP)
    ("x86_64", {"avx2", "avx512bw", "avx512_vnni"}, False),   # Cascade Lake and later
    ("x86_64", {"avx2", "avx_vnni"}, False),                  # Alder Lake, Zen 5
    ("x86_64", {"amx_int8", "amx_tile"}, False),
    ("aarch64", {"asimd"}, False),                            # Arm kernels do not use vpmaddubsw
    ("x86_64", set(), None),                                  # flags unreadable: unknown
])
def test_int8_saturates_reads_the_flags(machine, flags, want):
    assert int8_saturates(machine, flags) is want


def test_host_info_says_whether_int8_saturates():
    info = host_info()
    if int8_saturates() is not None:
        assert info["int8_saturates"] is SATURATES


@pytest.fixture(scope="module")
def saturating(tmp_path_factory):
    """A Linear 8-16-4 whose full-range int8 file saturates on an AVX2 host (seed 4: 45% of the range off)."""
    torch.manual_seed(4)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4)).eval()
    x = torch.randn(40, 8)
    d = tmp_path_factory.mktemp("sat")
    export_onnx(model, (x[:2],), d / "fp32.onnx")
    with torch.no_grad():
        ref = model(x).numpy()
    return d, x.numpy(), ref, model


def _off(got, ref) -> float:
    return float(np.abs(got - ref).max() / np.abs(ref).max())


@pytest.mark.parametrize("mode", ["static", "dynamic"])
def test_reduce_range_files_are_right_on_any_host(saturating, mode):
    d, x, ref, _ = saturating
    out = d / f"{mode}.r.onnx"
    if mode == "static":
        info = quantize_static(d / "fp32.onnx", out, x, reduce_range=True)
    else:
        info = quantize_dynamic(d / "fp32.onnx", out, reduce_range=True)
    assert "7-bit range" in info["weights"]
    assert _off(run_onnxruntime(out, x), ref) < 0.05


@pytest.mark.skipif(not SATURATES, reason="this CPU has VNNI: its int8 kernels do not saturate")
def test_full_range_weights_saturate_here_and_run_right_unoptimized(saturating):
    """What the reduce_range default guards against, shown where it happens; ORT with optimizations off
    runs the QDQ graph as written (no integer kernel), which is what parity checks use on such a host."""
    d, x, ref, _ = saturating
    quantize_static(d / "fp32.onnx", d / "full.onnx", x)
    assert _off(run_onnxruntime(d / "full.onnx", x), ref) > 0.15
    assert _off(run_onnxruntime(d / "full.onnx", x, optimized=False), ref) < 0.05


def _recipe(targets, **quantize):
    return load_recipe({"name": "t", "teacher": {"model": "resnet"}, "data": {"dataset": "digits"},
                        "student": {"model": "resnet"}, "targets": targets,
                        "quantize": {"mode": "ptq-ort", **quantize}})


def test_weight_range_follows_the_recipe_then_the_targets(tmp_path):
    assert weight_range(_recipe([], reduce_range=True).quantize, []) == (True, "set in the recipe")
    assert weight_range(_recipe(["local-cpu"], reduce_range=False).quantize, ["local-cpu"])[0] is False
    auto = _recipe([]).quantize
    assert auto.reduce_range == "auto"
    assert weight_range(auto, ["local-cpu"])[0] is SATURATES        # this host, read from its flags
    assert weight_range(auto, ["jetson-orin-nano"])[0] is False     # a GPU: TensorRT's int8, not vpmaddubsw
    board = tmp_path / "nuc.yaml"
    board.write_text("name: nuc\nkind: cpu\nruntime: onnxruntime\nprecisions: [fp32, int8]\n"
                     "connection: ssh://edge@nuc.local\noptions: {int8_saturates: true}\n")
    reduced, why = weight_range(auto, [str(board)])
    assert reduced and "int8_saturates" in why
    assert _recipe([], reduce_range="true").quantize.reduce_range is True  # as --set writes it


def test_nncf_overflow_fix_gives_seven_bit_weights_that_run_right(saturating, tmp_path):
    pytest.importorskip("nncf")
    pytest.importorskip("torchao")
    import onnx
    from onnx import numpy_helper
    from types import SimpleNamespace

    from compressor.quantize import nncf_quantize
    from compressor.stages.quantize import _nncf_export
    from compressor.tasks import Classification

    _, x, _, model = saturating
    xt = torch.from_numpy(x)
    recipe = _recipe([], mode="ptq-nncf", reduce_range=True)
    ctx = SimpleNamespace(recipe=recipe, work=tmp_path, log=lambda s: None, task=Classification(),
                          example=lambda n=1: xt[:n])
    q = nncf_quantize(copy.deepcopy(model), xt, recipe.quantize, "uint8", [], reduce_range=True)
    stripped, out = _nncf_export(q, ctx)
    weights = [numpy_helper.to_array(t) for t in onnx.load(str(out)).graph.initializer
               if t.data_type == onnx.TensorProto.INT8 and t.dims]
    assert weights and all(w.min() >= -64 and w.max() <= 64 for w in weights)
    with torch.no_grad():
        fq = stripped(xt).numpy()
    assert _off(run_onnxruntime(out, x), fq) < 0.02


def test_profile_warns_when_a_measured_cpu_saturates_on_full_range_weights(tiny_recipe, tmp_path):
    """The quantize stage cannot see a remote board's CPU; the measurement reports it (host.int8_saturates),
    and the profile stage warns about a file with 8-bit weights there. Here the board is this host."""
    import json

    import compressor

    tiny_recipe["quantize"] = {"mode": "ptq-ort", "calibration": 64, "reduce_range": False}
    tiny_recipe["distill"]["epochs"] = 1
    tiny_recipe["budgets"] = {"max_quality_drop": 0.5}
    logs = []
    out = compressor.run(tiny_recipe, tmp_path / "b", log=logs.append)
    m = json.loads((out / "manifest.json").read_text())
    prof = next(s for s in m["stages"] if s["name"] == "profile")["metrics"]
    # the quality budget holds for the int8 file too (the one that saturation would spoil)
    assert {b["budget"] for b in m["budgets"]} == {"max_quality_drop", "max_quality_drop[int8]"}
    drop = next(b["value"] for b in m["budgets"] if b["budget"] == "max_quality_drop[int8]")
    t = m["quality"]["teacher"]["accuracy"]
    assert drop == pytest.approx((t - m["quality"]["student_int8"]["onnx_accuracy"]) / t)
    int8 = [x for x in m["measurements"] if x["artifact"] == "model/student.int8.onnx"]
    assert int8 and all(x["host"].get("int8_saturates") is SATURATES for x in int8)
    if SATURATES:
        assert "local-cpu" in prof["int8_saturates"] and "reduce_range: true" in prof["int8_saturates"]["local-cpu"]
        assert any("saturate" in n for n in int8[0]["notes"])
        assert sum(line.startswith("warning: local-cpu: its CPU has no VNNI") for line in logs) == 1
    else:
        assert "int8_saturates" not in prof
