"""The bad-input corpus (tests/bad_inputs/cases.yaml), run through the CLI in-process."""
import json
import shutil
import sys
from pathlib import Path

import pytest
import torch
import yaml

from compressor.cli import main
from compressor.models import ResNet
from conftest import TINY

HERE = Path(__file__).parent / "bad_inputs"
CASES = yaml.safe_load((HERE / "cases.yaml").read_text())


def merge(base: dict, change: dict) -> dict:
    out = json.loads(json.dumps(base))
    for section, value in change.items():
        if value is None:
            out.pop(section, None)
        elif isinstance(value, dict) and isinstance(out.get(section), dict):
            for k, v in value.items():
                if v is None:
                    out[section].pop(k, None)
                else:
                    out[section][k] = v
        else:
            out[section] = value
    return out


def _onnx(tmp, bundle):
    from exporters.onnx import export_onnx

    export_onnx(torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4, 2)), (torch.zeros(1, 4),), tmp / "m.onnx")


def _flip(path: Path, at: int = 200):
    data = bytearray(path.read_bytes())
    data[at] ^= 0xFF
    path.write_bytes(bytes(data))


def _predictor(path: Path, device: str):
    from devices.predictor import LatencyPredictor

    pts = [({"flops": f, "params": f / 10}, 0.01 + f * 1e-6) for f in (1e3, 5e3, 2e4, 8e4)]
    LatencyPredictor.fit(device, pts, method="additive").save(path)


SETUP = {
    "pickled_checkpoint": lambda tmp, b: torch.save(torch.nn.Linear(2, 2), tmp / "whole_model.pt"),
    "other_checkpoint": lambda tmp, b: torch.save(torch.nn.Linear(2, 2).state_dict(), tmp / "other.pt"),
    "wrapped_checkpoint": lambda tmp, b: torch.save(
        {f"module.{k}": v for k, v in ResNet(widths=(8, 16), depths=(1, 1), in_channels=1).state_dict().items()},
        tmp / "wrapped.pt"),
    "garbage_checkpoint": lambda tmp, b: (tmp / "garbage.pt").write_bytes(b"not a checkpoint"),
    "onnx_file": _onnx,
    "garbage_onnx": lambda tmp, b: (tmp / "garbage.onnx").write_bytes(b"\x08\x07garbage" * 50),
    "bad_profile": lambda tmp, b: (_onnx(tmp, b), (tmp / "bad.yaml").write_text("name: x\nkind: tpu\nruntime: onnxruntime\n")),
    "tamper_model": lambda tmp, b: _flip(b / "model" / "student.onnx"),
    "truncate_manifest": lambda tmp, b: (b / "manifest.json").write_text((b / "manifest.json").read_text()[:300]),
    "wrong_schema": lambda tmp, b: (b / "manifest.json").write_text(
        json.dumps({**json.loads((b / "manifest.json").read_text()), "schema": "compressor.manifest/0"})),
    "delete_report": lambda tmp, b: (b / "report.md").unlink(),
    "traversal": lambda tmp, b: _manifest(b, lambda m: m["files"].update({"../../etc/passwd": {"sha256": "0" * 64}})),
    "symlink_out": lambda tmp, b: ((tmp / "outside.md").write_bytes((b / "report.md").read_bytes()),
                                   (b / "report.md").unlink(), (b / "report.md").symlink_to(tmp / "outside.md")),
    "size_lie": lambda tmp, b: _manifest(b, lambda m: m["files"]["report.md"].update({"bytes": 10})),
    "absolute_artifact": lambda tmp, b: _manifest(b, lambda m: m["artifacts"][0].update({"path": "/etc/passwd"})),
    "existing_out": lambda tmp, b: (tmp / "out").mkdir(),
    "garbage_predictor": lambda tmp, b: (tmp / "garbage.json").write_text('{"schema": 1, "device": "local-cpu"'),
    "other_device_predictor": lambda tmp, b: _predictor(tmp / "pi.json", "raspberry-pi-5"),
}


def _manifest(b, change):
    m = json.loads((b / "manifest.json").read_text())
    change(m)
    (b / "manifest.json").write_text(json.dumps(m))


def test_corpus_is_large_and_unique():
    ids = [c["id"] for c in CASES]
    assert len(ids) >= 30 and len(set(ids)) == len(ids)


@pytest.mark.parametrize("case", CASES, ids=[c["id"] for c in CASES])
def test_bad_input(case, tmp_path, tiny_bundle, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(HERE))
    bundle = tmp_path / "bundle"
    shutil.copytree(tiny_bundle, bundle)
    if "setup" in case:
        SETUP[case["setup"]](tmp_path, bundle)
    recipe = tmp_path / "recipe.yaml"
    if "text" in case:
        recipe.write_text(case["text"])
    else:
        recipe.write_text(yaml.safe_dump(merge(TINY, case.get("recipe", {}))))
    args = case.get("args", ["run", "{recipe}", "--out", "{out}"])
    args = [a.format(recipe=recipe, out=tmp_path / "out", bundle=bundle) for a in args]
    before = {p for p in tmp_path.rglob("*")}
    code = main(args)
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert "Traceback" not in err
    errors = [l for l in err.splitlines() if l.startswith("error: ")]
    assert len(errors) == 1 and case["expect"] in errors[0], err
    assert err.splitlines()[-1] == errors[0]
    made = {p for p in tmp_path.rglob("*")} - before
    if case.get("partial"):
        # A stage after the first failed: the finished stages stay in out.partial for --resume, no bundle.
        assert not (tmp_path / "out").exists() and (tmp_path / "out.partial" / "stages" / "analyze.json").is_file()
        made = {p for p in made if p.relative_to(tmp_path).parts[0] != "out.partial"}
    assert not [p for p in made if "out" in p.relative_to(tmp_path).parts[0]], made  # nothing half-written
    sys.modules.pop("user_bad", None)
