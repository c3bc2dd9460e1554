"""The quantize stage without NNCF: ORT static QDQ, the QDQ graph rules, Polino's bucketed weights, bad input."""
import copy
import json
from types import SimpleNamespace

import numpy as np
import onnx
import pytest
import torch
from torch import nn

from compressor.errors import StageError, UserError
from compressor.tasks import Classification
from compressor.models import ResNet
from compressor.quantize import (BucketQuant, bucket_quantize, compressed_bits, fold_batchnorm, float_layers,
                                 integer_grid)
from compressor.stages.quantize import calibration_inputs, qat_fit
from compressor.recipe import load_recipe
from exporters import ExportError
from exporters.onnx import export_onnx
from exporters.qdq import check_qdq, module_path, pack_bucketed, quantize_static, run_onnxruntime


def _student():
    torch.manual_seed(0)
    m = ResNet(widths=(4, 8), depths=(1, 1), in_channels=1, num_classes=10)
    for mod in m.modules():  # BN statistics that are not the identity, so folding is really checked
        if isinstance(mod, nn.BatchNorm2d):
            mod.running_mean.normal_(0, 0.1)
            mod.running_var.uniform_(0.5, 2.0)
    return m.eval()


def _spec(**kw):
    return load_recipe({"name": "t", "teacher": {"model": "resnet"}, "data": {"dataset": "digits"},
                        "student": {"model": "resnet"}, "quantize": kw}).quantize


@pytest.fixture(scope="module")
def fp32_onnx(tmp_path_factory):
    path = tmp_path_factory.mktemp("q") / "s.onnx"
    export_onnx(_student(), (torch.randn(2, 1, 16, 16),), path)
    return path


# ---------------------------------------------------------------------------------- Polino's quantizer

def test_bucket_quantize_golden():
    w = torch.tensor([0.0, 0.4, 0.6, 1.0, 10.0, 11.0, 12.0, 13.0])
    # bucket 4: the first bucket spans [0, 1] in 2 levels (1 bit), the second [10, 13]
    assert bucket_quantize(w, 1, 4).tolist() == [0.0, 0.0, 1.0, 1.0, 10.0, 10.0, 13.0, 13.0]
    assert torch.allclose(bucket_quantize(w, 2, 4), torch.tensor([0, 1 / 3, 2 / 3, 1, 10, 11, 12, 13.0]))
    x = torch.randn(3, 5, 7)  # 105 values: the last bucket is padded
    q = bucket_quantize(x, 2, 16)
    for b in q.reshape(-1)[:96].view(-1, 16):
        assert len(b.unique()) <= 4
    assert (q - x).abs().max() <= (x.max() - x.min()) / 3 / 2 + 1e-6


def test_bucket_quantize_integer_zero_point_golden():
    """scale = range / (2^b - 1), zp = round(-min / scale), w_q = (clamp(round(w / scale) + zp) - zp) * scale."""
    w = torch.tensor([-1.0, -0.4, 0.6, 2.0, 10.0, 11.0, 12.0, 13.0])
    q = bucket_quantize(w, 2, 4, "integer")
    # first bucket: scale 1, zp 1, q = [0, 1, 2, 3]; the second holds only positive values, so its range is
    # widened to [0, 13] (zp 0, scale 13/3) instead of clipping its top at 13 - 10 = 3 steps
    assert torch.allclose(q, torch.tensor([-1.0, 0, 1, 2, 26 / 3, 13, 13, 13]))
    scale, zp = integer_grid(w, 2, 4)
    assert torch.allclose(scale.view(-1), torch.tensor([1.0, 13 / 3])) and zp.view(-1).tolist() == [1.0, 0.0]
    x = torch.randn(3, 5, 7)  # 105 values: the last bucket is padded; every bucket on 4 levels of its own grid
    q = bucket_quantize(x, 2, 16, "integer")
    scale, zp = integer_grid(x, 2, 16)
    steps = torch.cat([q.reshape(-1), q.reshape(-1)[-1:].expand(7)]).view(-1, 16) / scale + zp
    assert torch.allclose(steps, steps.round(), atol=1e-4) and steps.min() > -1e-4 and steps.max() < 3 + 1e-4
    assert ((q - x).abs().view(-1)[:96].view(-1, 16) <= scale[:6] / 2 + 1e-6).all()
    with pytest.raises(ValueError, match="zero_point"):
        bucket_quantize(x, 2, 16, "int")


@pytest.mark.parametrize("zero_point", ["float", "integer"])
def test_straight_through_gradient_reaches_the_shadow_weight(zero_point):
    w = torch.randn(300, requires_grad=True)
    c = torch.randn(300)
    (BucketQuant(2, 256, zero_point)(w) * c).sum().backward()
    assert torch.equal(w.grad, c)


def test_compressed_size_counts_bits_and_bucket_scales():
    m = nn.Sequential(nn.Linear(100, 10, bias=False), nn.Linear(10, 2))
    # 1000 weights at 4 bits + 4 buckets x (alpha, beta) in fp32; the second layer stays fp32 (22 values)
    assert compressed_bits(m, {"0": (4, 256)}) == 1000 * 4 + 4 * 64 + 22 * 32
    # integer zero points: an fp32 scale and a 4-bit zero point per bucket
    assert compressed_bits(m, {"0": (4, 256)}, "integer") == 1000 * 4 + 4 * (32 + 4) + 22 * 32


def test_fold_batchnorm_keeps_outputs_and_the_class():
    m = _student()
    f = fold_batchnorm(m, log=lambda s: None)
    assert type(f) is ResNet and not any(isinstance(x, nn.BatchNorm2d) for x in f.modules())
    x = torch.randn(4, 1, 16, 16)
    assert torch.allclose(m(x), f(x), atol=1e-5)


def test_pack_bucketed_is_standard_onnx_that_ort_runs(tmp_path):
    m = nn.Sequential(nn.Conv2d(1, 8, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 6 * 6, 10)).eval()
    with torch.no_grad():
        for layer in (m[0], m[3]):
            layer.weight.copy_(bucket_quantize(layer.weight, 4, 64))
    grid = tmp_path / "grid.onnx"
    export_onnx(m, (torch.randn(2, 1, 8, 8),), grid)
    out = tmp_path / "w4.onnx"
    info = pack_bucketed(grid, out, {"0.weight": (4, 64), "3.weight": (4, 64)})
    assert info["packed"]["3.weight"]["buckets"] == 45
    x = torch.randn(5, 1, 8, 8)
    assert np.abs(run_onnxruntime(out, x.numpy()) - m(x).detach().numpy()).max() < 1e-4
    assert out.stat().st_size < 0.5 * grid.stat().st_size
    types = {t.data_type for t in onnx.load(str(out)).graph.initializer}
    assert onnx.TensorProto.UINT4 in types
    with pytest.raises(ExportError, match="off their"):  # weights not on the grid are refused
        export_onnx(nn.Linear(300, 4).eval(), (torch.randn(2, 300),), grid)
        pack_bucketed(grid, out, {"weight": (4, 64)})


def test_pack_bucketed_integer_zero_points_are_exact(tmp_path):
    """Integer grids fold as UINT4 codes and UINT4 zero points -> Cast -> Sub -> Mul: the fake quantizer's own
    arithmetic, so ORT matches it to fp32 rounding; a grid that does not fit the weight is refused."""
    m = nn.Sequential(nn.Conv2d(1, 8, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 6 * 6, 10)).eval()
    grids = {}
    with torch.no_grad():
        for name, layer in (("0.weight", m[0]), ("3.weight", m[3])):
            bq = BucketQuant(4, 64, "integer")
            grids[name] = bq.grid(layer.weight)
            layer.weight.copy_(bq(layer.weight))
    grid = tmp_path / "grid.onnx"
    export_onnx(m, (torch.randn(2, 1, 8, 8),), grid)
    out = tmp_path / "w4.onnx"
    info = pack_bucketed(grid, out, {k: (4, 64, False, g) for k, g in grids.items()})
    assert info["packed"]["3.weight"]["zero_point"] == "integer" and "Sub" in info["storage"]
    x = torch.randn(5, 1, 8, 8)
    assert np.abs(run_onnxruntime(out, x.numpy()) - m(x).detach().numpy()).max() < 1e-5
    assert [n.op_type for n in onnx.load(str(out)).graph.node].count("Sub") == 2
    bad = {k: (4, 64, False, {**g, "scales": g["scales"] * 1.3}) for k, g in grids.items()}
    with pytest.raises(ExportError, match="off their"):
        pack_bucketed(grid, out, bad)


# ------------------------------------------------------------------------------------ ORT and QDQ

def test_module_path_from_torchscript_names():
    assert module_path("/stages/stages.0/stages.0.0/conv1/Conv") == "stages.0.0.conv1"
    assert module_path("/head/Gemm") == "head"
    assert module_path("/stem/stem.0/Conv") == "stem.0"
    # A ModuleList's elements under a module (Hugging Face): the dotted segment continues the path
    assert module_path("/convnext/encoder/stages.0/layers.0/dwconv/Conv") == "convnext.encoder.stages.0.layers.0.dwconv"
    assert module_path("/bert/encoder/layer.1/attention/self/query/MatMul") == "bert.encoder.layer.1.attention.self.query"
    assert module_path("node_MatMul_12") == ""  # torch.export's names carry no path


@pytest.mark.parametrize("act", ["uint8", "int8"])
def test_ort_static_qdq_passes_the_graph_rules(fp32_onnx, tmp_path, act):
    out = tmp_path / "int8.onnx"
    calib = torch.randn(64, 1, 16, 16).numpy()
    info = quantize_static(fp32_onnx, out, calib, activations=act)
    assert info["calibration_samples"] == 64 and not list(tmp_path.glob("*augmented*"))
    c = check_qdq(out)
    assert c["quantized_nodes"] == 7 and c["per_channel_weights"] and not c["float_nodes"]
    assert set(c["ops"]) <= {"QuantizeLinear", "DequantizeLinear", "Conv", "Gemm", "Add", "Relu",
                             "GlobalAveragePool", "Flatten"}
    assert ("uint8" in c["qdq_types"]) == (act == "uint8")
    assert c["tensorrt_ready"] == (act == "int8")  # symmetric int8 with zero point 0
    x = calib[:8]
    assert np.abs(run_onnxruntime(out, x) - run_onnxruntime(fp32_onnx, x)).max() < 0.5


def test_keep_float_leaves_the_named_layer_float(fp32_onnx, tmp_path):
    out = tmp_path / "int8.onnx"
    info = quantize_static(fp32_onnx, out, torch.randn(32, 1, 16, 16).numpy(), keep_float=["head"])
    assert info["nodes_kept_float"] == ["/head/Gemm"]
    assert check_qdq(out, keep_float=["head"])["float_nodes"] == ["head"]
    with pytest.raises(ExportError, match="Gemm head"):  # not allowed unless asked for
        check_qdq(out)


def test_keep_float_finds_a_hugging_face_layer_by_its_path(tmp_path):
    """BERT's layers are a ModuleList under the encoder: TorchScript names them /bert/encoder/layer.0/..., and
    a keep_float path under them once matched no node, so nothing was kept float and nothing said so."""
    import sys
    from pathlib import Path

    pytest.importorskip("transformers")
    from compressor.intake import intake
    from compressor.tasks import as_tuple, call, onnx_io
    from exporters.qdq import quantize_dynamic

    sys.path.insert(0, str(Path(__file__).parent))
    import user_models as U

    m = U.hf_bert().eval()
    x = {"input_ids": torch.randint(1, 256, (2, 16)), "attention_mask": torch.ones(2, 16, dtype=torch.long)}
    intake(m, call(m, x), names=tuple(x))
    export_onnx(m, as_tuple(x), tmp_path / "m.onnx", **onnx_io(x, "logits"))
    info = quantize_dynamic(tmp_path / "m.onnx", tmp_path / "int8.onnx", keep_float=["bert.encoder.layer.0"])
    kept = {module_path(n) for n in info["nodes_kept_float"]}
    assert "bert.encoder.layer.0.attention.self.query" in kept and "bert.encoder.layer.0.output.dense" in kept
    assert all(k.startswith("bert.encoder.layer.0.") for k in kept)
    # torch.export's node names carry no module path: asking to keep a layer float there is an error, not a no-op
    export_onnx(m, as_tuple(x), tmp_path / "d.onnx", dynamo_first=True, **onnx_io(x, "logits"))
    with pytest.raises(ExportError, match="carry no module paths"):
        quantize_dynamic(tmp_path / "d.onnx", tmp_path / "d8.onnx", keep_float=["bert.encoder.layer.0"])


class Routed(nn.Module):
    """Layers in a ModuleDict: TorchScript names them by their key alone (/a/Gemm), not by d.a."""

    def __init__(self):
        super().__init__()
        self.d = nn.ModuleDict({"a": nn.Linear(8, 8), "b": nn.Linear(8, 4)})

    def forward(self, x):
        return self.d["b"](torch.relu(self.d["a"](x)))


def test_keep_float_that_matches_no_node_is_an_error(tmp_path):
    from exporters.qdq import quantize_dynamic

    export_onnx(Routed().eval(), (torch.randn(2, 8),), tmp_path / "m.onnx")
    with pytest.raises(ExportError, match=r"cannot keep d\.a in float: no node of m\.onnx belongs to it"):
        quantize_dynamic(tmp_path / "m.onnx", tmp_path / "int8.onnx", keep_float=["d.a"])


def test_check_qdq_rejects_fp32_and_custom_fake_quant(fp32_onnx, tmp_path):
    with pytest.raises(ExportError, match="no DequantizeLinear"):
        check_qdq(fp32_onnx)
    from onnx import TensorProto, helper

    node = helper.make_node("FakeQuantize", ["x"], ["y"], domain="org.openvinotoolkit")
    g = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])])
    path = tmp_path / "fq.onnx"
    onnx.save(helper.make_model(g), str(path))
    with pytest.raises(ExportError, match="FakeQuantize"):
        check_qdq(path)


def test_check_qdq_rejects_a_scale_that_is_not_a_positive_finite_number(fp32_onnx, tmp_path):
    """A calibrated attention mask's -inf gave a Q/DQ pair a scale of inf: the Llama classifier's int8 file
    passed the graph rules at accuracy 0.49 against 0.99."""
    from onnx import numpy_helper

    out = tmp_path / "int8.onnx"
    quantize_static(fp32_onnx, out, torch.randn(32, 1, 16, 16).numpy())
    m = onnx.load(str(out))
    q = next(n for n in m.graph.node if n.op_type == "QuantizeLinear")
    init = next(i for i in m.graph.initializer if i.name == q.input[1])
    init.CopyFrom(numpy_helper.from_array(np.array(np.inf, dtype=np.float32), init.name))
    onnx.save(m, str(tmp_path / "inf.onnx"))
    with pytest.raises(ExportError, match=rf"1 Q/DQ scale\(s\) not a positive finite number, on {q.input[0]}"):
        check_qdq(tmp_path / "inf.onnx")


# ------------------------------------------------------------------------------------------ bad input

class Scale(nn.Module):
    def __init__(self):
        super().__init__()
        self.gain = nn.Parameter(torch.ones(1))

    def forward(self, x):
        return x * self.gain


def test_a_layer_with_weights_of_its_own_is_named_and_nothing_is_held_back_for_it():
    m = nn.Sequential(nn.Linear(4, 4), Scale(), nn.Linear(4, 2))
    with pytest.raises(UserError, match=r"layer '1' \(Scale\) has weights of its own \(gain\).*keep_float"):
        float_layers(m, _spec(mode="ptq-nncf", allow_float=False))
    said = []
    assert float_layers(m, _spec(mode="ptq-nncf"), log=said.append) == ([], ["1"])
    assert "NNCF quantizes the operations its rules cover" in said[0]
    # ONNX Runtime quantizes the exported graph's MatMuls whatever module they came from: never an error.
    said = []
    assert float_layers(m, _spec(mode="ptq-dynamic", allow_float=False), log=said.append) == ([], ["1"])
    assert "ONNX Runtime quantizes the MatMul" in said[0]
    with pytest.raises(UserError, match="no module 'nope'"):
        float_layers(m, _spec(mode="ptq-ort", keep_float=["nope"]))
    assert float_layers(m, _spec(mode="qat-kd", bits=4))[0][:2] == ["0", "2"]  # Polino: first and last


@pytest.mark.parametrize("mode", ["ptq-dynamic", "ptq-ort"])
def test_transformer_encoder_attention_is_quantized_by_onnx_runtime(mode, tmp_path):
    """nn.MultiheadAttention holds its packed q/k/v projection as a weight of its own; the whole attention
    (and the output Linear inside it) was kept float, leaving a ViT's attention unquantized."""
    import sys
    from pathlib import Path

    from exporters.qdq import quantize_dynamic

    sys.path.insert(0, str(Path(__file__).parent))
    import user_models as U

    torch.manual_seed(0)
    vit = U.vit(dim=32, depth=1, heads=4, mlp=64).eval()
    x = torch.randn(16, 1, 16, 16)
    export_onnx(vit, (x[:2],), tmp_path / "m.onnx", dynamo_first=True)  # TorchScript bakes the class token's batch in
    keep, own = float_layers(vit, _spec(mode=mode), log=lambda s: None)
    assert keep == [] and own == ["encoder.layers.0.self_attn"]
    out = tmp_path / "int8.onnx"
    if mode == "ptq-dynamic":
        info = quantize_dynamic(tmp_path / "m.onnx", out, keep_float=keep)
    else:
        info = quantize_static(tmp_path / "m.onnx", out, x.numpy(), keep_float=keep)
        assert not check_qdq(out, keep_float=keep)["float_nodes"]
    assert info["nodes_kept_float"] == []
    g = onnx.load(str(out)).graph
    weights = {t.name for t in g.initializer if t.data_type == onnx.TensorProto.INT8}
    # the attention's packed projection (in_proj_weight, 3 x 32 rows) and its output Linear, in int8
    shapes = sorted(tuple(t.dims) for t in g.initializer if t.name in weights and len(t.dims) == 2)
    assert (32, 96) in shapes or (96, 32) in shapes, shapes
    ref = run_onnxruntime(tmp_path / "m.onnx", x.numpy())
    assert np.abs(run_onnxruntime(out, x.numpy()) - ref).max() < 0.25 * np.abs(ref).max()


def test_calibration_set_too_small():
    data = SimpleNamespace(train=list(range(20)))
    ctx = SimpleNamespace(data=data, log=print)
    with pytest.raises(UserError, match="calibration set too small.*only 20"):
        calibration_inputs(ctx, _spec(mode="ptq-ort"))
    with pytest.raises(UserError, match="quantize.calibration: Input should be greater than or equal to 32"):
        _spec(mode="ptq-ort", calibration=8)  # caught when the recipe loads, before any training


def test_low_bits_need_qat():
    with pytest.raises(UserError, match="bits 4 needs mode qat-kd"):
        _spec(mode="ptq-ort", bits=4)


def test_nan_during_qat_stops_the_stage(tiny_recipe, tmp_path):
    from compressor.data import load_data

    class NaNTeacher(nn.Module):
        def forward(self, x):
            return torch.full((len(x), 10), float("nan"))

    recipe = load_recipe(tiny_recipe)
    ctx = SimpleNamespace(recipe=recipe, data=load_data(recipe.data, 0), teacher=NaNTeacher(),
                          scratch=tmp_path, log=lambda s: None, task=Classification())
    student = ResNet(widths=(4,), depths=(1,), in_channels=1, num_classes=10)
    with pytest.raises(StageError, match=r"^quantize: nncf fine-tuning stopped: .*nan.*last good checkpoint"):
        qat_fit(student, ctx, _spec(mode="qat-kd", epochs=1), "nncf")


# ------------------------------------------------------------------------------------------ pipeline

def test_pipeline_ptq_ort_ships_int8_beside_fp32(tiny_recipe, tmp_path):
    import compressor

    r = copy.deepcopy(tiny_recipe)
    r["quantize"] = {"mode": "ptq-ort", "calibration": 64, "reduce_range": True}
    r["distill"]["epochs"] = 1
    out = compressor.run(r, tmp_path / "b", log=lambda s: None)
    m = json.loads((out / "manifest.json").read_text())
    arts = {(a["role"], a["precision"]): a for a in m["artifacts"]}
    assert arts[("student", "int8")]["path"] == "model/student.int8.onnx"
    assert arts[("student", "fp32")]["path"] == "model/student.onnx"
    assert (out / "model" / "student.int8.onnx").is_file()
    measured = {x["artifact"] for x in m["measurements"]}
    assert "model/student.int8.onnx" in measured and "model/student.onnx" in measured
    q = m["quality"]["student_int8"]
    assert 0 <= q["onnx_accuracy"] <= 1 and q["mode"] == "ptq-ort"
    rec = next(s for s in m["stages"] if s["name"] == "quantize")
    assert rec["metrics"]["checks"]["quantized_nodes"] > 0 and rec["metrics"]["activations"] == "uint8"
    assert rec["metrics"]["reduce_range"] is True and "7-bit range" in rec["metrics"]["weights"]
    prof = next(s for s in m["stages"] if s["name"] == "profile")["metrics"]["local-cpu"]
    assert "student_int8_b1_p50_ms" in prof and "speedup_b1" in prof


def test_quantizers_take_paths_relative_to_the_working_directory(tmp_path, monkeypatch):
    """Both ORT quantizers work in a temporary directory; relative paths (runs/<name>, the CLI's
    default) must still point where the caller meant."""
    from exporters.onnx import export_onnx
    from exporters.qdq import quantize_dynamic, quantize_static, run_onnxruntime

    monkeypatch.chdir(tmp_path)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4)).eval()
    x = torch.randn(40, 8)
    export_onnx(model, (x[:2],), "rel/fp32.onnx")
    # 7-bit weights: with full-range ones x86 CPUs without VNNI saturate (tests/test_int8_saturation.py)
    quantize_dynamic("rel/fp32.onnx", "rel/dyn.onnx", reduce_range=True)
    quantize_static("rel/fp32.onnx", "rel/static.onnx", x.numpy(), reduce_range=True)
    ref = model(x).detach().numpy()
    for name in ("dyn", "static"):
        assert (tmp_path / "rel" / f"{name}.onnx").is_file()
        got = run_onnxruntime(f"rel/{name}.onnx", x.numpy())
        assert np.abs(got - ref).max() < 0.1 * np.abs(ref).max()


def _moves_graph(tmp_path, zero_point=True):
    """x -> Q/DQ twice (one grid) -> cat1 -> MatMul; cat1 and a third DQ'd input -> cat2 -> MatMul."""
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    inits = [numpy_helper.from_array(np.array(0.05, np.float32), "s"),
             numpy_helper.from_array(np.zeros((8, 4), np.float32) + 0.1, "w1"),
             numpy_helper.from_array(np.zeros((12, 4), np.float32) + 0.2, "w2")]
    zp = ["z"] if zero_point else []
    if zero_point:
        inits.append(numpy_helper.from_array(np.array(0, np.int8), "z"))
    nodes = []
    for k in range(3):
        nodes += [helper.make_node("QuantizeLinear", [f"x{k}", "s", *zp], [f"q{k}"]),
                  helper.make_node("DequantizeLinear", [f"q{k}", "s", *zp], [f"d{k}"])]
    nodes += [helper.make_node("Concat", ["d0", "d1"], ["c1"], axis=1, name="cat1"),
              helper.make_node("MatMul", ["c1", "w1"], ["y1"], name="mm1"),
              helper.make_node("Concat", ["c1", "d2"], ["c2"], axis=1, name="cat2"),
              helper.make_node("MatMul", ["c2", "w2"], ["y2"], name="mm2")]
    for i, n in enumerate(nodes):
        n.name = n.name or f"n{i}"
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info(f"x{k}", TensorProto.FLOAT, [2, 4]) for k in range(3)],
                          [helper.make_tensor_value_info(y, TensorProto.FLOAT, [2, 4]) for y in ("y1", "y2")], inits)
    path = tmp_path / "moves.onnx"
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return path


def test_a_move_of_values_on_one_grid_is_requantized_chained_moves_too(tmp_path):
    """A concat whose inputs share one Q/DQ grid feeds a MatMul bare: a Q/DQ pair at that grid goes after it
    (no number changes), and a second concat fed by the first is found through the inserted pair."""
    import numpy as np
    import onnx

    import onnxruntime as ort

    from exporters.qdq import requantize_moved

    path = _moves_graph(tmp_path)
    x = {f"x{k}": np.random.default_rng(k).standard_normal((2, 4)).astype(np.float32) for k in range(3)}

    def run():
        return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, x)

    def fed():  # what feeds each MatMul's activation input
        g = onnx.load(str(path)).graph
        prod = {o: n for n in g.node for o in n.output}
        return {n.name: prod[n.input[0]].op_type for n in g.node if n.op_type == "MatMul"}

    want = run()
    assert fed() == {"mm1": "Concat", "mm2": "Concat"}
    assert requantize_moved(path) == {"requantized_after_moves": 2, "pads_folded": 0}
    assert fed() == {"mm1": "DequantizeLinear", "mm2": "DequantizeLinear"}
    assert all(np.array_equal(a, b) for a, b in zip(run(), want))


def test_a_pad_before_a_convolution_goes_into_it_or_is_requantized_where_every_value_stays_on_the_grid(tmp_path):
    """A ZeroPad2d before a stride-2 convolution (TensorFlow-style "same" padding: EfficientNet): NNCF quantizes
    the pad's input, per tensor or (depthwise) per channel, and the Q/DQ check refused the Conv behind the Pad. A
    zero Pad of the spatial axes read only by Convs goes into their pads (the Conv reads the DequantizeLinear, which
    ONNX Runtime fuses); one read by something else too gets a Q/DQ pair at its input's grid (zeros lie on any grid
    with a zero point); a constant off the grid, or a pad along a per-channel grid's axis, is left as it is."""
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    import onnxruntime as ort

    from exporters.qdq import requantize_moved

    c = 4
    inits = [numpy_helper.from_array(np.array(0.05, np.float32), "s"), numpy_helper.from_array(np.array(3, np.uint8), "z"),
             numpy_helper.from_array(np.linspace(0.02, 0.05, c).astype(np.float32), "sc"),
             numpy_helper.from_array(np.arange(c).astype(np.uint8), "zc"),
             numpy_helper.from_array(np.full((c, 1, 3, 3), 0.1, np.float32), "w"),
             numpy_helper.from_array(np.full((c, c + 1, 3, 3), 0.1, np.float32), "w5"),  # 5 channels in
             numpy_helper.from_array(np.array([0, 0, 0, 0, 0, 0, 1, 1], np.int64), "hw"),  # bottom and right
             numpy_helper.from_array(np.array([0, 0, 0, 0, 0, 1, 0, 0], np.int64), "ch"),  # one more channel
             numpy_helper.from_array(np.array(0.013, np.float32), "off")]  # 0.26 steps of s: off the grid
    # (scale, zero point, pads, pad constant, conv weight, groups, output size, a second reader)
    cases = [("s", "z", "hw", None, "w", c, 3, False), ("sc", "zc", "hw", None, "w", c, 3, False),
             ("s", "z", "hw", "off", "w", c, 3, False), ("sc", "zc", "ch", None, "w5", 1, 2, False),
             ("s", "z", "hw", None, "w", c, 3, True)]
    nodes, outs = [], []
    for k, (sc, zp, pads, const, w, groups, size, relu) in enumerate(cases):
        axis = {"axis": 1} if sc == "sc" else {}
        nodes += [helper.make_node("QuantizeLinear", [f"x{k}", sc, zp], [f"q{k}"], name=f"q{k}", **axis),
                  helper.make_node("DequantizeLinear", [f"q{k}", sc, zp], [f"d{k}"], name=f"d{k}", **axis),
                  helper.make_node("Pad", [f"d{k}", pads, *([const] if const else [])], [f"p{k}"], name=f"pad{k}"),
                  helper.make_node("Conv", [f"p{k}", w], [f"y{k}"], name=f"conv{k}", group=groups, strides=[2, 2])]
        outs.append(helper.make_tensor_value_info(f"y{k}", TensorProto.FLOAT, [1, c, size, size]))
        if relu:
            nodes.append(helper.make_node("Relu", [f"p{k}"], [f"r{k}"], name=f"relu{k}"))
            outs.append(helper.make_tensor_value_info(f"r{k}", TensorProto.FLOAT, [1, c, 7, 7]))
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info(f"x{k}", TensorProto.FLOAT, [1, c, 6, 6])
                                       for k in range(len(cases))], outs, inits)
    path = tmp_path / "pads.onnx"
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    x = {f"x{k}": np.random.default_rng(k).uniform(0, 0.1, (1, c, 6, 6)).astype(np.float32) for k in range(len(cases))}

    def run():
        return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, x)

    want = run()
    assert requantize_moved(path) == {"requantized_after_moves": 1, "pads_folded": 2}
    g = onnx.load(str(path)).graph
    prod = {o: n for n in g.node for o in n.output}
    fed = {n.name: prod[n.input[0]].op_type for n in g.node if n.op_type == "Conv"}
    assert fed == {"conv0": "DequantizeLinear", "conv1": "DequantizeLinear", "conv2": "Pad", "conv3": "Pad",
                   "conv4": "DequantizeLinear"}
    assert [list(a.ints) for n in g.node if n.name == "conv1" for a in n.attribute if a.name == "pads"] == [[0, 0, 1, 1]]
    assert prod[prod[next(n for n in g.node if n.name == "conv4").input[0]].input[0]].op_type == "QuantizeLinear"
    assert all(np.allclose(a, b, atol=1e-6) for a, b in zip(run(), want))


def test_a_move_whose_grid_has_no_zero_point_is_left_alone(tmp_path):
    """Without a zero point the new QuantizeLinear's type would be guessed (uint8) and clamp int8 values."""
    from exporters.qdq import requantize_moved

    assert requantize_moved(_moves_graph(tmp_path, zero_point=False)) == {"requantized_after_moves": 0,
                                                                           "pads_folded": 0}


class _IndexFromActivations(torch.nn.Module):
    """An index computed from a hidden state (a learned router): the walk back from its Cast to int64 reached
    every residual Add and LayerNorm of the stream."""

    def __init__(self):
        super().__init__()
        self.blocks = torch.nn.ModuleList([torch.nn.Sequential(torch.nn.LayerNorm(8), torch.nn.Linear(8, 8))
                                           for _ in range(3)])
        self.table = torch.nn.Embedding(16, 8)

    def forward(self, x):
        for b in self.blocks:
            x = x + torch.relu(b(x))
        idx = (torch.sigmoid(x.mean(-1)) * 15).long()
        return x + self.table(idx)


def test_index_math_keeps_only_arithmetic_on_integers_float(tmp_path):
    import onnx

    from exporters.onnx import export_onnx
    from exporters.qdq.graph import index_math

    path = tmp_path / "router.onnx"
    export_onnx(_IndexFromActivations().eval(), (torch.randn(2, 4, 8),), path, opset=17)
    graph = onnx.shape_inference.infer_shapes(onnx.load(str(path))).graph
    assert index_math(graph) == []  # the chain reaches the activations: nothing is held back


def _gated(tmp_path, se: bool):
    """x -> Q/DQ -> mean over tokens -> MatMul fc1 (float weights) -> Sigmoid -> Mul: with ``se`` the gate
    multiplies x itself (a squeeze-excitation), else fc1's own output (a SiLU after a pooled head)."""
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    inits = [numpy_helper.from_array(np.array(0.05, np.float32), "s"), numpy_helper.from_array(np.array(0, np.int8), "z"),
             numpy_helper.from_array(np.ones((8, 8), np.float32), "w1"), numpy_helper.from_array(np.array([1], np.int64), "ax")]
    nodes = [helper.make_node("QuantizeLinear", ["x", "s", "z"], ["q"], name="q"),
             helper.make_node("DequantizeLinear", ["q", "s", "z"], ["d"], name="d"),
             helper.make_node("ReduceMean", ["d", "ax"], ["m"], name="pool", keepdims=1),
             helper.make_node("MatMul", ["m", "w1"], ["h"], name="/head/fc1/MatMul"),
             helper.make_node("Sigmoid", ["h"], ["g"], name="gate"),
             helper.make_node("Mul", ["d" if se else "h", "g"], ["y"], name="mul")]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4, 8])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
    path = tmp_path / f"gated_{se}.onnx"
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 18)]), str(path))
    return path


def test_only_a_true_squeeze_excitation_may_stay_float(tmp_path):
    """The squeeze-excitation allowance matched any layer followed by a SiLU (Sigmoid -> Mul): a pooled MLP head
    whose quantizers were lost passed the check. The gate must multiply the tensor that was pooled."""
    from exporters import ExportError
    from exporters.qdq import check_qdq

    assert check_qdq(_gated(tmp_path, se=True))["float_nodes"] == ["head.fc1 (squeeze-excitation)"]
    with pytest.raises(ExportError, match="MatMul head.fc1"):
        check_qdq(_gated(tmp_path, se=False))
