import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from devices import DeviceError, get_device, load_profile
from exporters import ExportError
from exporters.onnx import describe, export_onnx, parity


class Tiny(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(1, 4, 3, padding=1)
        self.head = torch.nn.Linear(4, 3)

    def forward(self, x):
        return self.head(torch.relu(self.conv(x)).mean((2, 3)))


@pytest.fixture
def tiny_onnx(tmp_path):
    torch.manual_seed(0)
    m = Tiny().eval()
    art = export_onnx(m, (torch.randn(2, 1, 8, 8),), tmp_path / "m.onnx")
    return m, art, tmp_path / "m.onnx"


def test_export_has_dynamic_batch_and_passes_parity(tiny_onnx):
    m, art, path = tiny_onnx
    assert art.inputs == [{"name": "input", "shape": ["batch", 1, 8, 8], "dtype": "float"}]
    assert art.outputs[0]["shape"] == ["batch", 3] and art.opset == 17 and len(art.sha256) == 64
    r = parity(path, m, torch.randn(7, 1, 8, 8))
    assert r["ok"] and r["max_abs"] < 1e-5 and r["samples"] == 7


def test_parity_mismatch_fails_clearly(tiny_onnx):
    m, _, path = tiny_onnx
    with torch.no_grad():
        m.head.bias += 1.0
    with pytest.raises(ExportError, match="differs from PyTorch beyond tolerance: max abs error"):
        parity(path, m, torch.randn(4, 1, 8, 8))


def test_export_of_untraceable_model_is_an_export_error(tmp_path):
    class Bad(torch.nn.Module):
        def forward(self, x):
            return torch.linalg.eig(x.reshape(2, 2))[0].real

    with pytest.raises(ExportError, match="ONNX export of Bad failed"):
        export_onnx(Bad(), (torch.randn(4),), tmp_path / "bad.onnx", dynamic_batch=False)
    assert not list(tmp_path.iterdir())  # nothing half-written


def test_describe_rejects_non_onnx(tmp_path):
    p = tmp_path / "x.onnx"
    p.write_bytes(b"\x00garbage" * 10)
    with pytest.raises(ExportError, match="not a readable ONNX model"):
        describe(p)


def test_cpu_device_measures(tiny_onnx):
    _, _, path = tiny_onnx
    dev = get_device("local-cpu")
    assert dev.available()
    m = dev.measure(path, batch=3, warmup=2, runs=20)
    assert m.estimated is False and m.runs == 20 and m.threads == 2 and m.batch == 3
    assert m.input_shapes == {"input": [3, 1, 8, 8]}
    assert 0 < m.min_ms <= m.p50_ms <= m.p90_ms <= m.p99_ms
    assert m.runtime == "onnxruntime" and m.runtime_version


def test_device_errors():
    with pytest.raises(DeviceError, match="unknown device 'nope'; known devices: .*local-cpu"):
        load_profile("nope")
    with pytest.raises(DeviceError, match="does not list precision 'fp16'"):
        get_device("local-cpu").measure("x.onnx", precision="fp16")


def test_bench_script_needs_only_onnxruntime_and_numpy(tiny_onnx):
    src = Path(__file__).resolve().parent.parent / "devices" / "bench_onnxruntime.py"
    mods = set()
    for node in ast.walk(ast.parse(src.read_text())):
        if isinstance(node, ast.Import):
            mods |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            mods.add((node.module or "").split(".")[0])
    assert mods - set(sys.stdlib_module_names) == {"onnxruntime", "numpy"}
    out = subprocess.run([sys.executable, str(src), str(tiny_onnx[2]), "--runs", "10", "--threads", "1"],
                         capture_output=True, text=True, check=True, cwd=tiny_onnx[2].parent)
    r = json.loads(out.stdout)
    assert r["runs"] == 10 and r["p50_ms"] > 0 and r["estimated"] is False


def test_big_models_write_external_data(tmp_path, monkeypatch):
    """Over 2 GB a model's weights go to one <name>.data file beside it (threshold lowered for the test)."""
    import exporters.onnx as eo

    monkeypatch.setattr(eo, "EXTERNAL_DATA_BYTES", 1000)
    torch.manual_seed(0)
    m = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 32), torch.nn.ReLU(), torch.nn.Linear(32, 10))
    art = export_onnx(m, (torch.randn(2, 1, 8, 8),), tmp_path / "big.onnx")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["big.onnx", "big.onnx.data"]
    data = (tmp_path / "big.onnx.data").stat().st_size
    assert data >= 64 * 32 * 4 and art.bytes == (tmp_path / "big.onnx").stat().st_size + data
    assert parity(tmp_path / "big.onnx", m, torch.randn(3, 1, 8, 8))["ok"]
    m2 = get_device("local-cpu").measure(tmp_path / "big.onnx", warmup=1, runs=5)
    assert m2.runs == 5
