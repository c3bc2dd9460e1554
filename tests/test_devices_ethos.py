"""Ethos-U: a full-int8 TFLite of a small CNN through litert-torch, Vela's estimate on two configurations,
and a clear message for an operator the NPU does not run."""
import pytest
import torch
from torch import nn

from devices import DeviceError, get_device
from devices.ethos import parse_vela
from exporters import ExportError

STDOUT = """Network summary for net
CPU operators = 1 (12.5%)
   CPU: Passthrough = net;1 (outputs [1, 8])
NPU operators = 7 (87.5%)
Warning (supported operators) operator: SIN, ofm: 'net;1'
"""
CSV = ("experiment,network,accelerator_configuration,system_config,memory_mode,core_clock,inference_time,"
       "inferences_per_second,sram_memory_used,dram_memory_used,on_chip_flash_memory_used,"
       "off_chip_flash_memory_used,total_original_weights,total_npu_encoded_weights,nn_macs,cycles_npu,cycles_total\n"
       "default,net,Ethos_U55_128,Ethos_U55_High_End_Embedded,Shared_Sram,500000000.0,1.5e-05,66666.7,5.3,0.0,0.0,"
       "2.5,2560,2064,130208,6953,7384\n")


def test_parse_vela_golden(tmp_path):
    f = tmp_path / "net_summary_Ethos_U55_High_End_Embedded.csv"
    f.write_text(CSV)
    r = parse_vela(STDOUT, f)
    assert r["cpu_ops"] == ["SIN (net;1)"] and r["cpu_op_count"] == 1 and r["npu_op_count"] == 7
    assert r["inference_time_s"] == 1.5e-05 and r["cycles_total"] == 7384 and r["sram_used_kib"] == 5.3
    assert r["off_chip_flash_used_kib"] == 2.5 and r["system_config"] == "Ethos_U55_High_End_Embedded"


def test_estimator_rejects_bad_input(tmp_path):
    dev = get_device("ethos-u55-128")
    if not dev.available():
        pytest.skip(dev.why_unavailable())
    f = tmp_path / "m.onnx"
    f.write_bytes(b"x")
    with pytest.raises(DeviceError, match="estimates a .tflite"):
        dev.measure(f)
    with pytest.raises(DeviceError, match="does not list precision 'fp32'"):
        dev.measure(f, precision="fp32")
    g = tmp_path / "garbage.tflite"
    g.write_bytes(b"not a flatbuffer")
    with pytest.raises(DeviceError, match="Vela rejected garbage.tflite"):
        dev.measure(g)


class SmallCNN(nn.Module):
    def __init__(self, act=nn.ReLU):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), act(), nn.Conv2d(8, 16, 3, stride=2, padding=1),
                                  nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10))

    def forward(self, x):
        return self.body(x)


class Sine(nn.Module):
    def forward(self, x):
        return torch.sin(x)


@pytest.fixture(scope="module")
def tflite(tmp_path_factory):
    pytest.importorskip("litert_torch", reason="litert-torch is not installed (pip install 'compressor[ethos]')")
    from exporters.ethos import export_tflite_int8

    torch.manual_seed(0)
    d = tmp_path_factory.mktemp("ethos")
    model = SmallCNN().eval()
    art = export_tflite_int8(model, (torch.randn(1, 1, 16, 16),), d / "cnn.tflite",
                             calibration=[torch.randn(16, 1, 16, 16)], check_inputs=torch.randn(8, 1, 16, 16))
    return d, art


def test_int8_tflite_is_full_integer(tflite):
    _, art = tflite
    assert art.format == "tflite" and art.precision == "int8"
    assert art.inputs[0]["dtype"] == "int8" and art.outputs[0]["dtype"] == "int8"
    assert art.extra["calibration_batches"] == 16
    assert art.extra["parity"]["max_abs"] < 0.1  # int8 against fp32 logits of a random small CNN


@pytest.mark.parametrize("name", ["ethos-u55-128", "ethos-u85-256"])
def test_vela_estimate(tflite, name):
    from devices import load_profile

    d, art = tflite
    dev = get_device(name)
    m = dev.measure(art.path)
    assert m.estimated and m.label == "estimated" and m.runtime == "vela" and m.provider == name
    assert m.p50_ms > 0 and m.runs == 0
    assert m.extra["cpu_ops"] == [] and m.extra["npu_op_count"] > 0
    assert m.extra["cycles_total"] > 0 and m.extra["sram_used_kib"] > 0
    assert m.extra["core_clock_hz"] == {"ethos-u55-128": 500e6, "ethos-u85-256": 1e9}[name]
    assert m.p50_ms == pytest.approx(m.extra["cycles_total"] / m.extra["core_clock_hz"] * 1e3, rel=0.01)
    assert m.input_shapes == {art.inputs[0]["name"]: [1, 1, 16, 16]}
    m.add_roofline(2 * m.extra["nn_macs"], load_profile(name))
    assert 0 < m.roofline <= 1
    with pytest.raises(DeviceError, match="batch 1"):
        dev.measure(art.path, batch=2)


def test_compile_vela_writes_the_deployable_file(tflite):
    from exporters.ethos import compile_vela

    d, art = tflite
    v = compile_vela(art.path, d / "vela", accelerator_config="ethos-u55-128",
                     system_config="Ethos_U55_High_End_Embedded", memory_mode="Shared_Sram")
    assert v.format == "vela" and v.path.endswith("cnn_ethos-u55-128_vela.tflite")
    assert (d / "vela" / v.extra["summary_csv"]).is_file() and v.extra["inference_time_s"] > 0
    assert not [p for p in (d / "vela").iterdir() if p.name.startswith(".")]  # no temporaries left


def test_operator_the_npu_rejects(tflite):
    from exporters.ethos import compile_vela, export_tflite_int8

    d, _ = tflite
    model = SmallCNN(act=Sine).eval()
    art = export_tflite_int8(model, (torch.randn(1, 1, 16, 16),), d / "sine.tflite")
    assert art.extra["warning"] == "calibrated on the example input only"
    with pytest.raises(ExportError, match=r"Vela placed \d+ operator\(s\) of sine.tflite on the CPU.*SIN") as e:
        compile_vela(art.path, d / "vela", accelerator_config="ethos-u55-128")
    assert "\n" not in str(e.value)
    # The estimate still comes, with the fallback named: its CPU time is not in the figure.
    m = get_device("ethos-u55-128").measure(art.path)
    assert any("SIN" in op for op in m.extra["cpu_ops"])
    assert any("not in the estimate" in n for n in m.notes)


def test_float_tflite_is_refused(tflite):
    import litert_torch

    d, _ = tflite
    model = nn.Sequential(nn.Conv2d(1, 8, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 14 * 14, 10)).eval()
    litert_torch.convert(model, (torch.randn(1, 1, 16, 16),)).export(str(d / "float.tflite"))
    with pytest.raises(DeviceError, match="placed no operator of float.tflite on the ethos-u85-256.*full-int8"):
        get_device("ethos-u85-256").measure(d / "float.tflite")
