"""Student search over Hugging Face encoder students for `task: embedding` (issue 3): the space from the
teacher's config, the proxies' embedding forms, `compress search` on the tiny BERT, and `compress run`
with a search section end to end."""
from __future__ import annotations

import json
import math

import pytest
import torch

pytest.importorskip("transformers")

from compressor.bundle import verify  # noqa: E402
from compressor.cli import main  # noqa: E402
from compressor.data import load_data  # noqa: E402
from compressor.errors import UserError  # noqa: E402
from compressor.hf import hf_encoder  # noqa: E402
from compressor.models import build_model, count_params  # noqa: E402
from compressor.pipeline import run  # noqa: E402
from compressor.recipe import DataSpec, load_recipe  # noqa: E402
from compressor.search.proxies import TeacherView, check_task, cost, diswot, naswot  # noqa: E402
from compressor.search.spaces import detect  # noqa: E402
from compressor.tasks import at_length, call, take  # noqa: E402

from tiny_bert import make_tiny_bert  # noqa: E402


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory):
    return make_tiny_bert(tmp_path_factory.mktemp("hf") / "tiny-bert")


@pytest.fixture(scope="module")
def text_batch(bert_dir):
    data = load_data(DataSpec(dataset="docstrings", kwargs={"max_length": 32, "max_train": 200, "max_test": 80},
                              batch_size=16), seed=0, defaults={"tokenizer_path": str(bert_dir)})
    return data.tensors("train", limit=32)


def _recipe(bert_dir, **over) -> dict:
    r = {
        "name": "tiny-text-search", "task": "embedding",
        "teacher": {"model": "hf-encoder", "kwargs": {"path": str(bert_dir)}},
        "data": {"dataset": "docstrings", "kwargs": {"max_length": 32, "max_train": 200, "max_test": 80},
                 "batch_size": 32},
        "search": {"trials": 12, "population": 6, "batch_size": 32, "calibration": 3},
        "distill": {"epochs": 1, "lr": 1e-3},
        "targets": ["local-cpu"],
        "budgets": {"size_mb": 0.1},
        "profile": {"batch_sizes": [1], "runs": 10, "warmup": 2, "max_seconds": 5},
    }
    r.update(over)
    return r


def test_space_comes_from_the_teachers_config(bert_dir):
    teacher = hf_encoder(path=str(bert_dir))  # 4 layers, hidden 32, 4 heads, FFN 64
    space = detect(teacher)
    assert space.family == "hf-encoder" and space.builder == "hf-encoder"
    g = space.genes
    assert g["num_hidden_layers"] == [1, 2, 3, 4] and g["num_attention_heads"] == [1, 2, 4]
    assert max(g["hidden_size"]) == 32 and max(g["intermediate_size"]) == 64
    assert all(h % a == 0 for h in g["hidden_size"] for a in g["num_attention_heads"])
    genome = {"num_hidden_layers": 2, "hidden_size": 32, "num_attention_heads": 2, "intermediate_size": 64}
    assert space.config(genome) == {**genome, "init": "teacher"}  # plain data: the builder's config
    student = space.build(genome, {"path": str(bert_dir)})
    # init: teacher where shapes allow: the same width loads layer i from the teacher's layer i
    assert torch.equal(student.model.encoder.layer[1].output.dense.weight, teacher.model.encoder.layer[1].output.dense.weight)
    narrow = space.build({**genome, "hidden_size": 16}, {"path": str(bert_dir)})
    assert narrow.model.config.hidden_size == 16


def test_embedding_proxies_and_their_forms(bert_dir, text_batch):
    teacher = hf_encoder(path=str(bert_dir))
    space = detect(teacher)
    view = TeacherView.of(teacher, text_batch, "embedding")
    assert view.grad is None and view.gram.shape == (32, 32)
    assert diswot(teacher, text_batch, view) == pytest.approx(0.0, abs=1e-9)
    small = space.build({"num_hidden_layers": 1, "hidden_size": 8, "num_attention_heads": 2,
                         "intermediate_size": 16}, {"path": str(bert_dir)})
    score = diswot(small, text_batch, view)
    assert math.isfinite(score) and score < -1e-4  # centred Gram: candidates are told apart
    assert math.isfinite(naswot(small, text_batch))
    ex = at_length(take(text_batch[0], 1), 32)
    n, f = cost(lambda: space.skeleton({"num_hidden_layers": 1, "hidden_size": 8, "num_attention_heads": 2,
                                        "intermediate_size": 16}, {"path": str(bert_dir)}), ex)
    assert n == count_params(small) and f > 0
    assert "relation only" in check_task("diswot", "embedding")
    with pytest.raises(UserError, match="synflow.*use diswot, naswot, params, flops"):
        check_task("synflow", "embedding")
    with pytest.raises(UserError, match="does not apply to task: embedding"):
        load_recipe(_recipe(bert_dir, search={"proxy": "synflow"}))


@pytest.mark.slow
def test_compress_search_on_tiny_bert(bert_dir, tmp_path, capsys):
    """`compress search` over the tiny BERT: finishes, meets the size budget, says which proxy form it
    used, predicts latency from ONNX exports with two inputs, and its genome rebuilds a running student."""
    path = tmp_path / "r.json"
    path.write_text(json.dumps(_recipe(bert_dir)))
    assert main(["search", str(path), "--out", str(tmp_path / "s")]) == 0
    best = json.loads((tmp_path / "s" / "best.json").read_text())
    err = capsys.readouterr().err
    assert "relation only" in best["proxy"]["form"] and best["proxy"]["task"] == "embedding"
    assert best["trials"] == 12 and best["feasible"] >= 1
    m = best["metrics"]
    assert m["size_mb"] <= 0.1 and m["latency_label"] == "predicted" and m["latency_ms"]["local-cpu"] > 0
    assert "latency predictor for local-cpu" in err
    # FLOPs at the data's 32 tokens, counted as the pipeline counts them
    s = best["student"]
    student = build_model(s["model"], s["config"], s["defaults"])
    x = {"input_ids": torch.zeros(2, 32, dtype=torch.long), "attention_mask": torch.ones(2, 32, dtype=torch.long)}
    with torch.no_grad():
        e = call(student.eval(), x)
    assert e.shape == (2, s["config"]["hidden_size"]) and count_params(student) == m["params"]
    cands = json.loads((tmp_path / "s" / "candidates.json").read_text())
    assert {c["genome"]["hidden_size"] % c["genome"]["num_attention_heads"] for c in cands["candidates"]} == {0}


@pytest.mark.slow
def test_compress_run_with_search_on_an_embedding_teacher(bert_dir, tmp_path):
    """search -> distill (cosine + relation; a narrower student gets a learned projection) -> export
    with token inputs -> profile; the bundle verifies and its manifest rebuilds the searched student."""
    # Narrower than the teacher's 32 (search.space overrides a gene), so the cosine term's projection runs.
    recipe = _recipe(bert_dir, search={"trials": 8, "population": 4, "batch_size": 32, "latency": "predict",
                                       "calibration": 3, "space": {"hidden_size": [8, 16]}})
    out = run(recipe, tmp_path / "bundle", log=lambda s: None)
    verify(out)
    assert main(["verify", str(out)]) == 0  # and `compress verify` says so
    m = json.loads((out / "manifest.json").read_text())
    rec = next(s for s in m["stages"] if s["name"] == "search")
    assert rec["metrics"]["proxy"]["name"] == "diswot" and "relation only" in rec["metrics"]["proxy"]["form"]
    assert rec["metrics"]["best"]["metrics"]["size_mb"] <= 0.1
    g = rec["outputs"]["student"]
    assert g["model"] == "hf-encoder" and g["defaults"]["path"] == str(bert_dir)
    assert g["config"]["hidden_size"] in (8, 16) and g["config"]["init"] == "teacher"
    student = build_model(g["model"], g["config"], g["defaults"])
    student.load_state_dict(torch.load(out / "model" / "student.pt", weights_only=True))
    assert m["quality"]["student"]["onnx_agreement"] == pytest.approx(m["quality"]["student"]["agreement"], abs=1e-3)
    assert (out / "model" / "tokenizer" / "tokenizer.json").is_file()


def test_cosine_projects_a_narrower_students_embedding():
    from compressor.distill.losses import Cosine
    from compressor.distill.module import VAL_METRICS

    g = torch.Generator().manual_seed(0)
    t, s = torch.randn(8, 32, generator=g), torch.randn(8, 16, generator=g, requires_grad=True)
    loss = Cosine(relation=1.0)
    with pytest.raises(UserError, match="differ in shape"):
        loss(student=s, teacher=t)  # no projection until DistillModule builds it
    loss.build({}, {}, student=s.detach(), teacher=t)
    assert tuple(loss.adapter.weight.shape) == (32, 16)
    out = loss(student=s, teacher=t)
    out.backward()
    assert torch.isfinite(out) and s.grad is not None and loss.adapter.weight.grad is not None
    # Validation compares pairwise-similarity rows across widths: the same geometry scores 1.
    wide = torch.cat([t[:, :16], torch.zeros(8, 16)], 1)
    assert float(VAL_METRICS["cosine"](t[:, :16], wide, None)) == pytest.approx(1.0, abs=1e-5)


def test_the_pruned_teacher_is_a_genome_of_the_space(bert_dir):
    from compressor.search.spaces import pruned_genome

    teacher = hf_encoder(path=str(bert_dir))
    space = detect(teacher)
    genome, why = pruned_genome(space, teacher, ["model.encoder.layer.1", "model.encoder.layer.2"],
                                {"path": str(bert_dir)})
    assert why == "" and genome == {"num_hidden_layers": 2, "hidden_size": 32, "num_attention_heads": 4,
                                    "intermediate_size": 64}


def test_teacher_sub_networks_of_an_encoder_are_cut_by_heads_and_ffn_neurons(bert_dir, tmp_path):
    """search.family: teacher on a Hugging Face encoder: the channel gene cuts attention heads and FFN neurons
    (compressor.width, the hidden size stays), as the prune stage narrows an encoder; the structural channel
    cut cannot prune a sentence encoder (MiniLM-L6's wrapper broke it on every genome). The genome's width
    plan rebuilds the student, and a resumed run rebuilds it from the plan and the teacher's weights. With a target
    but no latency budget the candidates are not timed (hf_mobilenet's search spent 166 of 532 s timing them)."""
    from compressor.prune import rebuild
    from compressor.search import subnets as S

    recipe = _recipe(bert_dir, search={"family": "teacher", "max_flops": 0.6, "channels": [0.0, 0.5],
                                       "rungs": [0.5, 1], "rung_samples": 64, "final": 2})
    recipe.pop("budgets")
    said = []
    out = run(recipe, tmp_path / "bundle", log=said.append)
    assert any("candidates not timed on local-cpu: no latency budget" in s for s in said)
    verify(out)
    m = json.loads((out / "manifest.json").read_text())
    rec = next(s for s in m["stages"] if s["name"] == "search")
    assert rec["metrics"]["feasible"] >= 2
    built = [c for c in json.loads((out / "search" / "candidates.json").read_text())["candidates"]
             if c["genome"]["channels"] and "cost" in c and "params" in c["cost"]]
    assert built, "no channel-cut candidate was built"
    assert not any("latency_ms" in c["cost"] for c in built) and rec["metrics"]["teacher_latency_ms"] == {}
    g = m["student"]
    assert "channels" not in g and (g.get("width") or g["removed"])
    student = rebuild(g)
    student.load_state_dict(torch.load(out / "model" / "student.pt", weights_only=True))
    teacher = hf_encoder(path=str(bert_dir))
    x = load_data(DataSpec(**recipe["data"]), seed=0, defaults={"tokenizer_path": str(bert_dir)}).tensors("train", limit=32)[0]
    model, plan = S.build(S.teacher_space(teacher, x, (0.0, 0.5)), teacher,
                          {**S.teacher_space(teacher, x, (0.0, 0.5)).genomes()[0], "channels": 0.5}, [x, x])
    assert plan and set(plan) == {"heads", "ffn"} and count_params(model) < count_params(teacher)


def test_teacher_sub_networks_are_costed_at_the_budgets_length(bert_dir, text_batch):
    """The FLOPs estimate that picks which genomes to build counts at the example's length (the profile's
    sequence), not the calibration batch's: at MiniLM's 64 against 128 tokens, 278 genomes passed a 20%
    budget that few of them met once built."""
    from compressor.flops import count_flops
    from compressor.search import subnets as S

    teacher = hf_encoder(path=str(bert_dir))
    x = text_batch[0]
    long = at_length(take(x, 1), 2 * x["input_ids"].shape[1])
    space = S.teacher_space(teacher, x, (0.0,))
    build = S.Builder(space, teacher, [x], example=long)
    own = space.genomes()[0]
    assert build.flops_estimate(own) == count_flops(teacher, long) > count_flops(teacher, take(x, 1))


def test_as_fast_as_prune_puts_the_prune_sections_cut_in_the_search(bert_dir, tmp_path):
    """search.as_fast_as: prune on an encoder: the teacher cut as the prune section says is the latency budget and,
    being a genome of the space, a candidate of its own, feasible by definition and carried into the final few;
    the record says how it scored and whether it was chosen."""
    recipe = _recipe(bert_dir, search={"family": "teacher", "channels": [0.0, 0.5, 0.75], "rungs": [0.5],
                                       "rung_samples": 64, "final": 2, "per_depth": False, "as_fast_as": "prune"},
                     prune={"by": "units", "remove": 1, "width": {"remove": 0.5}})
    recipe.pop("budgets")
    logs = []
    out = run(recipe, tmp_path / "bundle", log=logs.append)
    verify(out)
    m = json.loads((out / "manifest.json").read_text())
    rec = next(s for s in m["stages"] if s["name"] == "search")["metrics"]
    own = rec["as_fast_as_prune"]
    assert own["genome"]["channels"] == 0.5 and sum(v for k, v in own["genome"].items() if k.startswith("drop:")) == 1
    cand = own["candidate"]
    assert cand["genome"] == own["genome"] and cand["feasible"] and cand["why"] == ""
    # no per_depth: the best two of the short rung and the prune section's cut, whatever it scored there, are
    # distilled fully (best_of's own test covers a cut that ranks low)
    assert len(cand["rungs"]) == 2 and cand["rungs"][1]["samples"] > 64 and len(rec["final"]) in (2, 3)
    assert own["genome"] in [t["genome"] for t in rec["final"]]
    assert rec["latency_budget_ms"] == rec["as_fast_as_latency_ms"]
    # the candidate is the prune section's cut itself (one content, one file, one figure), not the Builder's
    assert cand["cost"]["latency_ms"] == rec["as_fast_as_latency_ms"]
    best = rec["best"]
    assert own["chosen"] == (best["genome"] == own["genome"]) and best["feasible"]
    assert m["student"]["search"]["genes"] == best["genome"]
    assert any("the prune section's cut (as_fast_as: prune) scored" in s for s in logs)


def test_as_fast_as_prune_needs_a_prune_section(bert_dir, tmp_path):
    recipe = _recipe(bert_dir, search={"family": "teacher", "channels": [0.0, 0.5], "as_fast_as": "prune"})
    with pytest.raises(UserError, match="as_fast_as: prune needs a prune section"):
        run(recipe, tmp_path / "bundle", log=lambda s: None)
