"""The `compress` command end to end, in a subprocess as a user runs it, and its bad-input contract:
one line on stderr, exit code 2, no traceback, no half-written bundle."""
import json
import os
import subprocess
import sys
import textwrap

import pytest
import yaml

from conftest import TINY


def compress(*args, cwd=None, env=None):
    e = dict(os.environ, **(env or {}))
    return subprocess.run([sys.executable, "-m", "compressor.cli", *args], capture_output=True, text=True,
                          cwd=cwd, env=e, timeout=300)


def write(tmp_path, recipe, name="r.yaml"):
    p = tmp_path / name
    p.write_text(yaml.safe_dump(recipe))
    return p


def test_help_is_fast_and_lists_commands():
    r = compress("--help")
    assert r.returncode == 0
    for cmd in ("run", "verify", "inspect", "devices", "profile"):
        assert cmd in r.stdout


def test_run_verify_inspect_profile(tmp_path):
    recipe = write(tmp_path, TINY)
    out = tmp_path / "bundle"
    r = compress("run", str(recipe), "--out", str(out), "--set", "distill.epochs=1")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == str(out)
    assert "[distill]" in r.stderr and "bundle written" in r.stderr
    m = json.loads((out / "manifest.json").read_text())
    assert m["recipe"]["distill"]["epochs"] == 1
    assert yaml.safe_load((out / "recipe.yaml").read_text())["distill"]["epochs"] == 1

    r = compress("verify", str(out))
    assert r.returncode == 0 and "files match the manifest" in r.stdout
    r = compress("inspect", str(out))
    assert r.returncode == 0 and "| student |" in r.stdout
    r = compress("profile", str(out / "model" / "student.onnx"), "--runs", "10", "--batch", "1", "--batch", "4",
                 "--json")
    assert r.returncode == 0, r.stderr
    ms = json.loads(r.stdout)
    assert [m["batch"] for m in ms] == [1, 4] and all(not m["estimated"] for m in ms)

    # the bundle's own script re-measures with onnxruntime and numpy only
    r = subprocess.run([sys.executable, "bench.py", "model/student.onnx", "--runs", "10"], cwd=out,
                       capture_output=True, text=True)
    assert r.returncode == 0 and json.loads(r.stdout)["runs"] == 10

    # an existing bundle is not overwritten without --force
    r = compress("run", str(recipe), "--out", str(out))
    assert r.returncode == 2 and "already exists" in r.stderr


def test_devices_lists_local_cpu_as_reachable():
    r = compress("devices")
    assert r.returncode == 0
    line = next(l for l in r.stdout.splitlines() if l.startswith("local-cpu"))
    assert "reachable" in line and "unavailable" not in line


def test_tampered_bundle_fails_verify(tiny_bundle, tmp_path):
    import shutil

    b = tmp_path / "b"
    shutil.copytree(tiny_bundle, b)
    with open(b / "model" / "student.onnx", "r+b") as f:
        f.seek(100)
        byte = f.read(1)
        f.seek(100)
        f.write(bytes([byte[0] ^ 0xFF]))
    r = compress("verify", str(b))
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == [r.stderr.strip()]
    assert "student.onnx: modified" in r.stderr


def _bad_teacher_module(tmp_path):
    (tmp_path / "user_bad_models.py").write_text(textwrap.dedent("""
        import torch
        def raises():
            raise RuntimeError("weights server down")
        def wrong_output():
            return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(256, 3))
        def sequential_for_digits():
            return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(7, 10))
    """))


BAD = [
    # (name, recipe changes, extra args, expected words)
    ("missing recipe", None, ["no_such_recipe.yaml"], "does not exist"),
    ("typo'd key", {"distill": {"epochz": 1}}, [], "distill.epochz: unknown key"),
    ("wrong type", {"distill": {"epochs": "many"}}, [], "distill.epochs: Input should be a valid integer"),
    ("unknown device", {"targets": ["tpu-v9"]}, [], "unknown device 'tpu-v9'"),
    ("teacher that does not build", {"teacher": {"model": "user_bad_models:raises"}}, [], "weights server down"),
    ("teacher module missing", {"teacher": {"model": "nowhere_pkg:build"}}, [], "cannot import module 'nowhere_pkg'"),
    ("teacher output not logits", {"teacher": {"model": "user_bad_models:wrong_output"}}, [], "outputs 3 classes but the data has labels up to 9"),
    ("data of the wrong shape", {"teacher": {"model": "user_bad_models:sequential_for_digits"}}, [], "cannot take the data: input of shape (2, 1, 16, 16)"),
    ("missing checkpoint", {"teacher": {"checkpoint": "nope.pt"}}, [], "checkpoint nope.pt does not exist"),
    ("unknown dataset", {"data": {"dataset": "imagenet"}}, [], "is not a built-in dataset"),
    ("bad override", None, ["--set", "distill.lr=-1"], "distill.lr: Input should be greater than 0"),
]


@pytest.mark.parametrize("name, change, extra, words", BAD, ids=[b[0] for b in BAD])
def test_bad_input_is_one_line_exit_2(tmp_path, name, change, extra, words):
    _bad_teacher_module(tmp_path)
    recipe = json.loads(json.dumps(TINY))
    for section, values in (change or {}).items():
        if isinstance(values, dict):
            recipe[section] = {**recipe.get(section, {}), **values}
            if section == "teacher" and "model" in values:
                recipe["teacher"].pop("kwargs", None)
                recipe["teacher"].pop("train", None)
        else:
            recipe[section] = values
    args = ["run"]
    if not (extra and extra[0].endswith(".yaml")):
        args.append(str(write(tmp_path, recipe)))
    args += extra + ["--out", str(tmp_path / "out")]
    r = compress(*args, cwd=tmp_path, env={"PYTHONPATH": str(tmp_path)})
    assert r.returncode == 2, r.stderr
    err = r.stderr.strip()
    assert "Traceback" not in err
    assert err.splitlines()[-1].startswith("error: ") and words in err.splitlines()[-1]
    assert len([l for l in err.splitlines() if l.startswith("error")]) == 1
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.partial").exists()


def test_debug_shows_the_traceback(tmp_path):
    r = compress("--debug", "run", str(tmp_path / "missing.yaml"))
    assert r.returncode != 0 and "Traceback" in r.stderr


def test_pickled_checkpoint_is_refused(tmp_path):
    import torch

    from compressor.models import build_model

    model = build_model("resnet", {"widths": [8, 16], "depths": [1, 1]}, {"in_channels": 1, "num_classes": 10})
    torch.save(model, tmp_path / "whole_model.pt")  # a pickle, not a state_dict
    recipe = json.loads(json.dumps(TINY))
    recipe["teacher"] = {"model": "resnet", "kwargs": {"widths": [8, 16], "depths": [1, 1]},
                         "checkpoint": str(tmp_path / "whole_model.pt")}
    r = compress("run", str(write(tmp_path, recipe)), "--out", str(tmp_path / "out"))
    assert r.returncode == 2 and "pickled Python objects" in r.stderr
