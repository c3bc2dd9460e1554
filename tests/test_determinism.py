"""Same recipe and seed: the same searched genome and the same metrics, within a stated tolerance.

On one CPU machine both runs are bit-identical here; the tolerance allows for thread scheduling in
BLAS reductions. Seeds and versions are recorded in the manifest."""
import json

import pytest

import compressor
from conftest import TINY

ACCURACY_TOLERANCE = 0.01  # absolute held-out accuracy
LOSS_TOLERANCE = 1e-3  # relative final training loss


def test_same_recipe_and_seed_same_result(tmp_path):
    pytest.importorskip("optuna")
    r = json.loads(json.dumps(TINY))
    r["search"] = {"trials": 8, "population": 4, "batch_size": 32}
    r["budgets"] = {"size_mb": 0.05}
    r["targets"] = []
    r["distill"]["epochs"] = 2
    ms = [compressor.verify(compressor.run(r, tmp_path / f"run{i}", log=lambda s: None)) for i in range(2)]
    a, b = ms
    assert a["seed"] == b["seed"] == 0 and a["toolchain"]["torch"] == b["toolchain"]["torch"]
    assert a["student"]["config"] == b["student"]["config"]  # the searched genome
    search = [next(s for s in m["stages"] if s["name"] == "search")["metrics"]["best"] for m in ms]
    assert search[0]["genome"] == search[1]["genome"]
    qa, qb = a["quality"], b["quality"]
    assert qa["teacher"]["accuracy"] == qb["teacher"]["accuracy"]
    assert abs(qa["student"]["accuracy"] - qb["student"]["accuracy"]) <= ACCURACY_TOLERANCE
    la, lb = (next(s for s in m["stages"] if s["name"] == "distill")["metrics"]["final_train_loss"] for m in ms)
    assert abs(la - lb) <= LOSS_TOLERANCE * abs(la)
    # the shipped weights and files are the same bytes, apart from what records the time
    assert a["files"]["model/student.pt"]["bytes"] == b["files"]["model/student.pt"]["bytes"]


def test_student_does_not_depend_on_whether_the_teacher_was_cached(tmp_path, monkeypatch):
    """The first run trains the teacher (drawing from the global RNG); the second loads it from the cache.
    Both must start and end with the same student."""
    monkeypatch.setenv("COMPRESSOR_CACHE", str(tmp_path / "cache"))
    r = json.loads(json.dumps(TINY))
    r["targets"] = []
    r["distill"]["epochs"] = 1
    logs = [[], []]
    ms = [compressor.verify(compressor.run(r, tmp_path / f"run{i}", log=logs[i].append)) for i in range(2)]
    trained = [any(line.startswith("teacher epoch") for line in log) for log in logs]
    assert trained == [True, False]
    assert ms[0]["files"]["model/student.pt"]["sha256"] == ms[1]["files"]["model/student.pt"]["sha256"]


def test_an_edited_user_model_is_not_served_the_old_cached_teacher(tmp_path, monkeypatch):
    """The teacher cache is keyed by the model's code as well as the recipe: a user who edits their
    model's file (here only its forward, so the weights would still load) gets a teacher trained afresh."""
    from compressor.data import load_data
    from compressor.recipe import load_recipe
    from compressor.teacher import load_teacher

    monkeypatch.setenv("COMPRESSOR_CACHE", str(tmp_path / "cache"))
    monkeypatch.syspath_prepend(str(tmp_path))
    src = ("import torch\nfrom torch import nn\n\n"
           "class Net(nn.Module):\n"
           "    def __init__(self):\n"
           "        super().__init__()\n"
           "        self.fc = nn.Linear(256, 10)\n\n"
           "    def forward(self, x):\n"
           "        return self.fc(x.flatten(1){})\n\n"
           "def build():\n    return Net()\n")
    r = json.loads(json.dumps(TINY))
    r["teacher"] = {"model": "edited_teacher_mod:build", "train": {"epochs": 1, "lr": 0.01}}
    recipe = load_recipe(r)
    data = load_data(recipe.data, recipe.seed)
    trained = []

    def load(forward_tail):
        import importlib
        import sys

        (tmp_path / "edited_teacher_mod.py").write_text(src.format(forward_tail))
        sys.modules.pop("edited_teacher_mod", None)
        importlib.invalidate_caches()
        log = []
        load_teacher(recipe, data, log=log.append)
        trained.append(any(line.startswith("teacher epoch") for line in log))

    load("")
    load("")  # the same code: the cache serves it
    load(" * 2")  # the forward changed, the weights' names and shapes did not
    assert trained == [True, False, True]
    assert len(list((tmp_path / "cache" / "teachers").glob("*.pt"))) == 2


def test_the_teacher_cache_key_is_the_same_in_every_process():
    """Hash seeds differ between processes; the key must not (a class defined in `python -c`, which has no
    source file, is keyed by its name, and once raised OSError)."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    code = ("import sys; sys.path.insert(0, {tests!r})\n"
            "import torch.nn as nn, user_models as U\n"
            "from compressor.teacher import _architecture\n"
            "class Head(nn.Module):\n"
            "    def __init__(self):\n"
            "        super().__init__(); self.fc = nn.Linear(4, 2)\n"
            "class Body(nn.Module):\n"
            "    def __init__(self):\n"
            "        super().__init__(); self.h = Head(); self.v = U.vit(depth=1)\n"
            "print(_architecture(Body(), U.vit))\n").format(tests=str(Path(__file__).parent))
    keys = {subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                           env={**os.environ, "PYTHONHASHSEED": str(seed)}).stdout.strip() for seed in (1, 2, 3)}
    assert len(keys) == 1 and len(next(iter(keys))) == 16, keys
