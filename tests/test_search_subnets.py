"""The search over the teacher's own sub-networks (search.family: teacher): the space, the candidates built
from the teacher's weights, successive halving, and the pipeline on models it was not written for."""
import copy
import json
import math
import sys
from pathlib import Path

import pytest
import torch

from compressor.flops import count_flops
from compressor.models import ResNet
from compressor.search import subnets as S

sys.path.insert(0, str(Path(__file__).parent))
import user_models as U  # noqa: E402  (tests/user_models.py: models nobody here wrote)

pytestmark = pytest.mark.filterwarnings("ignore")


def teacher():
    torch.manual_seed(0)
    return ResNet(widths=(16, 32), depths=(2, 2), in_channels=1, num_classes=10).eval()


def test_space_of_a_resnet_and_its_candidates_keep_the_teachers_weights():
    t, x = teacher(), torch.randn(32, 1, 16, 16)
    space = S.teacher_space(t, x, channels=(0.0, 0.5))
    assert space.units and space.size == (2 ** len(space.units) - 1) * 2 == len(space.genomes())
    own = space.genomes()[0]
    assert space.removed(own) == [] and own["channels"] == 0.0
    model, plan = S.build(space, t, own, [x])
    assert plan is None and torch.allclose(model(x), t(x))  # the teacher's own genome is the teacher
    drop = {**own, f"drop:{space.units[-1]}": 1}
    model, _ = S.build(space, t, drop, [x])
    from compressor.prune import build_pruned

    assert torch.allclose(model(x), build_pruned(t, [space.units[-1]])(x))  # dropped, weights kept
    cut, plan = S.build(space, t, {**own, "channels": 0.5}, [x])
    full, half = S.costs(t, x), S.costs(cut, x)
    assert plan and 0.4 < half["flops"] / full["flops"] < 0.6
    assert S.check_budget(half, max_flops=0.6 * full["flops"]) == ""
    assert "MFLOPs" in S.check_budget(full, max_flops=0.6 * full["flops"])


def test_a_large_space_is_cut_to_the_genomes_that_drop_the_units_of_least_output_loss():
    space = S.SubnetSpace([f"layer.{i}" for i in range(6)], [0.0, 0.5])
    loss = {f"layer.{i}": v for i, v in enumerate([0.5, 0.1, 0.2, 0.15, 0.3, 1.0])}
    genomes = space.genomes()[1:]  # the teacher's own aside, as the stage does
    picked = S.most_promising(genomes, space, loss, 24)
    assert len(picked) == 24 and len({str(g) for g in picked}) == 24
    groups = {(len(space.removed(g)), g["channels"]) for g in genomes}
    assert {(len(space.removed(g)), g["channels"]) for g in picked} == groups  # every depth and cut is tried
    for k in range(1, 6):  # and within each, the least loss first: dropping 1-3 is the best set of three
        best = min((g for g in genomes if len(space.removed(g)) == k),
                   key=lambda g: sum(loss[u] for u in space.removed(g)))
        assert any(space.removed(g) == space.removed(best) for g in picked)
    assert ["layer.1", "layer.2", "layer.3"] in [space.removed(g) for g in picked]
    assert ["layer.0", "layer.4", "layer.5"] not in [space.removed(g) for g in picked]  # the worst set of three
    whole = S.most_promising(genomes, space, loss, 500)
    assert sorted(map(str, whole)) == sorted(map(str, genomes))  # a space that fits is kept whole


class FakeRung:
    """Scores are fixed per model and rise with the epochs: the halving's bookkeeping, alone. A model not yet
    trained (the cut, scored before the first rung) counts as 0 epochs."""

    x = torch.zeros(10, 1)
    lr = 1e-3

    def train(self, model, epochs, seed=0):
        return (model, epochs)

    def score(self, trained):
        model, epochs = trained
        return model.quality * epochs

    def evaluate(self, trained):
        trained = trained if isinstance(trained, tuple) else (trained, 0)
        return {"score": self.score(trained), "loss": getattr(trained[0], "loss", 1.0)}


def fake_trials(n: int) -> list:
    """``n`` trials whose models score (i + 1) / 10 per epoch under FakeRung, the better the fewer FLOPs."""
    out = []
    for i in range(n):
        m = torch.nn.Linear(1, 1)
        m.quality = (i + 1) / 10
        out.append(S.Trial({"i": i}, m, cost={"flops": 100 - i}))
    return out


class Harmful(FakeRung):
    """Training lowers every score: a learning rate that ruins the cut teacher (hf_mobilenet at 3e-3)."""

    def score(self, trained):
        model, epochs = trained
        return model.quality / (1 + epochs)


def test_finalists_that_training_left_below_their_untrained_cut_are_a_warning():
    """hf_mobilenet's cut scored 0.872 untrained and 0.728 after 3 epochs at lr 3e-3: the ladder ranked the
    candidates by how little training harmed them, and shipped 0.621, with nothing said. The last rung's trials are
    scored as cut by that rung, and a best trained one below the best of those (by more than HARM) is a warning;
    training that helps says nothing."""
    said, harmed = [], fake_trials(3)
    final = S.successive_halving(harmed, Harmful(), [1, 3], eta=3, log=said.append)
    assert S.training_harms(final, Harmful(), said.append)
    warned = [s for s in said if "warning" in s]
    assert len(warned) == 1 and "the best finalist 0.3000 untrained, 0.0750 trained" in warned[0] and "0.001" in warned[0]
    assert [t.to_dict()["untrained"] for t in final] == pytest.approx([0.3])
    said, helped = [], fake_trials(3)
    final = S.successive_halving(helped, FakeRung(), [1, 3], eta=3, log=said.append)
    assert not S.training_harms(final, FakeRung(), said.append) and not [s for s in said if "warning" in s]


def test_successive_halving_keeps_the_best_third_each_rung():
    trials = []
    for i in range(9):
        m = torch.nn.Linear(1, 1)
        m.quality = (i + 1) / 10
        trials.append(S.Trial({"i": i}, m, cost={"flops": 100 - i}, feasible=i != 8))  # the best is infeasible
    final = S.successive_halving(trials, FakeRung(), [1, 3, 9], eta=3, log=lambda s: None)
    assert [t.genome["i"] for t in final] == [7]  # 8 feasible -> 3 -> 1
    assert [len(t.rungs) for t in trials] == [1, 1, 1, 1, 1, 2, 2, 3, 0]
    assert final[0].rungs[-1] == {"epochs": 9, "samples": 10, "score": pytest.approx(0.8 * 9), "loss": 1.0,
                                  "seconds": final[0].rungs[-1]["seconds"]}


def test_a_tie_of_the_score_goes_to_the_lower_held_out_loss_then_to_fewer_flops():
    """180 validation images score in steps of 1/180: the final few often tie, and the held-out loss orders them."""
    trials = []
    for i, loss in enumerate([0.30, 0.10, 0.20, 0.20]):
        m = torch.nn.Linear(1, 1)
        m.quality, m.loss = 0.9, loss
        trials.append(S.Trial({"i": i}, m, cost={"flops": 100 - i}))
    final = S.successive_halving(trials, FakeRung(), [1], log=lambda s: None)
    assert [t.genome["i"] for t in final] == [1, 3, 2, 0]  # equal loss (2, 3): the fewer FLOPs first


class Reversed(FakeRung):
    """The final distillations: over more samples, and the order the short rungs saw turned around."""

    x = torch.zeros(40, 1)
    trained = 0

    def train(self, model, epochs, seed=0):
        Reversed.trained += 1
        return (model, epochs)

    def score(self, trained):
        model, epochs = trained
        return (1 - model.quality) * epochs


def test_the_final_few_are_distilled_again_and_the_best_of_that_is_chosen():
    """The ladder continued with another rung (search.final): the survivors of the short rungs, distilled as
    long as the student will be, reorder; their score is a fourth rung, and a restored one is not trained again."""
    trials = []
    for i in range(9):
        m = torch.nn.Linear(1, 1)
        m.quality = (i + 1) / 10
        trials.append(S.Trial({"i": i}, m, cost={"flops": 100 - i}))
    short = S.successive_halving(trials, FakeRung(), [1, 3], eta=3, log=lambda s: None)
    assert [t.genome["i"] for t in short] == [8, 7, 6]
    final = S.successive_halving(short[:2], Reversed(), [15.0], log=lambda s: None, first=2)
    assert [t.genome["i"] for t in final] == [7, 8]  # the final distillation decides, not the short rungs
    assert final[0].rungs[2] == {"epochs": 15.0, "samples": 40, "score": pytest.approx(0.2 * 15), "loss": 1.0,
                                 "seconds": final[0].rungs[2]["seconds"]}
    assert [len(t.rungs) for t in trials] == [1, 1, 1, 1, 1, 1, 2, 3, 3]
    Reversed.trained = 0
    again = S.successive_halving(short[:2], Reversed(), [15.0], log=lambda s: None, first=2)
    assert Reversed.trained == 0 and [t.genome["i"] for t in again] == [7, 8]  # restored scores: nothing retrained


def test_successive_halving_never_keeps_fewer_than_keep():
    trials = fake_trials(5)
    assert len(S.successive_halving(copy.deepcopy(trials), FakeRung(), [1, 3], eta=3, log=lambda s: None)) == 2
    final = S.successive_halving(trials, FakeRung(), [1, 3], eta=3, keep=3, log=lambda s: None)
    assert [t.genome["i"] for t in final] == [4, 3, 2]



def test_the_best_of_each_depth_goes_on_through_every_rung():
    """A deeper, narrower sub-network starts slower: with a stratum (the search's: depth), the best of each
    depth survives the halving and reaches the final few beside the best third, where full distillation decides."""
    trials = []
    for i in range(9):
        m = torch.nn.Linear(1, 1)
        m.quality, m.depth = (i + 1) / 10, 2 if i in (0, 1) else 1  # the two deep ones score worst early
        trials.append(S.Trial({"i": i}, m, cost={"flops": 100 - i}))
    plain = S.successive_halving(copy.deepcopy(trials), FakeRung(), [1, 3], eta=3, log=lambda s: None)
    assert [t.genome["i"] for t in plain] == [8, 7, 6]
    final = S.successive_halving(trials, FakeRung(), [1, 3], eta=3, log=lambda s: None, stratum=lambda t: t.model.depth)
    assert [t.genome["i"] for t in final] == [8, 7, 6, 1]  # the best deep one too, ranked where it scores
    assert [len(t.rungs) for t in trials] == [1, 2, 1, 1, 1, 1, 2, 2, 2]
    assert [t.genome["i"] for t in S.best_of(final, 2, lambda t: t.model.depth)] == [8, 7, 1]
    assert [t.genome["i"] for t in S.best_of(final, 2)] == [8, 7]
    # Every depth in the first n: nothing added.
    assert [t.genome["i"] for t in S.best_of(final, 4, lambda t: t.model.depth)] == [8, 7, 6, 1]
    # A stratum of None is none (as_fast_as: prune without per_depth: only the prune section's cut is carried).
    own = lambda t: "own" if t.genome["i"] == 1 else None  # noqa: E731
    assert [t.genome["i"] for t in S.best_of(final, 1, own)] == [8, 1]
    assert [t.genome["i"] for t in S.best_of(final[-1:] + final[:-1], 1, own)] == [1]

def test_rungs_score_on_the_validation_split_and_the_training_samples_they_do_not_train_on():
    from compressor.data import DataSplits, HiddenLabels

    x = torch.arange(20, dtype=torch.float32).reshape(20, 1)
    y = torch.arange(20) % 2
    train = torch.utils.data.TensorDataset(x[:14], y[:14])
    data = DataSplits(train, torch.utils.data.TensorDataset(x[14:17], y[14:17]),
                      torch.utils.data.TensorDataset(x[17:], y[17:]), (1,), 2)
    hx, hy = data.held_out(8)
    assert hx.flatten().tolist() == [14, 15, 16, 8, 9, 10, 11, 12, 13]  # never a sample the rung trains on
    assert hy.tolist() == (torch.tensor([14, 15, 16, 8, 9, 10, 11, 12, 13]) % 2).tolist()
    assert data.held_out(8, limit=4)[0].flatten().tolist() == [14, 15, 16, 8]
    few = DataSplits(HiddenLabels(train, 0.3, seed=0), data.val, data.test, (1,), 2)
    fx, fy = few.held_out(8)
    assert (fy >= 0).all() and len(fx) < 9  # hidden labels cannot score


def test_a_short_distillation_moves_the_student_toward_the_teacher():
    t, x = teacher(), torch.randn(96, 1, 16, 16)
    space = S.teacher_space(t, x[:32], channels=(0.0, 0.5))
    model, _ = S.build(space, t, {**space.genomes()[0], "channels": 0.5}, [x[:32]])
    with torch.no_grad():
        labels = t(x[64:]).argmax(-1)  # held-out labels: the teacher's own answers
    rung = S.Rung.of(t, x[:64], x[64:], labels, lr=3e-3, batch_size=16)
    before, after = rung.score(model), rung.score(rung.train(model, 8))
    assert after > before


def test_a_rung_on_token_inputs_trains_on_batches_of_similar_length():
    """Each epoch of a rung takes every sentence once, in batches of similar length (trimmed to their longest
    when trained on); image rungs keep their shuffled order, step for step."""
    lengths = torch.randint(3, 33, (100,))
    mask = (torch.arange(32)[None] < lengths[:, None]).long()
    x = {"input_ids": torch.randint(1, 50, (100, 32)) * mask, "attention_mask": mask}
    rung = S.Rung(x, torch.zeros(100, 4), x, torch.zeros(100, 4), task="embedding", batch_size=10)
    batches, per_epoch = rung._batches(100, 2, torch.Generator().manual_seed(0))
    assert len(batches) == 20 and per_epoch == 10 and sorted(torch.cat(batches[:10]).tolist()) == list(range(100))
    spread = sum(int(lengths[b].max() - lengths[b].min()) for b in batches[:10])
    assert spread <= 10 * 3  # one pool sorted by length: the ten batches split 3-32 between them
    plain = S.Rung(torch.randn(100, 3), torch.zeros(100, 4), None, None, batch_size=10)
    g = torch.Generator().manual_seed(0)
    order = torch.cat([torch.randperm(100, generator=g) for _ in range(2)])
    steps, per_epoch = plain._batches(100, 2, torch.Generator().manual_seed(0))
    assert per_epoch == 10 and len(steps) == 20 and all(torch.equal(a, b) for a, b in zip(steps, order.split(10)))
    odd = S.Rung(x, torch.zeros(100, 4), x, torch.zeros(100, 4), task="embedding", batch_size=32)
    assert odd._batches(100, 1, torch.Generator().manual_seed(0))[1] == 4  # 32, 32, 32 and the short one of 4


def test_the_final_rung_can_anneal_the_rate_as_the_distill_stage_does(monkeypatch):
    """A rung with schedule cosine takes the learning rate from lr down to zero over its steps (the final few
    train so, as the distill stage will: a deep cut that reached 0.98 at a constant rate distilled to 0.92
    under cosine); the short rungs keep the constant rate."""
    t, x = teacher(), torch.randn(96, 1, 16, 16)
    space = S.teacher_space(t, x[:32], channels=(0.0, 0.5))
    model, _ = S.build(space, t, space.genomes()[0], [x[:32]])
    rates = []
    step = torch.optim.AdamW.step

    def spy(self, *a, **k):
        rates.append(self.param_groups[0]["lr"])
        return step(self, *a, **k)

    monkeypatch.setattr(torch.optim.AdamW, "step", spy)
    rung = S.Rung.of(t, x[:64], x[64:], t(x[64:]).argmax(-1).detach(), lr=3e-3, batch_size=16)
    rung.train(model, 2)
    assert len(rates) == 8 and set(rates) == {3e-3}
    rates.clear()
    final = rung.over(t, x[:64], schedule="cosine")
    assert final.schedule == "cosine" and rung.schedule == "constant"
    final.train(model, 2)
    assert len(rates) == 8 and rates[0] == pytest.approx(3e-3) and rates == sorted(rates, reverse=True)
    assert rates[-1] == pytest.approx(3e-3 * 0.5 * (1 + math.cos(math.pi * 7 / 8)))


@pytest.mark.slow
@pytest.mark.parametrize("name", ["residual_mlp", "vit"])
def test_pipeline_searches_a_users_teacher(name, tiny_recipe, tmp_path):
    import compressor
    from compressor.bundle import read_manifest
    from compressor.prune import rebuild

    r = copy.deepcopy(tiny_recipe)
    r["name"] = name.replace("_", "-")
    r["teacher"] = {"model": f"user_models:{name}", "train": {"epochs": 2, "lr": 0.003}}
    r.pop("student")
    r["search"] = {"family": "teacher", "max_flops": 0.6, "channels": [0.0, 0.5], "rungs": [0.5, 1],
                   "rung_samples": 128}
    r["prune"] = {"channels": {"remove": 0.5}}  # ignored: the search cut the teacher already
    r["distill"] = {"epochs": 1, "lr": 0.003}
    r["targets"] = []
    out = compressor.run(r, tmp_path / "b", log=lambda s: None)
    man = read_manifest(out)
    search = next(s for s in man["stages"] if s["name"] == "search")
    prune = next(s for s in man["stages"] if s["name"] == "prune")
    assert "search cut the teacher" in prune["skipped"]
    best = search["metrics"]["best"]
    assert best["feasible"] and best["cost"]["flops"] <= search["metrics"]["max_flops"]
    rungs = search["metrics"]["rungs"]
    assert rungs[0]["candidates"] >= rungs[1]["candidates"] >= rungs[2]["candidates"]
    # the final few (search.final, 3 by default) distilled for the recipe's epochs on every training sample
    assert len(best["rungs"]) == 3 and best["rungs"][2]["epochs"] == 1 and best["rungs"][2]["samples"] > 128
    # the last short rung keeps at least search.final candidates, so the final few are as many as asked, and
    # (search.per_depth) the best of every depth that reached it
    final = search["metrics"]["final"]
    assert rungs[2]["candidates"] == len(final) >= min(3, search["metrics"]["feasible"]) and rungs[2]["epochs"] == 1
    cands = json.loads((out / "search" / "candidates.json").read_text())["candidates"]

    def depth(c):
        return sum(1 for k, v in c["genome"].items() if k.startswith("drop:") and not v)

    assert {depth(c) for c in final} == {depth(c) for c in cands if c["rung"] >= 2}
    assert best["score"] == max(c["rungs"][2]["score"] for c in search["metrics"]["final"])
    g = man["student"]
    assert g["search"]["family"] == "teacher" and g["pruned_from"] == "teacher"
    student = rebuild(g)  # the genome alone rebuilds the shapes; the shipped weights load into them
    student.load_state_dict(torch.load(out / "model" / "student.pt", weights_only=True))
    assert (out / "search" / "pareto.png").is_file() and (out / "search" / "candidates.json").is_file()


def test_a_teacher_search_without_a_budget_is_refused(tiny_recipe, tmp_path):
    import compressor
    from compressor.errors import UserError

    r = copy.deepcopy(tiny_recipe)
    r.pop("student")
    r["search"] = {"family": "teacher"}
    r["targets"] = []
    with pytest.raises(UserError, match="needs a budget"):
        compressor.run(r, tmp_path / "b", log=lambda s: None)


@pytest.mark.slow
def test_as_fast_as_a_given_student_is_the_latency_budget_measured_beside_the_candidates(deep_tiny, tmp_path):
    """search.as_fast_as alone is a budget: the named model is timed in the candidates' round robin and its
    latency is the budget on the target; a candidate slower than it is out, with the reason."""
    import compressor
    from compressor.bundle import read_manifest

    r = copy.deepcopy(deep_tiny)
    r.pop("student")
    r["targets"] = ["local-cpu"]
    # the teacher's own shape with one block per stage: the sub-networks that drop a unit of each stage, or cut
    # channels, are about as fast or faster; the teacher's own genome is slower
    r["search"] = {"family": "teacher", "channels": [0.0, 0.5], "rungs": [0.5], "rung_samples": 128, "final": 0,
                   "as_fast_as": {"model": "resnet", "config": {"widths": [8, 16], "depths": [1, 1]}}}
    out = compressor.run(r, tmp_path / "b", log=lambda s: None)
    m = next(s for s in read_manifest(out)["stages"] if s["name"] == "search")["metrics"]
    ref = m["as_fast_as_latency_ms"]
    assert set(ref) == {"local-cpu"} and m["latency_budget_ms"] == ref  # no other budget: it is the budget
    rows = json.loads((out / "search" / "candidates.json").read_text())["candidates"]
    measured = [c for c in rows if "latency_ms" in c["cost"]]
    # nothing over a FLOPs budget: every candidate built was timed (the rest are cuts the structure cannot give)
    assert len(measured) == sum(not c["cost"].get("estimated") for c in rows) >= 4
    for c in measured:
        over = c["cost"]["latency_ms"]["local-cpu"] > ref["local-cpu"]
        assert c["feasible"] is not over and (not over or c["why"].startswith("local-cpu "))
    assert m["best"]["cost"]["latency_ms"]["local-cpu"] <= ref["local-cpu"]


def test_as_fast_as_needs_a_target_to_measure_on(deep_tiny, tmp_path):
    import compressor
    from compressor.errors import UserError

    r = copy.deepcopy(deep_tiny)
    r.pop("student")
    r["search"] = {"family": "teacher", "as_fast_as": {"model": "resnet", "config": {"widths": [4, 8]}}}
    with pytest.raises(UserError, match="search.as_fast_as needs a target"):
        compressor.run(r, tmp_path / "b", log=lambda s: None)


@pytest.mark.slow
def test_sigkill_mid_rung_then_resume_reuses_the_scores(deep_tiny, tmp_path):
    """kill -9 while the ladder runs; --resume reads the candidates' saved costs and rung scores and trains only
    what was left."""
    import json
    import signal
    import subprocess
    import sys

    import yaml
    from test_crash import start, wait_for

    r = copy.deepcopy(deep_tiny)
    r.pop("student")
    r["search"] = {"family": "teacher", "max_flops": 0.8, "channels": [0.0, 0.5], "rungs": [0.5, 1],
                   "rung_samples": 128, "eta": 2}
    recipe, out = tmp_path / "r.yaml", tmp_path / "b"
    recipe.write_text(yaml.safe_dump(r))
    hold = tmp_path / "hold"
    hold.write_text("rung")  # the run waits after each new rung score, once it is saved
    p = start(recipe, out, hold=hold)
    wait_for(tmp_path / "hold.held", p)
    p.send_signal(signal.SIGKILL)
    p.wait()
    ladder = tmp_path / "b.partial" / "work" / "search" / "ladder.json"
    saved = json.loads(ladder.read_text())["trials"]
    scored = {g: t["rungs"] for g, t in saved.items() if t["rungs"]}
    assert len(scored) == 1 and not out.exists()

    done = subprocess.run([sys.executable, "-m", "compressor.cli", "run", str(recipe), "--out", str(out), "--resume"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "restored from the interrupted run" in done.stderr and "(1 scores from the interrupted run)" in done.stderr
    from compressor.bundle import read_manifest

    rows = json.loads((out / "search" / "candidates.json").read_text())["candidates"]
    for row in rows:  # the score saved before the kill is the one the resumed search ranked by
        g = json.dumps(row["genome"], sort_keys=True)
        if g in scored:
            assert row["rungs"][0] == scored[g][0]
    assert sum(bool(row["rungs"]) for row in rows) > 1
    assert next(s for s in read_manifest(out)["stages"] if s["name"] == "search")["metrics"]["best"]["rung"] == 3  # 2 + final


def test_the_final_few_are_timed_again_beside_the_reference(monkeypatch):
    """A finalist slower than search.as_fast_as's model in a second round robin goes after the rest (one reading of
    the reference can be a third off); the prune section's own cut never does; a resumed run reads the saved
    timings instead of measuring again."""
    from types import SimpleNamespace

    from compressor.stages import subnets as stage

    calls = []

    def fake_latency_of(devices, x1, export):
        def measure(models):
            calls.append(len(models))
            return [{"cpu": 1.0}, {"cpu": 1.2}, {"cpu": 0.9}, {"cpu": 1.1}]
        return measure

    monkeypatch.setattr(stage, "latency_of", fake_latency_of)
    own = {"drop:a": 1, "channels": 0.5}
    final = [S.Trial({"drop:a": 0, "channels": 0.5}, model=torch.nn.Identity()),  # best score, slower now
             S.Trial({"drop:a": 1, "channels": 0.0}, model=torch.nn.Identity()),
             S.Trial(own, model=torch.nn.Identity())]  # slower too, but the reference's own shape
    logs = []
    ctx = SimpleNamespace(log=logs.append)
    got = stage._recheck(ctx, final, torch.nn.Identity(), own, {"cpu": None}, torch.zeros(1, 2), None)
    assert [t.genome for t in got] == [final[1].genome, own, final[0].genome]
    assert final[0].cost["latency_recheck_ms"] == {"cpu": 1.2} and final[0].cost["as_fast_as_recheck_ms"] == {"cpu": 1.0}
    assert len(logs) == 1 and "cpu 1.200 ms > 1.000" in logs[0]
    again = stage._recheck(ctx, final, torch.nn.Identity(), own, {"cpu": None}, torch.zeros(1, 2), None)
    assert calls == [4] and [t.genome for t in again] == [final[1].genome, own, final[0].genome]


def test_as_fast_as_goes_with_the_teacher_family(tiny_recipe):
    from compressor.errors import UserError
    from compressor.recipe import load_recipe

    r = copy.deepcopy(tiny_recipe)
    r["search"] = {"family": "cnn", "as_fast_as": "prune"}
    with pytest.raises(UserError, match="as_fast_as goes with family: teacher"):
        load_recipe(r)
    r["search"] = {"family": "teacher", "as_fast_as": "prune", "max_flops": 0.5}
    assert load_recipe(r).search.as_fast_as == "prune"


def test_the_candidates_are_cut_with_the_prune_sections_settings():
    """A GroupNorm model cuts no channel at a multiple of 8; with prune.channels.multiple: null the search's
    candidates are cut at that multiple too (they used the defaults, and the refusal told the user to set what
    they had set)."""
    from compressor.errors import UserError


    torch.manual_seed(0)
    t, x = U.GroupNormCNN().eval(), torch.randn(32, 1, 16, 16)
    space = S.teacher_space(t, x, (0.0, 0.5))
    half = {**space.genomes()[0], "channels": 0.5}
    with pytest.raises(UserError, match="multiple of 8"):
        S.build(space, t, half, [x])
    model, plan = S.build(space, t, half, [x], channels={"multiple": None, "remove": 0.3})  # remove: the genome's
    before, after = count_flops(t, x[:1]), count_flops(model, x[:1])
    assert 0.3 < after / before < 0.6 and plan  # GroupNorm steps of 4 channels overshoot (0.38)


def test_the_search_stage_reads_the_cut_settings_from_the_prune_section():
    from compressor.recipe.student import PruneSpec
    from compressor.stages.subnets import cut_shape

    prune = PruneSpec(channels={"remove": 0.5, "multiple": None, "keep_stem": True})
    assert cut_shape(prune) == {"channels": {"importance": "output-loss", "heads": True, "multiple": None,
                                             "keep_stem": True, "projections": 4}}
    assert cut_shape(PruneSpec(by="units", remove=1, width={"remove": 0.5, "ffn": False, "projections": 2})) == \
        {"width": {"ffn": False, "heads": True, "multiple": 16, "projections": 2}}
    assert cut_shape(None) == {}


@pytest.mark.slow
def test_channel_cuts_the_structure_cannot_give_are_said(tiny_recipe, tmp_path):
    """Every channel cut of a GroupNorm CNN at a multiple of 8 is refused; the search went on with the
    uncut teacher alone and its log said only '1 of N candidates meet the budgets'."""
    import compressor

    r = copy.deepcopy(tiny_recipe)
    r.update(teacher={"model": "user_models:group_norm_cnn", "train": {"epochs": 1, "lr": 0.01}},
             search={"family": "teacher", "max_flops": 1.0, "channels": [0.0, 0.5], "rungs": [0.5],
                     "rung_samples": 64}, distill={"epochs": 1, "lr": 0.01}, targets=[])
    r.pop("student")
    said = []
    compressor.run(r, tmp_path / "b", log=said.append)
    assert any("channel cut(s) cannot be made, e.g. 50%: no channel of GroupNormCNN can be cut" in s for s in said)
    # the whole refusal, with its advice (it was cut at 160 characters, before "set prune.channels.multiple")
    assert any("cannot be made" in s and "set prune.channels.multiple lower, or null" in s for s in said)
    assert any("chose the teacher with every unit" in s for s in said)


def test_a_candidate_with_nothing_left_to_cut_by_width_is_refused_not_a_crash():
    """MobileViT's heads make the search cut by width; a genome dropping every transformer layer left no head or
    FFN pair, and scoring no groups asked autograd for the gradient of nothing (RuntimeError)."""
    pytest.importorskip("transformers")
    from compressor.errors import UserError
    from compressor.intake import intake
    from compressor.tasks import call


    torch.manual_seed(0)
    t, x = U.hf_mobilevit(), torch.randn(8, 1, 16, 16)
    with torch.no_grad():
        intake(t, call(t, x[:2]))
    space = S.teacher_space(t, x, (0.0, 0.5))
    genome = {**{f"drop:{u}": int(".transformer.layer." in u) for u in space.units}, "channels": 0.5}
    build = S.Builder(space, t, [x])
    assert build.cut == "width"
    with pytest.raises(UserError, match="no attention head or FFN pair is left"):
        build(genome)


def test_a_vit_from_nn_transformer_encoder_is_searched_by_heads_and_ffn_neurons():
    """nn.MultiheadAttention keeps q/k/v packed: the search looked for heads on the teacher as it is, found none
    and cut the ViT's residual stream by channels. It now splits a copy as prune.width does; a candidate's
    attention that loses heads stays split, and its plan rebuilds it from the teacher's weights."""
    from compressor.width import apply_plan

    torch.manual_seed(0)
    t, x = U.vit().eval(), torch.randn(16, 1, 16, 16)
    space = S.teacher_space(t, x, (0.0, 0.5))
    build = S.Builder(space, t, [x, x.flip(0)])
    assert build.cut == "width"
    model, plan = build({**space.genomes()[0], "channels": 0.5})
    assert plan["split"] and any(plan["heads"].values()) and plan["ffn"]
    assert count_flops(model, x[:1]) < 0.6 * count_flops(t, x[:1])
    again = apply_plan(copy.deepcopy(t), plan)
    assert torch.equal(again(x), model(x))


@pytest.mark.slow
def test_a_search_over_weights_outside_layers_says_so(tiny_recipe, tmp_path):
    """Bare nn.Parameter weights through F.linear: every channel cut is refused, and the search's refusal gave the
    prune stage's generic advice (a lower multiple, whole blocks), neither of which helps; it names the cause as
    the prune stage does. A small model's FLOPs print to three figures ("the smallest (0.0 MFLOPs)")."""
    import compressor
    from compressor.errors import UserError

    r = copy.deepcopy(tiny_recipe)
    r.pop("student")
    r.update(teacher={"model": "user_models:raw_mlp", "train": {"epochs": 1, "lr": 0.01}}, targets=[],
             search={"family": "teacher", "max_flops": 0.5, "channels": [0.0, 0.5], "rungs": [0.5]},
             distill={"epochs": 1, "lr": 0.003})
    with pytest.raises(UserError, match=r"smallest \(0\.\d+ MFLOPs\) breaks one: .*hold them in nn\.Linear"):
        compressor.run(r, tmp_path / "b", log=lambda s: None)


def test_the_searchs_channel_cut_is_the_prune_stages():
    """The candidate that wins is the one that ships: its channels were scored on two calibration batches and
    two projections while the prune stage used all and four, and padded_cnn distilled to 0.80 against the prune
    stage's 0.855 from the same budget. The search's cut of a genome is now the prune stage's cut."""
    from compressor.structural import prune_channels

    torch.manual_seed(0)
    t = U.padded_cnn().eval()
    xs = [torch.randn(32, 1, 16, 16) for _ in range(4)]
    space = S.teacher_space(t, xs[0], (0.0, 0.5))
    model, plan = S.build(space, t, {**space.genomes()[0], "channels": 0.5}, xs)
    same, same_plan, _ = prune_channels(t, xs, 0.5, projections=4, tolerance=0.02, compare_stem=False,
                                        log=lambda s: None)
    assert plan == same_plan
    assert torch.equal(model(xs[0]), same.eval()(xs[0]))


def test_a_transformer_cut_by_channels_says_why():
    """BEiT (like DeBERTa, MPNet, ConvBERT) has FFN pairs but no head set that cuts exactly, so the search cuts its
    channels, hidden size included, where the docs had said encoders keep their hidden size; the log says why."""
    from compressor.intake import adapt

    torch.manual_seed(0)
    x = torch.randn(8, 1, 16, 16)
    for model, cut, why in ((U.hf_beit(), "channels", "FFN pairs, but no attention heads"), (U.hf_vit(), "width", ""),
                            (U.dw_cnn(), "channels", "")):
        t = adapt(model.eval())
        build = S.Builder(S.teacher_space(t, x, (0.0, 0.5)), t, [x])
        assert build.cut == cut and build.why.startswith(why) and bool(build.why) == bool(why)


def test_the_searchs_width_cut_is_the_prune_stages():
    """As for channels: heads and FFN neurons were scored on two batches and two projections, the prune stage's on
    every batch and prune.width.projections (4); the candidate that wins ships, so it is now cut as the prune stage
    cuts, projections read from the prune section."""
    from compressor.width import prune_width

    torch.manual_seed(0)
    t = U.vit().eval()
    xs = [torch.randn(16, 1, 16, 16) for _ in range(4)]
    space = S.teacher_space(t, xs[0], (0.0, 0.5))
    half = {**space.genomes()[0], "channels": 0.5}
    for opts in ({}, {"projections": 2, "multiple": 8}):
        model, plan = S.build(space, t, half, xs, width=opts)
        same, same_plan, _ = prune_width(t, xs, 0.5, log=lambda s: None, **opts)
        assert plan == same_plan
        assert torch.equal(model(xs[0]), same.eval()(xs[0]))


def test_a_chosen_cut_far_under_its_fraction_is_a_warning():
    """A cut takes the nearest step at or under its fraction: dict_cnn's 50% removes 64% (16 and 32 channels in
    multiples of 8), which the prune stage warned of and the search shipped silently."""
    from types import SimpleNamespace

    from compressor.intake import adapt
    from compressor.stages.subnets import overshoot

    torch.manual_seed(0)
    xs = [torch.randn(32, 1, 16, 16) for _ in range(4)]
    said = []
    ctx = SimpleNamespace(log=said.append)
    for t, warned in ((adapt(U.dict_cnn().eval()), True), (teacher(), False)):
        space = S.teacher_space(t, xs[0], (0.0, 0.5))
        build = S.Builder(space, t, xs)
        genome = {**space.genomes()[0], "channels": 0.5}
        model, _ = build(genome)
        gone = 1 - count_flops(model, xs[0][:1]) / build.layers_flops(genome)
        assert (gone > 0.55) is warned
        said.clear()
        overshoot(ctx, build, S.Trial(genome, model, cost=S.costs(model, xs[0])))
        assert bool(said) is warned
        assert not warned or "removes 64% of its sub-network's FLOPs, 50% asked" in said[0] and \
            "prune.channels.multiple" in said[0]
    overshoot(ctx, build, S.Trial({**genome, "channels": 0.0}, t, cost=S.costs(t, xs[0])))  # nothing asked: silent
    assert not said


def test_the_last_rung_keeps_the_models_it_trained_when_asked():
    torch.manual_seed(0)
    t, x = teacher(), torch.randn(64, 1, 16, 16)
    rung = S.Rung.of(t, x, x[:32], torch.randint(0, 10, (32,)))
    trials = [S.Trial({"channels": 0.0, "i": i}, copy.deepcopy(t), cost={"flops": 1}) for i in range(3)]
    kept = S.successive_halving(trials, rung, [0.5, 1.0], eta=2, keep=2, log=lambda s: None, keep_trained=True)
    assert all(k.trained is not None for k in kept) and all(t.trained is None for t in trials if t not in kept)
    for k in kept:  # the model that earned the score, not the candidate it started from
        assert rung.evaluate(k.trained)["score"] == k.score
        before, after = k.model.state_dict(), k.trained.state_dict()
        assert any(not torch.equal(before[n], after[n]) for n in before)


@pytest.mark.slow
def test_the_distill_stage_goes_on_from_the_finalists_trained_weights(deep_tiny, tmp_path, monkeypatch):
    """The final rung distils the finalists as long as the student will be, and the distill stage threw that away
    and distilled the cut again: dw_cnn shipped 0.930 after its final rung scored 0.983 (a helper's sweep); from
    the finalist's weights it ships 0.992 (hf_resnet 0.967 -> 0.986). A resumed run starts from them too."""
    import compressor
    from compressor.stages import distill

    r = copy.deepcopy(deep_tiny)
    r.pop("student")
    r["search"] = {"family": "teacher", "max_flops": 0.8, "channels": [0.0, 0.5], "rungs": [0.5, 1],
                   "rung_samples": 128, "final": 2}
    seen = []

    def stop(ctx):
        seen.append({k: v.clone() for k, v in ctx.student.state_dict().items()})
        seen.append(ctx.genome)
        raise KeyboardInterrupt  # the distill stage never runs: the partial run keeps the search's record

    monkeypatch.setattr(distill, "run", stop)
    with pytest.raises(KeyboardInterrupt):
        compressor.run(r, tmp_path / "b", log=lambda s: None)
    first, genome = seen
    assert genome["search"]["trained"]  # (the kept model is the trained one: the test above)
    with pytest.raises(KeyboardInterrupt):
        compressor.run(r, tmp_path / "b", resume=True, log=lambda s: None)
    again = seen[2]
    assert first.keys() == again.keys() and all(torch.equal(first[k], again[k]) for k in first)
