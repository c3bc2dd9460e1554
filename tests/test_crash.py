"""Crash and interrupt a real `compress run` subprocess; `--resume` must finish the job."""
import os
import signal
import subprocess
import sys
import time

import torch
import yaml

from conftest import TINY


def start(recipe_path, out, *extra):
    return subprocess.Popen([sys.executable, "-m", "compressor.cli", "run", str(recipe_path), "--out", str(out), *extra],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for(path, proc, timeout=180):
    t0 = time.time()
    while not path.is_file():
        assert proc.poll() is None, proc.stderr.read()
        assert time.time() - t0 < timeout, f"{path} never appeared"
        time.sleep(0.05)


def recipe_file(tmp_path, epochs=6):
    r = dict(TINY, distill={"epochs": epochs, "lr": 0.01})
    p = tmp_path / "r.yaml"
    p.write_text(yaml.safe_dump(r))
    return p


def test_sigkill_during_distillation_then_resume(tmp_path):
    recipe, out = recipe_file(tmp_path), tmp_path / "b"
    last = tmp_path / "b.partial" / "work" / "checkpoints" / "last.ckpt"
    p = start(recipe, out)
    wait_for(last, p)
    time.sleep(0.3)  # let the checkpoint's rename settle
    epoch_at_kill = torch.load(last, map_location="cpu", weights_only=True)["epoch"]
    p.send_signal(signal.SIGKILL)
    p.wait()
    assert not out.exists()

    r = subprocess.run([sys.executable, "-m", "compressor.cli", "run", str(recipe), "--out", str(out), "--resume"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "[analyze] done earlier" in r.stderr
    resumed = int(r.stderr.split("resuming distillation after epoch ")[1].split()[0])
    assert resumed >= epoch_at_kill  # at most the epoch in flight was lost
    v = subprocess.run([sys.executable, "-m", "compressor.cli", "verify", str(out)], capture_output=True, text=True)
    assert v.returncode == 0, v.stderr
    assert not (tmp_path / "b.partial").exists()
    assert not [p for p in tmp_path.rglob("*.tmp")]


def test_ctrl_c_stops_cleanly_with_a_resume_line(tmp_path):
    recipe, out = recipe_file(tmp_path, epochs=40), tmp_path / "b"
    p = start(recipe, out)
    wait_for(tmp_path / "b.partial" / "work" / "checkpoints" / "last.ckpt", p)
    p.send_signal(signal.SIGINT)
    _, err = p.communicate(timeout=120)
    assert p.returncode == 130, err
    assert "Traceback" not in err
    resume_lines = [l for l in err.splitlines() if "--resume" in l]
    assert len(resume_lines) == 1 and f"--out {out} --resume" in resume_lines[0]
    assert (tmp_path / "b.partial" / "stages" / "analyze.json").is_file() and not out.exists()
