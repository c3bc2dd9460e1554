"""Crash and interrupt a real `compress run` subprocess; `--resume` must finish the job."""
import os
import signal
import subprocess
import sys
import time

import torch
import yaml

from conftest import TINY


def start(recipe_path, out, *extra, hold=None):
    """``hold``: a file; while it exists the run waits after each stage it records (COMPRESSOR_HOLD)."""
    env = {**os.environ, **({"COMPRESSOR_HOLD": str(hold)} if hold else {})}
    # A shell that starts the test runner in the background (`pytest ... &`) ignores SIGINT, and its
    # children inherit that, so Python would never raise KeyboardInterrupt: give the run the default.
    return subprocess.Popen([sys.executable, "-m", "compressor.cli", "run", str(recipe_path), "--out", str(out), *extra],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


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
    hold = tmp_path / "hold"
    hold.write_text("epoch")  # the run waits at each epoch's start: it cannot finish before the kill
    p = start(recipe, out, hold=hold)
    wait_for(last, p)
    epoch_at_kill = None
    for _ in range(200):  # the checkpoint may be mid-rename when it first appears
        try:
            epoch_at_kill = torch.load(last, map_location="cpu", weights_only=True)["epoch"]
            break
        except Exception:
            time.sleep(0.05)
    assert epoch_at_kill is not None
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
    recipe, out = recipe_file(tmp_path, epochs=6), tmp_path / "b"
    hold = tmp_path / "hold"
    hold.write_text("epoch")  # the run waits at each epoch's start: the signal lands in distillation on any host
    p = start(recipe, out, hold=hold)
    wait_for(tmp_path / "hold.held", p)  # in distillation, waiting at the second epoch's start
    p.send_signal(signal.SIGINT)
    try:
        _, err = p.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        p.kill()
        raise AssertionError(f"still running 120 s after SIGINT:\n{p.communicate()[1][-3000:]}") from None
    assert p.returncode == 130, err
    assert "Traceback" not in err
    resume_lines = [l for l in err.splitlines() if "--resume" in l]
    assert len(resume_lines) == 1 and f"--out {out} --resume" in resume_lines[0]
    assert (tmp_path / "b.partial" / "stages" / "analyze.json").is_file() and not out.exists()



# A 64-student space (the tiny teacher's own is 16) and ten generations: long enough to kill mid-search.
SEARCH = {"trials": 100, "population": 10, "batch_size": 16,
          "space": {"width_0": [4, 8, 12, 16], "width_1": [4, 8, 12, 16, 20, 24, 28, 32], "kernel": [3, 5]}}


def stored_trials(db):
    """(number, state, candidate record) of each trial in an SQLite study."""
    import json
    import sqlite3

    con = sqlite3.connect(db)
    try:
        rows = con.execute("SELECT t.number, t.state, a.value_json FROM trials t LEFT JOIN trial_user_attributes a "
                           "ON a.trial_id = t.trial_id AND a.key = 'candidate' ORDER BY t.number").fetchall()
    finally:
        con.close()
    return [(n, s, json.loads(v) if v else None) for n, s, v in rows]


def test_sigkill_during_search_then_resume(tmp_path):
    import json
    import re
    import threading

    r = dict(TINY, search=SEARCH, budgets={"size_mb": 0.05}, targets=[],
             distill={"epochs": 1, "lr": 0.01, "trainer": {"extra": {"limit_train_batches": 2}}})
    recipe, out = tmp_path / "r.yaml", tmp_path / "b"
    recipe.write_text(yaml.safe_dump(r))
    p = start(recipe, out)
    t0 = time.time()
    # The local study is written once per generation, and the progress line comes right after the write:
    # kill as soon as the line for the second generation shows (reading the log, not the database, so
    # the test never holds a lock the search waits for).
    lines, second = [], threading.Event()

    def read():
        for line in p.stderr:
            lines.append(line)
            if line.startswith("search 20/100:"):
                second.set()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    assert second.wait(120), "".join(lines)
    p.send_signal(signal.SIGKILL)
    p.wait()
    reader.join(5)
    killed_at = time.time() - t0
    logged = [int(i) for i in re.findall(r"^search (\d+)/100:", "".join(lines), re.M)]
    before = stored_trials(tmp_path / "b.partial" / "work" / "search.db")
    assert all(s == "COMPLETE" for _, s, _ in before)  # nothing RUNNING or half-written
    assert logged[-1] <= len(before) < SEARCH["trials"]  # what the log called done is kept; killed mid-search

    res = subprocess.run([sys.executable, "-m", "compressor.cli", "run", str(recipe), "--out", str(out), "--resume"],
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    assert "[analyze] done earlier" in res.stderr
    assert f"resuming study 'tiny-search' ({len(before)} trials done, {100 - len(before)} to go)" in res.stderr
    v = subprocess.run([sys.executable, "-m", "compressor.cli", "verify", str(out)], capture_output=True, text=True)
    assert v.returncode == 0, v.stderr
    assert not (tmp_path / "b.partial").exists() and not list(tmp_path.rglob("*.tmp"))

    manifest = json.loads((out / "manifest.json").read_text())
    rec = next(s for s in manifest["stages"] if s["name"] == "search")
    assert rec["metrics"]["trials"] == 100 and rec["metrics"]["added_here"] == 100 - len(before)
    cands = json.loads((out / "search" / "candidates.json").read_text())["candidates"]
    assert len(cands) == 100
    # The trials stored before the kill are the first ones of the finished study, unchanged, not re-run.
    for (_, _, c), after in zip(before, cands):
        assert (c["key"], c["metrics"]) == (after["key"], after["metrics"])
    print(f"\nsearch killed {killed_at:.1f} s after start: {len(before)} trials stored (last progress line "
          f"{logged[-1]}); the resumed run added {100 - len(before)}; whole test {time.time() - t0:.1f} s")


def test_a_second_run_on_the_same_directory_refuses_at_once(tmp_path):
    recipe, out = recipe_file(tmp_path, epochs=2), tmp_path / "b"
    hold = tmp_path / "hold"
    hold.touch()
    first = start(recipe, out, hold=hold)
    wait_for(tmp_path / "b.partial" / "stages" / "analyze.json", first)  # held after analyze, however fast the host
    for extra in ([], ["--resume"], ["--force"]):
        t0 = time.time()
        second = subprocess.run([sys.executable, "-m", "compressor.cli", "run", str(recipe), "--out", str(out), *extra],
                                capture_output=True, text=True, timeout=120)
        assert first.poll() is None
        assert second.returncode == 2, second.stderr
        assert f"a run (pid {first.pid}, started " in second.stderr and "b.partial" in second.stderr
        assert "Traceback" not in second.stderr and time.time() - t0 < 60
    hold.unlink()
    assert first.wait(timeout=300) == 0, first.stderr.read()
    v = subprocess.run([sys.executable, "-m", "compressor.cli", "verify", str(out)], capture_output=True, text=True)
    assert v.returncode == 0, v.stderr
    assert not (tmp_path / "b.lock").exists()


def test_a_killed_runs_lock_is_free_for_resume(tmp_path):
    recipe, out = recipe_file(tmp_path, epochs=2), tmp_path / "b"
    hold = tmp_path / "hold"
    hold.touch()
    p = start(recipe, out, hold=hold)
    wait_for(tmp_path / "b.partial" / "stages" / "analyze.json", p)
    p.send_signal(signal.SIGKILL)
    p.wait()
    assert (tmp_path / "b.lock").exists()  # the file stays; the kernel released its lock
    r = subprocess.run([sys.executable, "-m", "compressor.cli", "run", str(recipe), "--out", str(out), "--resume"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert not (tmp_path / "b.lock").exists()
