"""compressor.measure.Meter: one export per model content, one timing per ONNX file, and a round robin
that keeps each model's fastest run; on the local ONNX Runtime CPU device (no timing is asserted)."""
import math

import pytest
import torch
from torch import nn

import exporters.onnx
from compressor.measure import Meter, model_key
from devices import get_device

FAST = {"warmup": 1, "runs": 5, "max_seconds": 0.05}


def _tiny(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))


@pytest.fixture
def exports(monkeypatch):
    """Counts the real exports (export_onnx is imported by the Meter at call time)."""
    calls = []
    real = exporters.onnx.export_onnx

    def counting(*a, **k):
        calls.append(a[2])
        return real(*a, **k)

    monkeypatch.setattr(exporters.onnx, "export_onnx", counting)
    return calls


def test_the_same_model_is_exported_and_timed_once(tmp_path, exports):
    dev = get_device("local-cpu")
    x = torch.randn(4, 8)
    with Meter(dev, cache_dir=tmp_path, **FAST) as meter:
        a = meter.latency_ms(_tiny(), x)
        b = meter.latency_ms(_tiny(), x)  # another object with the same architecture and weights
        assert a > 0 and a == b  # the same file: the same timing within a run
        assert len(exports) == 1 and meter.exports == 1 and meter.measurements == 1
        assert len(list(tmp_path.glob("*.onnx"))) == 1
        # a changed weight is another model: exported again
        changed = _tiny()
        with torch.no_grad():
            changed[0].weight[0, 0] += 1.0
        assert meter.latency_ms(changed, x) > 0
        assert len(exports) == 2 and len(list(tmp_path.glob("*.onnx"))) == 2
        # another input shape too; a batch of the same sample shape is not (batch 1 is exported)
        assert model_key(_tiny(), x[:1]) == model_key(_tiny(), torch.randn(1, 8))
        assert model_key(_tiny(), x[:1]) != model_key(_tiny(), torch.randn(1, 8, dtype=torch.float64))
        meter.export(_tiny(), torch.randn(1, 1, 8))
        assert len(exports) == 3
    # a cache directory given again: its files are reused by a new Meter
    with Meter(dev, cache_dir=tmp_path, **FAST) as again:
        again.export(_tiny(), x)
        assert again.exports == 0 and len(exports) == 3


def test_round_robin_returns_one_positive_figure_per_model(exports):
    measured = []
    dev = get_device("local-cpu")

    class Counting:  # the local CPU device, counting its measurements
        def measure(self, path, **kw):
            measured.append(path)
            return dev.measure(path, **kw)

    models = [_tiny(0), _tiny(1), _tiny(0)]  # the third has the first one's content
    with Meter(Counting(), **FAST) as meter:
        ms = meter.latencies_ms(models, torch.randn(2, 8), rounds=2)
        cache = meter.cache_dir
        assert cache.is_dir()
    assert not cache.exists()  # a temporary cache is removed with the Meter
    assert len(ms) == 3 and all(isinstance(v, float) and v > 0 and math.isfinite(v) for v in ms)
    assert ms[0] == ms[2]  # one file, one figure
    assert len(exports) == 2 and len(measured) == 2 * 2  # two distinct files, measured every round


def test_a_device_without_min_ms_gives_its_p50(tmp_path):
    from types import SimpleNamespace

    class P50Only:
        def measure(self, path, **kw):
            return SimpleNamespace(p50_ms=1.5)

    with Meter(P50Only(), cache_dir=tmp_path) as meter:
        assert meter.latencies_ms([_tiny()], torch.randn(1, 8), rounds=2) == [1.5]
        path = meter.export(_tiny(), torch.randn(1, 8))
        assert meter.measure_file(path).p50_ms == 1.5 and meter.measurements == 2  # cached after the rounds
        assert meter.measure_file(path, fresh=True) and meter.measurements == 3


def test_the_meter_times_the_graph_the_export_stage_ships(tmp_path):
    """A ViT whose class token is expanded to len(x): the TorchScript trace bakes the example's batch in.
    The Meter used to export a batch-1 TorchScript file (which runs, and times differently from what ships);
    it now exports as the export stage does: a dynamic batch, checked at another batch size, torch.export's
    graph where the trace does not match."""
    import numpy as np
    import onnx
    import onnxruntime as ort

    from tests.user_models import ViT

    torch.manual_seed(0)
    vit, x = ViT(depth=1).eval(), torch.randn(1, 1, 16, 16)
    with Meter(get_device("local-cpu"), cache_dir=tmp_path, **FAST) as meter:
        path = meter.export(vit, x)
        assert meter.exporter[path] == "dynamo"
        assert meter.latency_ms(vit, x) > 0
    batch = onnx.load(str(path)).graph.input[0].type.tensor_type.shape.dim[0]
    assert batch.dim_param and not batch.dim_value  # symbolic, as the shipped file's
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for n in (1, 3):
        xs = torch.randn(n, 1, 16, 16)
        with torch.no_grad():
            np.testing.assert_allclose(sess.run(None, {"input": xs.numpy()})[0], vit(xs).numpy(), atol=1e-4, rtol=1e-3)
    # the static form is still there for whoever asks for it: one sample, the trace unchecked
    with Meter(get_device("local-cpu"), cache_dir=tmp_path, dynamic_batch=False, **FAST) as meter:
        fixed = meter.export(vit, x)
        assert fixed != path and meter.exporter[fixed] == "torchscript"
    assert onnx.load(str(fixed)).graph.input[0].type.tensor_type.shape.dim[0].dim_value == 1


class Bag(nn.Module):
    """A token model: dynamic batch and sequence axes, as a text encoder ships."""

    def __init__(self):
        super().__init__()
        self.emb, self.out = nn.Embedding(50, 8), nn.Linear(8, 3)

    def forward(self, input_ids, attention_mask):
        m = attention_mask.unsqueeze(-1).float()
        return self.out((self.emb(input_ids) * m).sum(1) / m.sum(1))


def test_a_token_model_is_timed_at_its_examples_sequence_length(tmp_path):
    """Dynamic batch and sequence axes, as a text encoder ships: the device is given the example's length."""

    seen = []
    dev = get_device("local-cpu")

    class Recording:
        def measure(self, path, **kw):
            seen.append(kw.get("dims"))
            return dev.measure(path, **kw)

    x = {"input_ids": torch.randint(0, 50, (2, 12)), "attention_mask": torch.ones(2, 12, dtype=torch.long)}
    with Meter(Recording(), cache_dir=tmp_path, **FAST) as meter:
        assert meter.latency_ms(Bag().eval(), x) > 0
    assert seen == [{"sequence": 12}]


def test_openvino_is_given_each_inputs_whole_shape(tmp_path):
    """An OpenVINO device cannot size a nameless sequence axis from {"sequence": n}: the Meter hands it every
    input's shape (a search or a latency budget on openvino-cpu with a text encoder failed without it)."""
    pytest.importorskip("openvino")
    dev = get_device("openvino-cpu")
    seen = []

    class Recording:
        profile = dev.profile

        def measure(self, path, **kw):
            seen.append(kw.get("dims"))
            return dev.measure(path, **kw)

    x = {"input_ids": torch.randint(0, 50, (2, 12)), "attention_mask": torch.ones(2, 12, dtype=torch.long)}
    with Meter(Recording(), cache_dir=tmp_path, **FAST) as meter:
        assert meter.latencies_ms([Bag().eval()], x, rounds=1)[0] > 0
    assert seen == [{"input_ids": [1, 12], "attention_mask": [1, 12]}]


class PoolsEos(Bag):
    """BART's classification head: the hidden state at each row's <eos> (id 2), one per row."""

    def forward(self, input_ids, attention_mask):
        h = self.emb(input_ids)
        return self.out(h[input_ids.eq(2)].view(h.shape[0], -1, h.shape[-1])[:, -1, :])


def test_a_model_that_fails_on_the_synthetic_inputs_is_a_device_error(tmp_path):
    """The benchmark feeds token ids 0, so a model that pools its <eos> positions finds none: ONNX Runtime's raw
    error stopped the run in the profile stage, after every other stage had passed. It is now this device's
    error (the profile stage records the target as not measured and goes on), saying why. (OpenVINO runs the
    same graph without an error.)"""
    from devices.profile import DeviceError

    ids = torch.randint(3, 50, (2, 12))
    ids[:, -1] = 2
    x = {"input_ids": ids, "attention_mask": torch.ones(2, 12, dtype=torch.long)}
    path = tmp_path / "eos.onnx"
    exporters.onnx.export_onnx(PoolsEos().eval(), (x["input_ids"], x["attention_mask"]), path,
                               input_names=["input_ids", "attention_mask"], output_names=["logits"],
                               dynamic_axes={"input_ids": {0: "batch", 1: "sequence"},
                                             "attention_mask": {0: "batch", 1: "sequence"}})
    with pytest.raises(DeviceError, match="does not run on the synthetic inputs the benchmark feeds"):
        get_device("local-cpu").measure(path, batch=1, dims={"sequence": 12}, **FAST)
