"""Several search workers on one shared study, and a killed worker's trial: nothing lost, nothing scored twice."""
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch
import yaml

from conftest import TINY

optuna = pytest.importorskip("optuna")

# The tiny teacher's own space has 16 students; 64 leave the workers something to disagree about.
SPACE = {"width_0": [4, 8, 12, 16], "width_1": [4, 8, 12, 16, 20, 24, 28, 32], "kernel": [3, 5]}
TRIALS = 60


def worker(recipe, storage, out):
    return subprocess.Popen([sys.executable, "-m", "compressor.cli", "search", str(recipe), "--storage", storage,
                             "--study", "shared", "--worker", "--out", str(out)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.fixture(scope="module")
def cached_teacher():
    """Train (or find) the tiny teacher once here: two workers training it at once on a busy machine took
    minutes, and one found the study finished when it got to it."""
    from compressor.data import load_data
    from compressor.recipe import load_recipe
    from compressor.teacher import load_teacher

    recipe = load_recipe(dict(TINY))
    load_teacher(recipe, load_data(recipe.data, recipe.seed), log=lambda s: None)


def two_workers(tmp_path, storage):
    r = dict(TINY, search={"trials": TRIALS, "population": 8, "batch_size": 16, "space": SPACE},
             budgets={"size_mb": 0.05}, targets=[])
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump(r))
    t0 = time.time()
    procs = [worker(recipe, storage, tmp_path / f"w{i}") for i in (1, 2)]
    for p in procs:
        _, err = p.communicate(timeout=240)
        assert p.returncode == 0, err
    seconds = time.time() - t0
    bests = [json.loads((tmp_path / f"w{i}" / "best.json").read_text()) for i in (1, 2)]
    trials = optuna.load_study(study_name="shared", storage=storage).trials
    complete = [t for t in trials if t.state.name == "COMPLETE"]
    added, scored = [b["added_here"] for b in bests], [b["scored_here"] for b in bests]
    keys = {t.user_attrs["candidate"]["key"] for t in complete}
    # No lost trials: every trial finished (none RUNNING or WAITING), and the workers' shares add up.
    assert {t.state.name for t in trials} <= {"COMPLETE", "FAIL"}
    assert sum(added) == len(complete) and all(a > 0 for a in added)
    # Each worker stops once the study holds TRIALS: at most the other's trial in flight goes over.
    assert TRIALS <= len(complete) <= TRIALS + 1
    # A genome already in the study is reused, and one the other worker is scoring is waited for, not
    # scored again. Only a genome drawn while the other is between its suggest calls can slip through:
    # allow one such.
    assert len(keys) <= sum(scored) <= len(keys) + 1
    print(f"\n{storage.split(':')[0]}: {len(complete)} trials ({added[0]} + {added[1]}), {len(keys)} distinct "
          f"genomes, scored {scored[0]} + {scored[1]}, {len(trials) - len(complete)} failed; {seconds:.1f} s")


def test_two_workers_share_one_sqlite_study(tmp_path, cached_teacher):
    two_workers(tmp_path, f"sqlite:///{tmp_path / 'shared.db'}")


def _postgres_bin():
    found = shutil.which("pg_ctl") and shutil.which("initdb")
    if not found:
        versions = sorted(Path("/usr/lib/postgresql").glob("*/bin/pg_ctl"))
        return versions[-1].parent if versions else None
    return Path(shutil.which("pg_ctl")).parent


@pytest.fixture
def postgres_url():
    """A throw-away PostgreSQL server on 127.0.0.1 (as the postgres user when run as root)."""
    pytest.importorskip("psycopg", reason="the PostgreSQL variant needs psycopg (pip install 'compressor[postgres]')")
    bindir = _postgres_bin()
    if bindir is None:
        pytest.skip("PostgreSQL server binaries (initdb, pg_ctl) are not installed")
    as_user = []  # cwd=data below: the postgres user may not be allowed into the caller's directory
    data = Path(tempfile.mkdtemp(prefix="compressor-pg-"))
    if os.geteuid() == 0:  # the server refuses to run as root
        import pwd

        try:
            pw = pwd.getpwnam("postgres")
        except KeyError:
            pytest.skip("running as root and there is no postgres user to run the server as")
        os.chown(data, pw.pw_uid, pw.pw_gid)
        as_user = ["runuser", "-u", "postgres", "--"]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    try:
        subprocess.run([*as_user, bindir / "initdb", "-D", data / "db", "-U", "postgres", "--auth=trust", "-E", "UTF8"],
                       check=True, capture_output=True, timeout=120, cwd=data)
        subprocess.run([*as_user, bindir / "pg_ctl", "-D", data / "db", "-l", data / "log", "-w", "-t", "60", "-o",
                        f"-p {port} -k {data} -c listen_addresses=127.0.0.1 -c fsync=off", "start"],
                       check=True, capture_output=True, timeout=120, cwd=data)
        yield f"postgresql+psycopg://postgres@127.0.0.1:{port}/postgres"
    finally:
        subprocess.run([*as_user, bindir / "pg_ctl", "-D", data / "db", "-m", "immediate", "stop"], capture_output=True, cwd=data)
        shutil.rmtree(data, ignore_errors=True)


def test_two_workers_share_one_postgresql_study(tmp_path, cached_teacher, postgres_url):
    two_workers(tmp_path, postgres_url)


@pytest.mark.filterwarnings("ignore:Heartbeat of storage")
def test_a_killed_workers_trial_is_failed_and_run_again(tmp_path, monkeypatch):
    """A trial left RUNNING by a killed worker (its heartbeat stopped) is marked FAIL when a worker starts,
    and its genome is queued again and completed: not lost, not left RUNNING, not counted as complete."""
    from compressor.search import PROXIES, nsga
    from compressor.search.spaces import Space

    monkeypatch.setattr(nsga, "HEARTBEAT_S", 1)
    monkeypatch.setattr(nsga, "GRACE_S", 1)
    space = Space("mlp", "mlp", {"layers": [1, 2], "width_0": [8, 16, 32, 64], "width_1": [8, 16, 32]})
    url = f"sqlite:///{tmp_path / 's.db'}"
    storage = nsga._storage(optuna, url, shared=True)
    study = optuna.create_study(storage=storage, study_name="s", directions=["maximize", "minimize"])
    dead = study.ask()  # the worker that asked for this trial is killed while scoring it
    params = {g: dead.suggest_categorical(g, c) for g, c in space.genes.items()}
    storage.record_heartbeat(dead._trial_id)
    time.sleep(2.5)  # past the grace period (the storage keeps heartbeats to the second)

    g = torch.Generator().manual_seed(0)
    batch = torch.randn(16, 16, generator=g), torch.randint(0, 4, (16,), generator=g)
    r = nsga.search(space, PROXIES["params"], batch, defaults={"in_features": 16, "num_classes": 4}, trials=6,
                    population=2, storage=url, study_name="s", shared=True, log=lambda s: None)
    trials = optuna.load_study(study_name="s", storage=url).trials
    assert trials[0].state.name == "FAIL"
    retried = [t for t in trials if t.system_attrs.get("failed_trial") == dead.number]
    assert len(retried) == 1 and retried[0].state.name == "COMPLETE" and retried[0].params == params
    assert [t.state.name for t in trials[1:]] == ["COMPLETE"] * 6 and len(r.candidates) == 6
