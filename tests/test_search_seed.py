"""The search's progress bar, seeded candidates (the pruned teacher on the Pareto front), and the pipeline
with both search: and prune:."""
import io
import json

import pytest
import torch

from compressor.errors import UserError
from compressor.models import ResNet
from compressor.search import PROXIES
from compressor.search import nsga
from compressor.search.spaces import EncoderClassifier, Space, detect, pruned_genome, transformer_space
from conftest import mlp_space

optuna = pytest.importorskip("optuna")

DEFAULTS = {"in_features": 16, "num_classes": 4}


def test_progress_bar_shows_the_best_so_far(tmp_path, batch, monkeypatch):
    from rich.console import Console

    out = io.StringIO()
    monkeypatch.setattr(nsga, "_console", lambda: Console(file=out, force_terminal=True, width=200))
    lines = []
    r = nsga.search(mlp_space(), PROXIES["params"], batch, defaults=DEFAULTS, size_mb=0.004, trials=6, population=3,
                    storage=f"sqlite:///{tmp_path / 's.db'}", log=lines.append, progress_bar=True)
    text = out.getvalue()
    assert "6/6" in text and "best" in text
    assert f"{r.best.metrics['score']:.4g}" in text  # the best meeting the budget, as the bar ends
    assert any(l.startswith("search 6/6:") for l in lines)  # the log lines stay


def test_no_progress_bar_when_stderr_is_not_a_terminal(tmp_path, batch, monkeypatch):
    def boom():
        raise AssertionError("a bar was made for a non-terminal stderr")

    monkeypatch.setattr(nsga, "_console", boom)
    nsga.search(mlp_space(), PROXIES["params"], batch, defaults=DEFAULTS, trials=2, population=2,
                storage=f"sqlite:///{tmp_path / 's.db'}", log=lambda s: None)  # pytest captures stderr


def test_seed_is_evaluated_first_and_once_across_resumes(tmp_path, batch):
    seed = {"genome": {"layers": 2, "width_0": 64, "width_1": 32}, "origin": "pruned teacher"}
    kw = dict(defaults=DEFAULTS, population=3, storage=f"sqlite:///{tmp_path / 's.db'}", log=lambda s: None,
              seeds=[seed])
    r = nsga.search(mlp_space(), PROXIES["params"], batch, trials=4, **kw)
    seeded = [c for c in r.candidates if c.origin == "pruned teacher"]
    assert len(seeded) == 1 and seeded[0].genome == seed["genome"]
    assert r.candidates[0].origin == "pruned teacher"  # enqueued trials run first
    # params proxy, no budget: the biggest candidate wins, and the seed is it; it is marked in the output.
    assert r.best.key == seeded[0].key and r.best.to_dict()["origin"] == "pruned teacher"
    r2 = nsga.search(mlp_space(), PROXIES["params"], batch, trials=7, **kw)
    assert len(r2.candidates) == 7 and sum(c.origin == "pruned teacher" for c in r2.candidates) == 1


def test_seed_outside_the_space_is_a_user_error(tmp_path, batch):
    with pytest.raises(UserError, match="not in the space.*width_0"):
        nsga.search(mlp_space(), PROXIES["params"], batch, defaults=DEFAULTS, trials=2, population=2,
                    storage=f"sqlite:///{tmp_path / 's.db'}", log=lambda s: None,
                    seeds=[{"genome": {"layers": 2, "width_0": 48, "width_1": 32}, "origin": "x"}])


def test_pruned_genome_of_a_resnet_and_an_encoder():
    from compressor.prune import build_pruned

    torch.manual_seed(0)
    t = ResNet(widths=(8, 16), depths=(2, 2), in_channels=1).eval()
    space = detect(t)
    g, why = pruned_genome(space, t, ["stages.0.0", "stages.1.1"], {"in_channels": 1})
    assert why == "" and g == {"width_0": 8, "depth_0": 1, "width_1": 16, "depth_1": 1, "kernel": 3}
    assert sum(p.numel() for p in space.build(g, {"in_channels": 1}).parameters()) == \
        sum(p.numel() for p in build_pruned(t, ["stages.0.0", "stages.1.1"]).parameters())
    # A space whose choices leave the teacher's width out cannot express it: said, not guessed.
    narrow = Space("cnn", "resnet", {**space.genes, "width_1": [4, 8]})
    g, why = pruned_genome(narrow, t, ["stages.0.0"], {"in_channels": 1})
    assert g is None and "width_1=16 not among" in why
    e = EncoderClassifier(layers=3, hidden=32, heads=2, ffn=64, vocab=1000)
    g, why = pruned_genome(transformer_space(3, 32, 64, 1000), e, ["encoder.layers.1"])
    assert g == {"heads": 2, "hidden": 32, "ffn": 64, "layers": 2, "vocab": 1000}
    g, why = pruned_genome(mlp_space(), t, ["stages.0.0"])
    assert g is None and "no genome" in why


def test_seed_pruned_true_needs_a_prune_section(tiny_recipe):
    from compressor.recipe import load_recipe
    from compressor.stages.search import _seed_spec

    r = load_recipe({**tiny_recipe, "search": {"seed_pruned": True}})
    with pytest.raises(UserError, match="seed_pruned: true uses the recipe's prune section"):
        _seed_spec(r, r.search)
    r = load_recipe({**tiny_recipe, "search": {"seed_pruned": {"by": "units", "remove": 1}}})
    assert _seed_spec(r, r.search).by == "units"
    r = load_recipe({**tiny_recipe, "search": {}, "prune": {"by": "units", "remove": 1}})
    assert _seed_spec(r, r.search) is r.prune  # default: seed when the recipe prunes
    r = load_recipe({**tiny_recipe, "search": {"seed_pruned": False}, "prune": {"by": "units", "remove": 1}})
    assert _seed_spec(r, r.search) is None



@pytest.mark.slow
def test_pipeline_search_and_prune_the_pruned_teacher_wins(deep_tiny, tmp_path):
    """One trial: only the enqueued pruned teacher is evaluated, so it is chosen; the student is the
    pruned teacher with the teacher's weights, and the prune stage does not prune again."""
    import compressor
    from compressor import prune as P
    from compressor.bundle import read_manifest

    deep_tiny["search"] = {"trials": 1, "population": 2, "batch_size": 16, "proxy": "params"}
    deep_tiny["prune"] = {"by": "units", "remove": 1, "calibration_batches": 1}
    logs = []
    out = compressor.run(deep_tiny, tmp_path / "b", log=logs.append)
    man = read_manifest(out)
    search = next(s for s in man["stages"] if s["name"] == "search")
    prune = next(s for s in man["stages"] if s["name"] == "prune")
    seed = search["metrics"]["pruned_seed"]
    assert seed["chosen"] and seed["feasible_rank"] == 1 and len(seed["removed"]) == 1
    assert search["metrics"]["best"]["origin"] == "pruned teacher"
    assert "search.seed_pruned" in prune["skipped"] and seed["chosen"]
    assert man["student"]["removed"] == seed["removed"]
    student = P.rebuild(man["student"])
    student.load_state_dict(torch.load(out / "model" / "student.pt", weights_only=True))
    cands = json.loads((out / "search" / "candidates.json").read_text())["candidates"]
    assert [c.get("origin") for c in cands] == ["pruned teacher"]


def test_seed_record_and_prune_stage_when_another_candidate_wins():
    from types import SimpleNamespace

    from compressor.bundle import StageRecord
    from compressor.recipe import PruneSpec
    from compressor.stages import prune
    from compressor.search.nsga import Candidate
    from compressor.search.spaces import genome_key
    from compressor.stages.search import _seed_record

    seed = {"genome": {"layers": 1, "width_0": 8, "width_1": 8}, "removed": ["body.1"], "prune": {}}
    mine = Candidate("mlp", seed["genome"], genome_key(seed["genome"]), {"score": 1.0, "size_mb": 0.1},
                     origin="pruned teacher")
    other = Candidate("mlp", {"layers": 2}, "k2", {"score": 2.0, "size_mb": 0.2})
    result = SimpleNamespace(candidates=[mine, other], front=[other, mine], best=other)
    rec = _seed_record(seed, result)
    assert not rec["chosen"] and rec["on_front"] and rec["feasible_rank"] == 2 and rec["feasible"] == 2
    # The prune stage leaves the searched student alone and says why.
    ctx = SimpleNamespace(recipe=SimpleNamespace(prune=PruneSpec(by="units", remove=1)), student="searched",
                          records={"search": StageRecord("search", metrics={"pruned_seed": rec})}, log=lambda s: None)
    why = prune.skip(ctx)
    assert ctx.student == "searched" and "another candidate" in why and "search.seed_pruned" in why


def test_proxy_averaged_over_more_batches(tmp_path, batch):
    x, y = batch
    other = (x * 2 + 1, y)
    inits = []

    def proxy(model, b, view):
        inits.append(float(next(model.parameters()).detach().flatten()[0]))
        return float(b[0].sum()) + (view or 0)

    r = nsga.search(mlp_space(), proxy, batch, defaults=DEFAULTS, trials=1, population=2, log=lambda s: None,
                    storage=f"sqlite:///{tmp_path / 's.db'}", teacher_view=0.0, more_batches=[(other, 10.0)])
    expected = (float(x.sum()) + float(other[0].sum()) + 10.0) / 2
    assert r.candidates[0].metrics["score"] == pytest.approx(expected, rel=1e-5)
    assert len(inits) == 2 and inits[0] != inits[1]  # the second pair scores another initialisation


def test_search_spec_proxy_seeds_reaches_the_search(tiny_recipe, monkeypatch, tmp_path):
    from compressor.data import load_data
    from compressor.recipe import load_recipe
    from compressor.stages import search as stage

    seen = {}

    def fake_search(space, proxy, batch, **kw):
        seen["batch"], seen["more"] = batch, kw["more_batches"]
        raise RuntimeError("stop")

    monkeypatch.setattr(nsga, "search", fake_search)
    r = load_recipe({**tiny_recipe, "search": {"proxy": "naswot", "batch_size": 16, "proxy_seeds": 3}})
    data = load_data(r.data, 0)
    teacher = ResNet(widths=(8, 16), depths=(1, 1), in_channels=1)
    with pytest.raises(RuntimeError, match="stop"):
        stage.run_search(r, data, teacher, r.search, tmp_path, log=lambda s: None)
    assert len(seen["batch"][0]) == 16 and len(seen["more"]) == 2
    assert not torch.equal(seen["more"][0][0][0], seen["batch"][0])  # other samples
