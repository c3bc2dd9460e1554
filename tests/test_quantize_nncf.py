"""NNCF quantization: QAT with the teacher and PTQ, exported as standard QDQ (skipped without nncf)."""
import copy
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import onnx
import pytest
import torch
from torch import nn

pytest.importorskip("nncf")
pytest.importorskip("torchao")  # nncf.strip(NATIVE) needs it

from compressor.context import Context  # noqa: E402
from compressor.tasks import Classification  # noqa: E402
from compressor.quantize import fold_batchnorm, nncf_quantize  # noqa: E402
from compressor.stages.quantize import _nncf_export  # noqa: E402
from compressor.recipe import load_recipe  # noqa: E402
from exporters.qdq import check_qdq, run_onnxruntime  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
import user_models as U  # noqa: E402  (tests/user_models.py: models nobody here wrote)


def _ctx(tmp_path, model_input):
    recipe = load_recipe({"name": "t", "teacher": {"model": "resnet"}, "data": {"dataset": "digits"},
                          "student": {"model": "resnet"}, "quantize": {"mode": "ptq-nncf"}})
    return SimpleNamespace(recipe=recipe, work=tmp_path, log=lambda s: None, task=Classification(),
                           example=lambda n=1: model_input[:n])


@pytest.mark.parametrize("act", ["uint8", "int8"])
def test_nncf_export_is_standard_qdq(tmp_path, act):
    torch.manual_seed(0)
    # A top-level nn.Sequential: nncf.quantize fails on one unless it is wrapped.
    model = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                          nn.Flatten(), nn.Linear(8, 10)).eval()
    x = torch.randn(64, 1, 12, 12)
    ctx = _ctx(tmp_path, x)
    spec = ctx.recipe.quantize
    q = nncf_quantize(fold_batchnorm(model, log=ctx.log), x, spec, act, [])
    stripped, out = _nncf_export(q, ctx)
    c = check_qdq(out)
    assert c["quantized_nodes"] == 2 and c["per_channel_weights"]
    assert c["tensorrt_ready"] == (act == "int8")  # signed activations forced for TensorRT
    m = onnx.load(str(out))
    assert {n.domain for n in m.graph.node} <= {""}
    assert onnx.TensorProto.INT8 in {t.data_type for t in m.graph.initializer}  # weights stored as int8
    with torch.no_grad():
        ref = stripped(x).numpy()
    assert np.abs(run_onnxruntime(out, x.numpy()) - ref).max() < 0.05
    # TensorRT's side, checked without TensorRT: `polygraphy inspect model` reads the int8 file, and in
    # int8 mode every Q/DQ is symmetric int8 with zero point 0
    # (NNCF's exported zero points are computed: `polygraphy surgeon sanitize --fold-constants` first,
    # as the TensorRT exporter does.)
    pytest.importorskip("polygraphy")
    from exporters.tensorrt import check_onnx, sanitize

    trt = check_onnx(sanitize(out, tmp_path / "sanitized.onnx"), inspect=True)
    assert "ONNX Model" in trt["inspect"] and "QuantizeLinear" in trt["ops"]
    assert trt["ok"] == (act == "int8"), trt["problems"][:3]


def test_nncf_keep_float(tmp_path):
    model = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                          nn.Linear(8, 10)).eval()
    x = torch.randn(32, 1, 12, 12)
    ctx = _ctx(tmp_path, x)
    q = nncf_quantize(model, x, ctx.recipe.quantize, "uint8", ["4"])  # the head stays float
    _, out = _nncf_export(q, ctx)
    assert check_qdq(out, keep_float=["net.4"])["float_nodes"] == ["net.4"]


class LayerScale(nn.Module):
    """A ConvNeXt-style block: a gain of its own around a convolution."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(8, 8, 3, padding=1)
        self.gain = nn.Parameter(torch.full((8, 1, 1), 0.5))

    def forward(self, x):
        return x + self.gain * self.conv(x)


class Scaled(nn.Module):
    """Layer-scale blocks in a ModuleList: NNCF names blocks.1.conv's convolution conv/conv2d/1."""

    def __init__(self):
        super().__init__()
        self.stem, self.head = nn.Conv2d(1, 8, 3, padding=1), nn.Linear(8, 10)
        self.blocks = nn.ModuleList([LayerScale(), LayerScale()])

    def forward(self, x):
        x = torch.relu(self.stem(x))
        for b in self.blocks:
            x = b(x)
        return self.head(x.mean((2, 3)))


def _graph_inputs(path):
    """{module path of each Conv/Gemm/MatMul: whether its inputs are dequantized}."""
    from exporters.qdq import module_path

    g = onnx.load(str(path)).graph
    made = {o: n for n in g.node for o in n.output}
    return {module_path(n.name): [getattr(made.get(i), "op_type", None) == "DequantizeLinear" for i in n.input[:2]]
            for n in g.node if n.op_type in ("Conv", "Gemm", "MatMul")}


def test_nncf_quantizes_the_layers_inside_a_module_with_weights_of_its_own(tmp_path):
    """Each block's gain stays float; its convolution does not (the whole block once did)."""
    from compressor.quantize import float_layers

    torch.manual_seed(0)
    model, x = Scaled().eval(), torch.randn(32, 1, 12, 12)
    ctx = _ctx(tmp_path, x)
    keep, own = float_layers(model, ctx.recipe.quantize, log=lambda s: None)
    assert (keep, own) == ([], ["blocks.0", "blocks.1"])
    _, out = _nncf_export(nncf_quantize(model, x, ctx.recipe.quantize, "uint8", keep), ctx)
    c = check_qdq(out, keep_float=keep, own=own)
    assert c["quantized_nodes"] == 4 and not c["float_nodes"]


def test_nncf_keep_float_finds_a_layer_in_a_module_list(tmp_path):
    """NNCF's own names drop the ModuleList's index, so a path pattern kept nothing float, silently."""
    from compressor.errors import UserError

    torch.manual_seed(0)
    model, x = Scaled().eval(), torch.randn(32, 1, 12, 12)
    ctx = _ctx(tmp_path, x)
    _, out = _nncf_export(nncf_quantize(model, x, ctx.recipe.quantize, "uint8", ["blocks.1"]), ctx)
    inputs = _graph_inputs(out)
    assert inputs["blocks.1.conv"] == [False, False] and inputs["blocks.0.conv"] == [True, True]
    assert check_qdq(out, keep_float=["blocks.1"])["float_nodes"] == ["blocks.1.conv"]
    with pytest.raises(UserError, match=r"no operation that uses a weight of 'blocks\.0\.gain_free'"):
        nncf_quantize(model, x, ctx.recipe.quantize, "uint8", ["blocks.0.gain_free"])


def test_nncf_quantizes_multihead_attention(tmp_path):
    """nn.MultiheadAttention's packed projection is a weight of its own: its output Linear is quantized, and
    the check allows a float operation of the attention's own only."""

    from compressor.quantize import float_layers


    torch.manual_seed(0)
    vit, x = U.vit(dim=32, depth=1, heads=4, mlp=64).eval(), torch.randn(32, 1, 16, 16)
    ctx = _ctx(tmp_path, x)
    keep, own = float_layers(vit, ctx.recipe.quantize, log=lambda s: None)
    assert own == ["encoder.layers.0.self_attn"]
    _, out = _nncf_export(nncf_quantize(vit, x, ctx.recipe.quantize, "uint8", keep), ctx)
    c = check_qdq(out, keep_float=keep, own=own)
    # patch, the packed projection, the output projection (a Gemm the attention itself runs), linear1, linear2,
    # head; the two activation x activation MatMuls (scores, and scores x values) stay float
    assert c["quantized_nodes"] == 6 and c["float_nodes"] == ["encoder.layers.0.self_attn"] * 2


def test_qat_kd_stage(tiny_recipe, tmp_path):
    """The stage itself on the tiny data, with an untrained teacher (the pipeline around it is tested with
    ptq-ort in test_quantize.py): fake quant, one epoch against the teacher, QDQ export, checks, parity."""
    from compressor.data import load_data
    from compressor.models import ResNet
    from compressor.stages.quantize import run as stage

    r = copy.deepcopy(tiny_recipe)
    r["quantize"] = {"mode": "qat-kd", "epochs": 1, "calibration": 64}
    recipe = load_recipe(r)
    data = load_data(recipe.data, 0)
    torch.manual_seed(0)
    ctx = Context(recipe, tmp_path, data, teacher=ResNet(widths=(8,), depths=(1,), in_channels=1).eval(),
                  teacher_origin={}, student=ResNet(widths=(4, 8), depths=(1, 1), in_channels=1).eval(), genome={},
                  task=Classification(), log=lambda s: None)
    rec = stage(ctx).metrics
    assert rec["tool"] == "nncf" and rec["bn_folded"] and rec["qat"]["epochs"] == 1
    assert set(rec["checks"]["ops"]) <= {"QuantizeLinear", "DequantizeLinear", "Conv", "Gemm", "Add", "Relu",
                                         "GlobalAveragePool", "Flatten", "Identity"}
    par = rec["parity"]
    assert par["against"] == "fake-quantized PyTorch" and par["onnxruntime"]["max_rel_to_range"] <= 0.02
    try:
        import openvino  # noqa: F401

        assert par["openvino"]["max_rel_to_range"] <= 0.02
    except ImportError:
        assert par["openvino"] == "not installed (skipped)"
    q = ctx.quality["student_int8"]
    assert q["mode"] == "qat-kd" and 0 <= q["onnx_accuracy"] <= 1 and "fake_quant_accuracy" in q
    assert [a.precision for a in ctx.artifacts] == ["int8"] and (tmp_path / "model" / "student.int8.onnx").is_file()


class _DictCNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU())
        self.head = nn.Linear(8, 10)

    def forward(self, x):
        f = self.stem(x).mean((2, 3))
        return {"logits": self.head(f), "features": f}


class _PlainCNN(_DictCNN):
    def forward(self, x):
        return super().forward(x)["logits"]


@pytest.mark.parametrize("cls", [_PlainCNN, _DictCNN])
def test_nncf_quantizes_the_input_of_an_adapted_model(cls, tmp_path):
    """A model returning a dict is adapted (compressor.intake); NNCF binds the model's inputs to forward's
    parameter names, so the adapted forward must show the class's, or the first layer's input goes unquantized."""
    import inspect

    from compressor.intake import intake, is_adapted

    torch.manual_seed(0)
    model = cls().eval()
    x = torch.randn(64, 1, 12, 12)
    model = intake(model, model(x))
    assert is_adapted(model) == (cls is _DictCNN)
    ctx = _ctx(tmp_path, x)
    q = nncf_quantize(model, x, ctx.recipe.quantize, "uint8", [])
    _, out = _nncf_export(q, ctx)
    assert check_qdq(out)["quantized_nodes"] == 2  # raised "without Q/DQ on their inputs: Conv stem.0" (dict)
    assert list(inspect.signature(model.forward).parameters) == ["x"]


def test_a_quantizer_nncf_shares_between_hook_points_is_exported_as_standard_qdq(tmp_path):
    """ShuffleNet's chunk and cat: NNCF shares one activation quantizer between several hook points, and
    nncf.strip converted it under the first name only; the file held org.openvinotoolkit FakeQuantize ops and
    the quantize stage refused it."""


    torch.manual_seed(0)
    model, x = U.shufflenet().eval(), torch.randn(64, 1, 16, 16)
    ctx = _ctx(tmp_path, x)
    stripped, out = _nncf_export(nncf_quantize(fold_batchnorm(model, log=ctx.log), x, ctx.recipe.quantize,
                                               "uint8", []), ctx)
    assert {n.domain for n in onnx.load(str(out)).graph.node} <= {""}
    c = check_qdq(out)
    assert c["quantized_nodes"] >= 8 and not c["float_nodes"]
    with torch.no_grad():
        ref = stripped(x).numpy()
    assert np.abs(run_onnxruntime(out, x.numpy()) - ref).max() < 0.05 * np.abs(ref).max()


def test_weight_normalised_convolutions_get_weight_quantizers(tmp_path):
    """NNCF sees no constant weight behind torch.nn.utils.parametrizations.weight_norm and put no quantizer on
    those convolutions; the quantize stage refused the file (convolutions without Q/DQ). The student's copy is
    folded first."""

    from compressor.stages.quantize import nncf_int8


    torch.manual_seed(0)
    x = torch.randn(64, 1, 16, 16)
    ctx = _ctx(tmp_path, x)
    ctx.student, ctx.metric = U.weight_norm_cnn().eval(), "accuracy"
    ctx.score = lambda m: {"accuracy": 0.0}  # not what this checks
    said = []
    ctx.log = said.append
    _, out, _ = nncf_int8(ctx, ctx.recipe.quantize, x, "uint8", [])
    assert check_qdq(out)["quantized_nodes"] == 4 and any("weight normalisation folded" in s for s in said)
    assert hasattr(ctx.student.c1, "parametrizations")  # the student itself is left as it was


def test_a_cast_to_float_between_a_dq_and_its_conv_is_not_a_missing_quantizer(tmp_path):
    """DINOv2 casts its pixels to the patch convolution's dtype: a float->float Cast sat between the input's
    DequantizeLinear and the Conv, and the check called the Conv unquantized."""
    pytest.importorskip("transformers")


    from compressor.intake import intake
    from compressor.tasks import call

    torch.manual_seed(0)
    x = torch.randn(64, 1, 16, 16)
    model = U.hf_dinov2()
    with torch.no_grad():
        intake(model, call(model, x[:2]))
    ctx = _ctx(tmp_path, x)
    _, out = _nncf_export(nncf_quantize(model, x, ctx.recipe.quantize, "uint8", []), ctx)
    c = check_qdq(out)
    assert "dinov2.embeddings.patch_embeddings.projection" not in " ".join(c["float_nodes"])
    assert c["quantized_nodes"] >= 10


def test_a_depthwise_conv1d_gets_its_quantizers(tmp_path):
    """NNCF 3.4 misspells the depthwise Conv1d metatype's hw_config_names: no quantizer went on ConvBERT's span
    convolution and the quantize stage refused the file. compressor sets the attribute."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv1d(4, 8, 3, padding=1), nn.ReLU(), nn.Conv1d(8, 8, 3, padding=1, groups=8),
                          nn.ReLU(), nn.AdaptiveAvgPool1d(1), nn.Flatten(), nn.Linear(8, 3)).eval()
    x = torch.randn(64, 4, 16)
    ctx = _ctx(tmp_path, x)
    _, out = _nncf_export(nncf_quantize(model, x, ctx.recipe.quantize, "uint8", []), ctx)
    c = check_qdq(out)
    assert c["quantized_nodes"] == 3 and not c["float_nodes"]


def test_convberts_depthwise_span_convolution_runs_in_onnx_runtime(tmp_path):
    """Given a depthwise convolution's rules, NNCF put a per-channel quantizer on ConvBERT's span convolution
    input before its transpose, on the token axis (16 scales for 16 tokens), and ONNX Runtime refused the file:
    'QLinearConv : input zero point must be a scalar'. It gets a plain convolution's rules: one scale."""
    import onnxruntime as ort

    from compressor.intake import intake
    from compressor.tasks import call

    pytest.importorskip("transformers")
    sys.path.insert(0, str(Path(__file__).parent))
    import user_models as U

    m = U.hf_convbert().eval()
    x = {"input_ids": torch.randint(1, 256, (64, 16), generator=torch.Generator().manual_seed(0)),
         "attention_mask": torch.ones(64, 16, dtype=torch.long)}
    model = intake(m, call(m, x), names=tuple(x))
    ctx = _ctx(tmp_path, x)
    ctx.example = lambda n=1: {k: v[:n] for k, v in x.items()}
    _, out = _nncf_export(nncf_quantize(model, x, ctx.recipe.quantize, "uint8", []), ctx)
    sess = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    got = sess.run(None, {i.name: x[i.name][:4].numpy() for i in sess.get_inputs()})[0]
    assert got.shape == (4, 4)


class _PoolNet(nn.Module):
    """A max-pool between convolutions (a ResNet stem), a position bias an MLP computes from a buffer (Swin V2),
    a max over positions and the last time step picked before the head (PointNet, a TCN)."""

    def __init__(self):
        super().__init__()
        self.c1, self.c2, self.pool = nn.Conv2d(1, 16, 3, 1, 1), nn.Conv2d(16, 32, 3, 1, 1), nn.MaxPool2d(2)
        ys, xs = torch.meshgrid(torch.linspace(-1, 1, 6), torch.linspace(-1, 1, 6), indexing="ij")
        self.register_buffer("coords", torch.stack([xs, ys], -1).reshape(36, 2))
        self.pos = nn.Sequential(nn.Linear(2, 16), nn.ReLU(), nn.Linear(16, 32))
        self.fc, self.head = nn.Linear(32, 32), nn.Linear(64, 3)

    def forward(self, x):
        h = torch.relu(self.c2(self.pool(torch.relu(self.c1(x))))).flatten(2).transpose(1, 2) + self.pos(self.coords)
        return self.head(torch.cat([self.fc(h.amax(1)), self.fc(h[:, -1])], 1))


def test_values_picked_after_the_dequantize_and_constant_tables_pass_the_check(tmp_path):
    """NNCF quantizes a MaxPool's, a ReduceMax's and an index's input, not their output, and leaves an MLP over a
    buffer float (no input reaches it): the check called each consumer unquantized and refused the file (a UNet,
    a TCN, PointNet, Swin V2, and HF ResNet's MaxPool stem, with no pruning at all)."""
    import onnxruntime as ort

    torch.manual_seed(0)
    model = _PoolNet().eval()
    x = torch.randn(64, 1, 12, 12)
    ctx = _ctx(tmp_path, x)
    _, out = _nncf_export(nncf_quantize(model, x, ctx.recipe.quantize, "uint8", []), ctx)
    c = check_qdq(out)
    assert {f.split(" (")[0] for f in c["float_nodes"] if "constant" in f} == {"pos.0", "pos.2"}
    assert c["quantized_nodes"] >= 4
    sess = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    got = sess.run(None, {sess.get_inputs()[0].name: x[:4].numpy()})[0]
    with torch.no_grad():
        assert np.abs(got - model(x[:4]).numpy()).max() < 0.1 * np.abs(model(x[:4]).numpy()).max()


def test_only_a_descriptors_method_wrapper_is_deep_copied_by_reference():
    """NNCF's graph holds Tensor.T's __get__ wrapper, which deepcopy could not take; the rule registered for it must
    still re-bind a wrapper of an ordinary object to the copy (found by review: a copy's bound __len__ read the
    original's list)."""
    import copy

    from compressor.quantize import _copyable_method_wrappers

    _copyable_method_wrappers()
    get = torch.Tensor.T.__get__
    assert copy.deepcopy(get) is get

    class Box:
        def __init__(self):
            self.items = [1]
            self.size = self.items.__len__

    b = copy.deepcopy(Box())
    b.items.append(2)
    assert b.size() == 2


def test_squeeze_excitation_layers_nncf_leaves_float_pass_the_check(tmp_path):
    """NNCF's SE_BLOCK pattern keeps a squeeze-excitation's two layers float on purpose; the Q/DQ check called
    them unquantized, so every SE model (the tests' depthwise CNN, RegNetY, EfficientNet, MobileNetV3) was
    refused under ptq-nncf and qat-kd. They are listed as float; the block's other convolutions are not."""


    torch.manual_seed(0)
    model, x = U.dw_cnn().eval(), torch.randn(64, 1, 16, 16)
    ctx = _ctx(tmp_path, x)
    _, out = _nncf_export(nncf_quantize(fold_batchnorm(model, log=ctx.log), x, ctx.recipe.quantize, "uint8", []),
                          ctx)
    c = check_qdq(out)
    se = [f for f in c["float_nodes"] if f.endswith("(squeeze-excitation)")]
    assert len(se) == len(c["float_nodes"]) == 8 and all(".fc1 " in f or ".fc2 " in f for f in se)
    assert c["quantized_nodes"] >= 12


def test_an_nncf_failure_names_where_nncf_gave_up_and_what_quantizes_without_it(tmp_path, monkeypatch):
    """An NNCF failure deep inside its quantizer setup (ModernBERT's once: 'cannot pickle getset_descriptor')
    said only that, with no way forward."""
    import nncf

    from compressor.errors import StageError

    ns = {}
    exec(compile("def quantize(*a, **k):\n    raise TypeError(\"cannot pickle 'getset_descriptor' object\")\n",
                 str(Path("site-packages") / "nncf" / "quantization" / "setup.py"), "exec"), ns)
    monkeypatch.setattr(nncf, "quantize", ns["quantize"])
    x = torch.randn(32, 1, 12, 12)
    with pytest.raises(StageError, match=r"TypeError: cannot pickle 'getset_descriptor' object \(in NNCF's "
                                         r"quantize \(setup.py:2\)\); quantize.mode: ptq-ort or ptq-dynamic"):
        nncf_quantize(Scaled().eval(), x, _ctx(tmp_path, x).recipe.quantize, "uint8", [])
