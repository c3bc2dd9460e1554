"""Token tables update only the rows a batch uses (compressor.schedule: lazy_rows, LazyRowsAdamW;
distill.lazy_embeddings)."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from compressor.errors import UserError
from compressor.schedule import LazyRowsAdamW, adamw, lazy_rows, optimizer

pytestmark = pytest.mark.filterwarnings("ignore")


class Bag(nn.Module):
    """Mean of token embeddings, then a linear classifier."""

    def __init__(self, rows=1500, dim=8, classes=3):
        super().__init__()
        self.emb = nn.Embedding(rows, dim)
        self.head = nn.Linear(dim, classes)

    def forward(self, ids):
        return self.head(self.emb(ids).mean(1))


def _step(model, opt, ids):
    opt.zero_grad()
    model(ids).pow(2).sum().backward()
    opt.step()


def test_used_rows_follow_adam_and_unused_rows_stay():
    torch.manual_seed(0)
    a = Bag()
    b = copy.deepcopy(a)
    start = a.emb.weight.detach().clone()
    every = torch.arange(0, 100).reshape(4, 25)  # rows 0-99: in every batch
    once = torch.arange(100, 125).reshape(1, 25)  # rows 100-124: the first batch only
    with lazy_rows(a) as tables:
        assert tables == [a.emb.weight]
        lazy = optimizer(a.parameters(), lr=0.01, weight_decay=0.0, tables=tables)
        assert isinstance(lazy, LazyRowsAdamW)
        dense = adamw(b.parameters(), lr=0.01, weight_decay=0.0)
        for s in range(6):
            ids = torch.cat([every, once]) if s == 0 else every
            _step(a, lazy, ids)
            _step(b, dense, ids)
            if s == 0:
                after_first = a.emb.weight.detach()[100:125].clone()
    assert not a.emb.sparse  # restored
    wa, wb = a.emb.weight.detach(), b.emb.weight.detach()
    # Rows in every batch, and the dense head: Adam's update either way. SparseAdam divides by sqrt(v) + eps
    # before the bias correction, Adam after it, which differs where a gradient is near eps (a few weights here,
    # by a few percent of one step's lr)
    moved = float((wb[:100] - start[:100]).abs().mean())  # six steps of about lr each
    assert moved > 0.03
    assert float((wa[:100] - wb[:100]).abs().mean()) < 0.01 * moved
    assert float((wa[:100] - wb[:100]).abs().max()) < 0.1 * 0.01
    assert float((a.head.weight - b.head.weight).abs().max()) < 0.1 * 0.01
    # A row used once: dense Adam keeps moving it on its momentum, the lazy update leaves it where step 0 put it
    assert torch.equal(wa[100:125], after_first)
    assert not torch.allclose(wb[100:125], after_first, atol=1e-4)
    # Rows never used: untouched by both
    assert torch.equal(wa[125:], start[125:]) and torch.equal(wb[125:], start[125:])


def test_a_scheduler_reaches_both_and_the_state_round_trips():
    torch.manual_seed(0)
    a = Bag()
    ids = torch.randint(0, 1500, (8, 10))
    with lazy_rows(a) as tables:
        opt = optimizer(a.parameters(), lr=0.01, weight_decay=0.01, tables=tables)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda e: 0.5 ** e)
        _step(a, opt, ids)
        sched.step()
        assert opt.dense.param_groups[0]["lr"] == opt.tables.param_groups[0]["lr"] == pytest.approx(0.005)
        b = copy.deepcopy(a)
        opt_b = optimizer(b.parameters(), lr=0.005, weight_decay=0.01, tables=[b.emb.weight])
        opt_b.load_state_dict(copy.deepcopy(opt.state_dict()))
        b.emb.sparse = True
        _step(a, opt, ids)
        _step(b, opt_b, ids)
    for pa, pb in zip(a.parameters(), b.parameters()):
        assert torch.equal(pa, pb)  # the second optimizer went on exactly where the first was
    # A scheduler made before the state is loaded (as Lightning does on resume) still reaches both inner optimizers
    opt_c = optimizer(b.parameters(), lr=0.01, weight_decay=0.01, tables=[b.emb.weight])
    sched_c = torch.optim.lr_scheduler.LambdaLR(opt_c, lambda e: 0.5 ** e)
    opt_c.load_state_dict(copy.deepcopy(opt.state_dict()))
    sched_c.step()
    assert opt_c.dense.param_groups[0]["lr"] == opt_c.tables.param_groups[0]["lr"] == pytest.approx(0.005)
    with pytest.raises(UserError, match="updated the token tables densely"):
        opt_c.load_state_dict(adamw(b.parameters(), lr=0.01).state_dict())


def test_a_table_read_outside_its_embedding_is_a_clear_error():
    class Reused(Bag):
        def forward(self, ids):
            h = self.emb(ids).mean(1)
            return h @ self.emb.weight.T  # an output layer from the table's weight: a dense gradient

    m = Reused()
    with lazy_rows(m) as tables:
        assert tables == [m.emb.weight]  # registered once: the tie is in the code
        opt = optimizer(m.parameters(), lr=0.01, tables=tables)
        with pytest.raises(UserError, match="set distill.lazy_embeddings: false"):
            _step(m, opt, torch.randint(0, 1500, (4, 5)))


def test_only_trained_untied_tall_tables_are_made_lazy():
    class Several(nn.Module):
        def __init__(self):
            super().__init__()
            self.tokens = nn.Embedding(2048, 8)
            self.positions = nn.Embedding(64, 8)  # short: dense
            self.tied = nn.Embedding(4096, 8)
            self.out = nn.Linear(8, 4096, bias=False)
            self.out.weight = self.tied.weight  # an output layer reads it densely
            self.frozen = nn.Embedding(2048, 8).requires_grad_(False)

    m = Several()
    with lazy_rows(m) as tables:
        assert tables == [m.tokens.weight] and m.tokens.sparse
        assert not (m.positions.sparse or m.tied.sparse or m.frozen.sparse)
    assert not m.tokens.sparse
    with lazy_rows(m, on=False) as tables:
        assert tables == [] and not m.tokens.sparse
    assert isinstance(optimizer(m.parameters(), 0.01), torch.optim.AdamW)  # no tables: plain AdamW


class Logits(nn.Module):
    def __init__(self, m):
        super().__init__()
        self.m = m

    def forward(self, input_ids, attention_mask):
        return self.m(input_ids=input_ids, attention_mask=attention_mask).logits


@pytest.mark.slow
def test_distillation_leaves_rows_no_batch_uses_and_resumes(tiny_recipe, tmp_path):
    """A Hugging Face BERT whose table has rows the data never uses: with lazy rows (the default) they stay as
    they were; with distill.lazy_embeddings: false AdamW's weight decay moves them. A second fit resumes from the
    first's checkpoint, optimizer state included. With gradient clipping the table trains densely."""
    import user_models as U

    from compressor.data import load_data
    from compressor.distill.train import fit
    from compressor.recipe import load_recipe

    tiny_recipe.update(data={"dataset": "user_models:token_data", "batch_size": 64, "kwargs": {"vocab": 1024}},
                       distill={"epochs": 1, "lr": 0.003, "weight_decay": 0.1,
                                "trainer": {"precision": "32-true"}})
    r = load_recipe(tiny_recipe)
    data = load_data(r.data, 0)
    torch.manual_seed(0)
    teacher = Logits(U.hf_bert(vocab_size=2048)).eval()
    student = Logits(U.hf_bert(vocab_size=2048))
    plain = copy.deepcopy(student)
    table = "m.bert.embeddings.word_embeddings.weight"
    start = student.state_dict()[table].clone()
    logs = []
    fit(student, teacher, data, r.distill, r.data, tmp_path / "a", log=logs.append)
    assert any("token-table weights update only the rows each batch uses" in line for line in logs)
    w = student.state_dict()[table]
    assert not torch.equal(w[1:1024], start[1:1024])  # the rows the data uses trained
    assert torch.equal(w[1024:], start[1024:])  # the rest did not move
    assert not student.m.bert.embeddings.word_embeddings.sparse

    fit(plain, teacher, data, r.distill.model_copy(update={"lazy_embeddings": False}), r.data, tmp_path / "b",
        log=lambda s: None)
    assert not torch.equal(plain.state_dict()[table][1024:], start[1024:])  # weight decay on every row

    logs = []
    fit(student, teacher, data, r.distill.model_copy(update={"epochs": 2}), r.data, tmp_path / "a", log=logs.append)
    assert any("resuming distillation after epoch" in line for line in logs)
    assert torch.equal(student.state_dict()[table][1024:], start[1024:])

    # Gradient clipping has no sparse kernel: the tables train densely then
    clipped = r.distill.model_copy(update={"trainer": r.distill.trainer.model_copy(
        update={"extra": {"gradient_clip_val": 1.0}})})
    logs = []
    fit(copy.deepcopy(plain), teacher, data, clipped, r.data, tmp_path / "c", log=logs.append)
    assert not any("token-table" in line for line in logs)
    # A checkpoint saved lazily does not resume densely (nor the other way): said before training
    for ckpt, spec, how in ((tmp_path / "a", clipped, "lazily"), (tmp_path / "b", r.distill, "densely")):
        with pytest.raises(UserError, match=f"updated the token tables {how}"):
            fit(copy.deepcopy(plain), teacher, data, spec.model_copy(update={"epochs": 3}), r.data, ckpt,
                log=lambda s: None)
