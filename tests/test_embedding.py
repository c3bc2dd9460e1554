"""The embedding task end to end on a Hugging Face encoder: text data, hf-encoder teacher and students,
agreement and probe metrics, token-input export, and a full `compress run` on a tiny BERT directory."""
from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch
from torch.utils.data import TensorDataset

pytest.importorskip("transformers")

from compressor import tasks  # noqa: E402
from compressor.bundle import verify  # noqa: E402
from compressor.data import DataSplits, LengthGrouped, collate, load_data, stack, token_lengths  # noqa: E402
from compressor.errors import UserError  # noqa: E402
from compressor.hf import config_of, hf_encoder  # noqa: E402
from compressor.pipeline import run  # noqa: E402
from compressor.recipe import DataSpec, load_recipe  # noqa: E402
from compressor.text import labelled_docstrings  # noqa: E402

from tiny_bert import make_tiny_bert  # noqa: E402


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory):
    return make_tiny_bert(tmp_path_factory.mktemp("hf") / "tiny-bert")


def _data(bert_dir, **kw) -> DataSplits:
    kwargs = {"max_length": 32, "max_train": 200, "max_test": 80, **kw}
    return load_data(DataSpec(dataset="docstrings", kwargs=kwargs, batch_size=16), seed=0,
                     defaults={"tokenizer_path": str(bert_dir)})


def _train_texts(data: DataSplits) -> set[str]:
    """Every sentence the train split was drawn from."""
    return set(data.train.texts)


def test_docstrings_come_from_disjoint_modules(bert_dir):
    data = _data(bert_dir)
    meta = data.meta
    assert set(meta["train_modules"]).isdisjoint(meta["test_modules"])
    assert meta["dims"] == {"sequence": 32} and meta["num_classes"] == len(meta["test_modules"])
    train_txt = _train_texts(data)
    assert train_txt.isdisjoint(data.test.texts)
    more = _data(bert_dir, extra_train_modules=["colorsys", "not_a_module_here"])
    assert more.meta["train_modules"][-1] == "colorsys"  # a missing module gives nothing, not an error
    texts, labels, used = labelled_docstrings(["json", "heapq"])
    assert used == ["json", "heapq"] and set(labels) == {0, 1} and len(texts) == len(set(texts))


def test_the_validation_split_comes_from_modules_of_its_own(bert_dir):
    """Validation sentences come from modules neither trained on nor held out: choices made on validation then
    see text from modules the student did not train on, as held-out quality does, and training keeps all its
    text. ``val_modules: []`` falls back to data.val_fraction of the training sentences."""
    data = _data(bert_dir)
    meta = data.meta
    assert meta["val_apart"] and meta["val_modules"]
    assert set(meta["val_modules"]).isdisjoint(meta["train_modules"])
    assert set(meta["val_modules"]).isdisjoint(meta["test_modules"])
    texts = [set(data.train.texts), set(data.val.texts), set(data.test.texts)]
    assert all(a.isdisjoint(b) for k, a in enumerate(texts) for b in texts[k + 1:])
    assert 8 <= len(data.val) <= 720
    hx, hy = data.held_out(64)  # the search's rungs score on validation alone, not on training sentences
    assert len(hy) == len(data.val)
    plain = _data(bert_dir, val_modules=[])
    assert "val_apart" not in plain.meta and len(plain.val) == round(0.1 * 200)
    assert set(plain.val.indices).isdisjoint(plain.train.indices)  # carved out of the training split
    assert len(_data(bert_dir, max_val=30).val) == 30
    with pytest.raises(UserError, match="json in both train_modules and val_modules"):
        _data(bert_dir, val_modules=["json"])
    # a recipe that trains on a default validation module keeps it: the default leaves it out of validation
    mine = _data(bert_dir, extra_train_modules=["math"])
    assert "math" in mine.meta["train_modules"] and "math" not in mine.meta["val_modules"]


def test_every_prose_paragraph_can_train_while_held_out_text_stays_first_paragraphs(bert_dir):
    first = _data(bert_dir, max_train=100_000)
    every = _data(bert_dir, max_train=100_000, train_paragraphs="all")
    train_txt, first_txt = _train_texts(every), _train_texts(first)
    assert len(train_txt) > 2 * len(first_txt)  # more unlabelled text, from the same modules
    # the same held-out draw, less any sentence the wider training text holds (a re-exported docstring)
    unseen = [t for t in first.test.texts if t not in train_txt]
    assert every.test.texts[:len(unseen)] == unseen and train_txt.isdisjoint(every.test.texts)
    assert first_txt <= train_txt  # the first paragraphs as before, and more
    assert not any(t.startswith(">>>") or "------" in t for t in train_txt - first_txt)  # no doctests, no rules
    assert every.meta["train_paragraphs"] == "all"
    with pytest.raises(UserError, match="train_paragraphs 'some'"):
        _data(bert_dir, train_paragraphs="some")


def test_library_modules_add_the_installed_libraries_documentation_to_training_only(bert_dir):
    """data.kwargs.library_modules: the documented modules of the libraries the project installs train too (more
    text for distillation); a module named twice is read once, and held-out and validation text is as before."""
    from compressor.text import LIBRARY_MODULES

    first = _data(bert_dir, max_train=100_000, extra_train_modules=["scipy.linalg"])
    more = _data(bert_dir, max_train=100_000, extra_train_modules=["scipy.linalg"], library_modules=True)
    used = more.meta["train_modules"]
    assert len(used) == len(set(used)) and used.count("scipy.linalg") == 1
    assert {"scipy.optimize", "torch.optim"} <= set(used) <= set(first.meta["train_modules"]) | set(LIBRARY_MODULES)
    assert len(more.train) > 1.5 * len(first.train) and _train_texts(first) <= _train_texts(more)
    assert more.meta["val_modules"] == first.meta["val_modules"]
    assert more.meta["test_modules"] == first.meta["test_modules"]
    assert _train_texts(more).isdisjoint(more.test.texts)


def test_batches_are_trimmed_to_their_longest_sentence(bert_dir):
    data = _data(bert_dir)
    x, y = data.tensors("test", limit=8)
    assert set(x) == {"input_ids", "attention_mask"} and y.shape == (8,)
    assert x["input_ids"].shape[1] == int(x["attention_mask"].sum(1).max()) <= 32
    xb, _ = next(iter(data.loader("test", 4)))
    assert xb["attention_mask"][:, -1].any()  # no all-padding column left
    # stack() and collate() agree
    samples = [data.test[i] for i in range(4)]
    a, b = stack([s[0] for s in samples]), collate(samples)[0]
    assert all(torch.equal(a[k], b[k]) for k in a)


def _padded_tokens(loader) -> int:
    return sum(x["input_ids"].numel() for x, *_ in loader)


def test_training_batches_group_sentences_of_similar_length(bert_dir):
    """data.group_by_length: each epoch draws every sample once, in a new order, in batches of similar length,
    so the trimmed batches carry less padding than shuffled ones; images (no attention mask) shuffle as before."""
    data = _data(bert_dir, max_train=400, max_length=256)  # the tiny tokenizer: 34 to 256 tokens
    lengths = token_lengths(data.train)  # the training split is a Subset of the tokenised sentences
    assert lengths.tolist() == [int(data.train[i][0]["attention_mask"].sum()) for i in range(len(data.train))]
    grouped = data.loader("train", 16, shuffle=True, by_length=True, seed=1)
    assert isinstance(grouped.batch_sampler, LengthGrouped) and len(grouped) == -(-len(data.train) // 16)
    epochs = [[i for b in grouped.batch_sampler for i in b] for _ in range(2)]
    assert all(sorted(e) == list(range(len(data.train))) for e in epochs) and epochs[0] != epochs[1]
    plain = data.loader("train", 16, shuffle=True, seed=1)
    assert _padded_tokens(grouped) < 0.8 * _padded_tokens(plain)
    # not shuffled (validation): longest first, every sample once, the same order each time
    val = data.loader("val", 8, by_length=True)
    widths = [x["input_ids"].shape[1] for x, _ in val]
    assert widths == sorted(widths, reverse=True) and sum(len(b) for b in val.batch_sampler) == len(data.val)
    assert list(val.batch_sampler) == list(data.loader("val", 8, by_length=True).batch_sampler)
    # within a pool the batches are cut from one length order: no two batches of a pool overlap in length
    one_pool = LengthGrouped(lengths, 16, pool=10_000)
    spans = sorted((int(lengths[b].max()), int(lengths[b].min())) for b in one_pool)
    assert all(hi <= lo_next for (hi, _), (_, lo_next) in zip(spans, spans[1:]))
    images = DataSplits(TensorDataset(torch.randn(40, 1, 4, 4), torch.zeros(40, dtype=torch.long)), None, None,
                        (1, 4, 4), 1)
    assert not isinstance(images.loader("train", 8, shuffle=True, by_length=True).batch_sampler, LengthGrouped)


def test_at_length_pads_with_mask_ones_and_cuts():
    x = {"input_ids": torch.tensor([[5, 6, 7]]), "attention_mask": torch.tensor([[1, 1, 0]])}
    long = tasks.at_length(x, 5)
    assert long["input_ids"].tolist() == [[5, 6, 7, 0, 0]] and long["attention_mask"].tolist() == [[1, 1, 0, 1, 1]]
    assert tasks.at_length(x, 2)["input_ids"].tolist() == [[5, 6]]
    t = torch.zeros(2, 3)
    assert tasks.at_length(t, 8) is t


def test_agreement_and_probe_golden():
    rng = np.random.default_rng(0)
    e = rng.standard_normal((30, 8))
    assert tasks.agreement(e, e) == pytest.approx(1.0)
    assert tasks.agreement(e, 3 * e) == pytest.approx(1.0)  # cosine ignores scale
    # Two well-separated clusters: a linear probe separates them perfectly.
    labels = np.array([0] * 15 + [1] * 15)
    clusters = np.concatenate([rng.normal(5, 0.1, (15, 4)), rng.normal(-5, 0.1, (15, 4))])
    assert tasks.probe(clusters, labels) == pytest.approx(1.0)


def test_hf_student_is_the_teachers_class_with_fewer_layers(bert_dir):
    teacher = hf_encoder(path=str(bert_dir))
    student = hf_encoder(path=str(bert_dir), num_hidden_layers=2)
    assert type(student.model) is type(teacher.model)
    assert config_of(student)["num_hidden_layers"] == 2 and config_of(teacher)["num_hidden_layers"] == 4
    # init: teacher copies layer i from the teacher's layer i
    t0 = teacher.model.encoder.layer[1].attention.self.query.weight
    assert torch.equal(student.model.encoder.layer[1].attention.self.query.weight, t0)
    rand = hf_encoder(path=str(bert_dir), num_hidden_layers=2, init="random")
    assert not torch.equal(rand.model.encoder.layer[1].attention.self.query.weight, t0)
    with pytest.raises(UserError, match="not a multiple of num_attention_heads"):
        hf_encoder(path=str(bert_dir), hidden_size=30)


def test_embedding_defaults_and_checks(bert_dir):
    base = {"name": "e", "task": "embedding", "teacher": {"model": str(bert_dir)},
            "data": {"dataset": "docstrings"}, "prune": {"by": "units", "remove": 1}}
    r = load_recipe(base)
    assert r.metric == "agreement" and [l.name for l in r.distill.losses] == ["cosine"]
    assert r.student is None
    with pytest.raises(UserError, match="need class logits"):
        load_recipe({**base, "distill": {"losses": [{"name": "ce"}]}})


@pytest.mark.slow
def test_compress_run_on_a_hugging_face_encoder(bert_dir, tmp_path):
    """Prune a 4-layer BERT to 2, distil it with cosine + MiniLM attention, quantize it dynamically,
    export with token inputs, measure at the data's sequence length; the bundle verifies."""
    recipe = {
        "name": "tiny-text", "task": "embedding",
        "teacher": {"model": "hf-encoder", "kwargs": {"path": str(bert_dir)}},
        "data": {"dataset": "docstrings", "kwargs": {"max_length": 32, "max_train": 200, "max_test": 80},
                 "batch_size": 32},
        "prune": {"by": "units", "remove": 2},
        "distill": {"epochs": 2, "lr": 1e-3, "losses": [
            {"name": "cosine", "relation": 1.0},
            {"name": "minilm", "heads": 4, "pairs": [["model.encoder.layer.1.attention.self",
                                                      "model.encoder.layer.3.attention.self"]]}]},
        "quantize": {"mode": "ptq-dynamic"},
        "targets": ["local-cpu", "openvino-cpu"],
        "profile": {"batch_sizes": [1, 2], "runs": 10, "warmup": 2},
    }
    out = run(recipe, tmp_path / "bundle", log=lambda s: None)
    m = json.loads((out / "manifest.json").read_text())
    assert m["task"] == {"name": "embedding", "metric": "agreement"}
    q = m["quality"]
    assert q["teacher"]["agreement"] == 1.0 and 0 < q["teacher"]["probe_accuracy"] <= 1
    assert q["student"]["agreement"] > 0.5 and q["student"]["onnx_agreement"] == pytest.approx(
        q["student"]["agreement"], abs=1e-3)
    assert q["student_int8"]["onnx_agreement"] > 0.5 and q["student_int8"]["mode"] == "ptq-dynamic"
    # Token inputs with a dynamic batch and sequence, as optimum-cli names them.
    g = onnx.load(str(out / "model" / "student.onnx")).graph
    assert [i.name for i in g.input] == ["input_ids", "attention_mask"]
    assert [d.dim_param for d in g.input[0].type.tensor_type.shape.dim] == ["batch", "sequence"]
    assert g.output[0].name == "embedding"
    # Measured at the data's 32 tokens, batch 1 and 2, fp32 and int8
    meas = {(x["artifact"], x["batch"]): x for x in m["measurements"]}
    assert meas[("model/student.onnx", 2)]["input_shapes"]["input_ids"] == [2, 32]
    # The OpenVINO IR has lost the axis names; it is still measured at 32 tokens.
    assert meas[("model/student.xml", 2)]["input_shapes"]["input_ids"] == [2, 32]
    assert ("model/student.int8.onnx", 1) in meas
    # FLOPs counted at 32 tokens: the 2-layer student does about half the teacher's encoder work.
    prof = next(s for s in m["stages"] if s["name"] == "profile")["metrics"]
    assert 0.3 < prof["flops"]["student"] / prof["flops"]["teacher"] < 0.7
    # The tokenizer ships, the report speaks of agreement, the bench command carries the sequence length.
    assert (out / "model" / "tokenizer" / "tokenizer.json").is_file()
    report = (out / "report.md").read_text()
    assert "agreement with the teacher" in report and "--dim sequence=32" in report
    assert "| search |" not in report and "| prune | " in report  # stages that did nothing are left out
    verify(out)
