"""4-bit weights that ONNX Runtime computes with: Polino's bucketed Linear weights as com.microsoft.MatMulNBits,
everything that does not fit folded (with the reason), parity against the fake-quantized model, the pipeline."""
import copy
import json

import numpy as np
import onnx
import pytest
import torch
from torch import nn
from torch.nn.utils import parametrize

from compressor.quantize import W4_ATOL, BucketQuant, w4_parity
from exporters.onnx import export_onnx
from exporters.qdq import pack_w4, run_onnxruntime


def _fake_quant(model, bits=4, bucket=256, x=None, zero_point="float"):
    """Polino's parametrization on every Conv/Linear; returns (reference output on ``x`` with the
    parametrization on, the layers dict pack_w4 takes) and leaves the quantized values baked in. With
    integer zero points each layer carries its grid (scales, zero points), as the stage passes it."""
    layers = [n for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
    mods = dict(model.named_modules())
    for n in layers:
        parametrize.register_parametrization(mods[n], "weight", BucketQuant(bits, bucket, zero_point))
    with torch.no_grad():
        ref = model.eval()(x).numpy()
    grids = {n: mods[n].parametrizations.weight[0].grid(mods[n].parametrizations.weight.original) for n in layers}
    for n in layers:
        parametrize.remove_parametrizations(mods[n], "weight", leave_parametrized=True)
    return ref, {n: {"weight": mods[n].weight.detach().numpy(), "bits": bits, "bucket": bucket,
                     "kind": type(mods[n]).__name__, **({"grid": grids[n]} if grids[n] else {})} for n in layers}


def _inits(path):
    return {t.name: onnx.numpy_helper.to_array(t) for t in onnx.load(str(path)).graph.initializer}


def _ops(path):
    return [n.op_type for n in onnx.load(str(path)).graph.node]


class Stack(nn.Module):
    """A Linear stack whose in_features (512, 1024, 256) are all multiples of the bucket."""

    def __init__(self):
        super().__init__()
        self.up, self.down, self.head = nn.Linear(512, 1024), nn.Linear(1024, 256), nn.Linear(256, 16)

    def forward(self, x):
        return self.head(torch.relu(self.down(torch.relu(self.up(x)))))


@pytest.mark.parametrize("zero_point", ["integer", "float"])
@pytest.mark.parametrize("shape", [(8, 512), (2, 16, 512)], ids=["gemm", "matmul-3d"])
def test_linear_stack_becomes_matmulnbits_that_ort_runs(tmp_path, shape, zero_point):
    """2-d input exports Gemm (weight as is), 3-d input MatMul (a transposed copy under another name): both
    become MatMulNBits, match the fake-quantized model, and shrink the weights ~7x; the zero points are uint8
    for an integer grid, fp32 for Polino's float offset."""
    torch.manual_seed(0)
    x = torch.randn(*shape)
    model = Stack()
    ref, layers = _fake_quant(model, x=x, zero_point=zero_point)
    grid, out = tmp_path / "grid.onnx", tmp_path / "w4.onnx"
    export_onnx(model, (x,), grid)
    info = pack_w4(grid, out, layers)
    assert sorted(info["matmulnbits"]) == ["down", "head", "up"] and not info["folded"] and not info["fp32"]
    assert info["matmulnbits"]["up"]["K"] == 512 and info["matmulnbits"]["up"]["N"] == 1024
    assert info["matmulnbits"]["down"]["k_blocks"] == 4
    ops = _ops(out)
    assert ops.count("MatMulNBits") == 3 and "MatMul" not in ops and "Gemm" not in ops and "Cast" not in ops
    node = next(n for n in onnx.load(str(out)).graph.node if n.op_type == "MatMulNBits")
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
    assert node.domain == "com.microsoft" and attrs["bits"] == 4 and attrs["block_size"] == 256
    got = run_onnxruntime(out, x.numpy())
    assert np.abs(got - ref).max() < W4_ATOL
    assert w4_parity(out, ref, x)["max_abs"] < W4_ATOL
    ratio = grid.stat().st_size / out.stat().st_size  # 4 bits + two fp32 per 256 weights: 32 / 4.25 = 7.5
    assert 6 <= ratio <= 8.1, ratio
    zp = _inits(out)["up.zero_points"]
    assert (zp.dtype, zp.shape) == ((np.uint8, (1024, 1)) if zero_point == "integer" else (np.float32, (1024, 2)))
    assert ("uint8" in info["matmulnbits"]["up"]["zero_points"]) == (zero_point == "integer")


def test_codes_are_packed_low_nibble_first_along_k(tmp_path):
    """A golden layout: output column 0 holds codes 0..15 along K (one bucket of 16), so its first byte is
    0x10 (code 0 low, code 1 high); scale = alpha / 15 and zero point = -beta / scale."""
    lin = nn.Linear(16, 2, bias=False)
    with torch.no_grad():
        lin.weight.copy_(torch.stack([torch.arange(16.0) * 0.1 - 0.5, torch.linspace(1.0, -0.5, 16)]))
    x = torch.randn(3, 16)
    ref, layers = _fake_quant(lin, bucket=16, x=x)
    export_onnx(lin, (x,), tmp_path / "g.onnx")
    info = pack_w4(tmp_path / "g.onnx", tmp_path / "w4.onnx", {"lin": {**layers[""], "kind": "Linear"}})
    g = onnx.load(str(tmp_path / "w4.onnx")).graph
    inits = {t.name: onnx.numpy_helper.to_array(t) for t in g.initializer}
    b, s, zp = inits["lin.q4"], inits["lin.scales"], inits["lin.zero_points"]
    assert b.shape == (2, 1, 8) and s.shape == zp.shape == (2, 1) and zp.dtype == s.dtype == np.float32
    assert list(b[0, 0]) == [0x10, 0x32, 0x54, 0x76, 0x98, 0xBA, 0xDC, 0xFE]
    assert b[1, 0, 0] == 0xEF  # the second column descends: codes 15, 14
    assert np.isclose(s[0, 0], 1.5 / 15) and np.isclose(zp[0, 0], 0.5 / (1.5 / 15))
    assert info["matmulnbits"]["lin"]["block_size"] == 16
    assert np.abs(run_onnxruntime(tmp_path / "w4.onnx", x.numpy()) - ref).max() < W4_ATOL


def test_integer_zero_points_are_packed_as_ort_reads_them(tmp_path):
    """A golden layout with an odd number of K-blocks: output column 0 has three blocks of 16 whose ranges
    give zero points 0 ([0, 1.5]), 15 ([-1.5, 0]) and 5 ([-0.5, 1.0]), all with scale 0.1; they pack as the op
    spec's uint8 zero points, two per byte, the lower block in the low nibble, the row padded: 0xF0, 0x05.
    ORT computes with exactly these (a different layout would shift every block's weights)."""
    lin = nn.Linear(48, 2, bias=False)
    ramp = torch.arange(16.0) * 0.1
    with torch.no_grad():
        lin.weight.copy_(torch.stack([torch.cat([ramp, ramp - 1.5, ramp - 0.5]), torch.linspace(1.0, -0.5, 48)]))
    x = torch.randn(3, 48)
    ref, layers = _fake_quant(lin, bucket=16, x=x, zero_point="integer")
    assert layers[""]["grid"]["zero_points"][:3].tolist() == [0, 15, 5]
    export_onnx(lin, (x,), tmp_path / "g.onnx")
    info = pack_w4(tmp_path / "g.onnx", tmp_path / "w4.onnx", {"lin": {**layers[""], "kind": "Linear"}})
    i = _inits(tmp_path / "w4.onnx")
    zp, s = i["lin.zero_points"], i["lin.scales"]
    assert zp.dtype == np.uint8 and zp.shape == (2, 2) and s.shape == (2, 3) and s.dtype == np.float32
    assert list(zp[0]) == [0xF0, 0x05] and np.allclose(s[0], 0.1)
    assert info["matmulnbits"]["lin"]["k_blocks"] == 3
    assert np.abs(run_onnxruntime(tmp_path / "w4.onnx", x.numpy()) - ref).max() < 1e-5


@pytest.mark.parametrize("shape", [(4, 384), (2, 8, 384)], ids=["gemm", "matmul-3d"])
def test_packed_zero_points_decode_to_the_quantizers(tmp_path, shape):
    """Integer zero points unpacked from the file are BucketQuant's own (k_blocks 3, 6 and 1: odd rows are padded),
    and ORT's output matches the fake-quantized PyTorch model (the one QAT trains) within 1e-4."""
    from exporters.qdq import unpack_zero_points

    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(384, 768), nn.ReLU(), nn.Linear(768, 128), nn.ReLU(), nn.Linear(128, 8))
    x = torch.randn(*shape)
    ref, layers = _fake_quant(model, bucket=128, x=x, zero_point="integer")
    export_onnx(model, (x,), tmp_path / "g.onnx")
    info = pack_w4(tmp_path / "g.onnx", tmp_path / "w4.onnx", layers)
    assert sorted(info["matmulnbits"]) == ["0", "2", "4"] and not info["folded"]
    inits = _inits(tmp_path / "w4.onnx")
    for name, (n, kb) in {"0": (768, 3), "2": (128, 6), "4": (8, 1)}.items():
        packed = inits[f"{name}.zero_points"]
        assert packed.dtype == np.uint8 and packed.shape == (n, (kb + 1) // 2)
        want = layers[name]["grid"]["zero_points"].reshape(n, kb)
        assert np.array_equal(unpack_zero_points(packed, kb), want)
        assert np.array_equal(inits[f"{name}.scales"], layers[name]["grid"]["scales"].reshape(n, kb))
    assert len(np.unique(want)) > 1  # the check is not vacuous: zero points differ between blocks
    assert "prepacks" in info["note"]
    got = run_onnxruntime(tmp_path / "w4.onnx", x.numpy())
    assert np.abs(got - ref).max() < W4_ATOL
    assert w4_parity(tmp_path / "w4.onnx", ref, x)["max_abs"] < W4_ATOL


class Mixed(nn.Module):
    """A Conv and a Linear whose in_features (144) the bucket (64) does not divide stay folded; the last
    Linear (in 256) fits."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3)
        self.fc = nn.Linear(144, 256)
        self.out = nn.Linear(256, 8)

    def forward(self, x):
        return self.out(torch.relu(self.fc(torch.flatten(torch.relu(self.conv(x)), 1))))


@pytest.mark.parametrize("zero_point", ["float", "integer"])
def test_layers_that_do_not_fit_stay_folded_with_the_reason(tmp_path, zero_point):
    torch.manual_seed(0)
    x = torch.randn(4, 1, 8, 8)
    model = Mixed()
    ref, layers = _fake_quant(model, bucket=64, x=x, zero_point=zero_point)
    export_onnx(model, (x,), tmp_path / "g.onnx")
    info = pack_w4(tmp_path / "g.onnx", tmp_path / "w4.onnx", layers)
    assert list(info["matmulnbits"]) == ["out"]
    assert "in_features 144 is not a multiple of the bucket 64" in info["folded"]["fc"]
    assert info["folded"]["conv"].startswith("Conv2d")
    ops = _ops(tmp_path / "w4.onnx")
    # folded: codes -> Cast (and, for integer zero points, zero points -> Cast, then Sub)
    assert ops.count("MatMulNBits") == 1 and ops.count("Cast") == (2 if zero_point == "float" else 4) and "Conv" in ops
    assert ops.count("Sub") == (0 if zero_point == "float" else 2)
    types = {t.data_type for t in onnx.load(str(tmp_path / "w4.onnx")).graph.initializer}
    assert onnx.TensorProto.UINT4 in types  # the folded layers keep 4-bit codes
    assert np.abs(run_onnxruntime(tmp_path / "w4.onnx", x.numpy()) - ref).max() < W4_ATOL
    # A bucket that is no power of two is not a MatMulNBits block size, even where it divides in_features.
    model = nn.Sequential(nn.Linear(96, 4)).eval()
    x = torch.randn(2, 96)
    ref, layers = _fake_quant(model, bucket=48, x=x)
    export_onnx(model, (x,), tmp_path / "g2.onnx")
    info = pack_w4(tmp_path / "g2.onnx", tmp_path / "w4b.onnx", layers)
    assert not info["matmulnbits"] and "power of two" in info["folded"]["0"]
    assert np.abs(run_onnxruntime(tmp_path / "w4b.onnx", x.numpy()) - ref).max() < W4_ATOL


def test_parity_fails_on_a_wrong_file(tmp_path):
    """The check can fail: the file of one model against another model's outputs."""
    from compressor.errors import StageError

    torch.manual_seed(0)
    x = torch.randn(4, 512)
    model = Stack()
    ref, layers = _fake_quant(model, x=x)
    export_onnx(model, (x,), tmp_path / "g.onnx")
    pack_w4(tmp_path / "g.onnx", tmp_path / "w4.onnx", layers)
    with pytest.raises(StageError, match="differs from the fake-quantized model"):
        w4_parity(tmp_path / "w4.onnx", ref * 1.01 + 0.01, x)


@pytest.mark.parametrize("zero_point", [None, "float"], ids=["default-integer", "float"])
def test_pipeline_profiles_the_matmulnbits_file(tiny_recipe, tmp_path, zero_point):
    """An MLP student on 16x16 digits (in 256): Polino keeps the first and last layer float, body.4 and body.7
    (in 256) become MatMulNBits, body.10 (in 128) stays folded; local-cpu (lists w4) measures the file, openvino-cpu
    says why it does not. By default the zero points are integers from QAT on (uint8 in the file); ``zero_point:
    float`` still writes Polino's float zero points."""
    import compressor

    r = copy.deepcopy(tiny_recipe)
    r["student"] = {"model": "mlp", "config": {"in_features": 256, "hidden": [256, 256, 128, 64]}}
    r["distill"]["epochs"] = 1
    r["quantize"] = {"mode": "qat-kd", "bits": 4, "epochs": 1, **({"zero_point": zero_point} if zero_point else {})}
    r["targets"] = ["local-cpu", "openvino-cpu"]
    out = compressor.run(r, tmp_path / "b", log=lambda s: None)
    m = json.loads((out / "manifest.json").read_text())
    rec = next(s for s in m["stages"] if s["name"] == "quantize")["metrics"]
    assert sorted(rec["export"]["matmulnbits"]) == ["body.4", "body.7"]
    assert "in_features 128 is not a multiple of the bucket 256" in rec["export"]["folded"]["body.10"]
    assert rec["parity"]["max_abs"] < W4_ATOL and rec["parity"]["samples"] > 0
    arts = {(a["role"], a["precision"]): a for a in m["artifacts"]}
    w4 = arts[("student", "w4")]
    assert w4["path"] == "model/student.w4.onnx" and w4["extra"]["matmulnbits"] == 2
    assert "CPU" in w4["extra"]["note"]
    assert "MatMulNBits" in _ops(out / w4["path"])
    want = zero_point or "integer"
    config = next(s for s in m["stages"] if s["name"] == "quantize")["config"]
    assert rec["zero_point"] == config["zero_point"] == want
    zps = {k: v for k, v in _inits(out / w4["path"]).items() if k.endswith(".zero_points")}
    assert sorted(zps) == ["body.4.zero_points", "body.7.zero_points"]
    assert all(v.dtype == (np.uint8 if want == "integer" else np.float32) for v in zps.values())
    folded = rec["export"]["folded_storage"]
    assert ("Sub" in folded) == (want == "integer")
    measured = {(x["device"], x["artifact"]) for x in m["measurements"]}
    assert ("local-cpu", "model/student.w4.onnx") in measured
    assert not any(d == "openvino-cpu" and a == "model/student.w4.onnx" for d, a in measured)
    prof = next(s for s in m["stages"] if s["name"] == "profile")["metrics"]
    assert "student_w4_b1_p50_ms" in prof["local-cpu"]
    why = prof["not_measured"]["openvino-cpu"]["model/student.w4.onnx"]
    assert "not w4" in why and "contrib op" in why
    assert 0 <= m["quality"]["student_w4"]["onnx_accuracy"] <= 1
