"""Width pruning (compressor/width.py): which Linear pairs and attention modules can be cut exactly, the
linearised output-loss criterion against the real loss, the FLOPs-budgeted selection, and the pruned
student through `compress run` and back from its genome."""
from __future__ import annotations

import copy
import json

import pytest
import torch
from torch import nn

from compressor import surgery as S
from compressor import width as W
from compressor.errors import UserError
from scipy.stats import spearmanr

from compressor.prune import flops, output, rebuild
from compressor.tasks import take


class Residual(nn.Module):
    def __init__(self, d=16, h=48):
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(d, h), nn.GELU(), nn.Linear(h, d)

    def forward(self, x):
        return x + self.fc2(self.act(self.fc1(x)))


class Leaky(nn.Module):
    """fc1's output also feeds a sum, so cutting its channels changes more than fc2's input."""

    def __init__(self, d=16, h=48):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(d, h), nn.Linear(h, d)

    def forward(self, x):
        h = torch.relu(self.fc1(x))
        return self.fc2(h) + h.sum(-1, keepdim=True)


def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), Residual(), nn.LayerNorm(16), nn.Linear(16, 32), nn.ReLU(),
                         nn.Linear(32, 16), nn.LayerNorm(16), Leaky(), nn.Linear(16, 5)).eval()


def test_groups_are_the_pairs_that_cut_exactly():
    groups = W.find_groups(_mlp(), torch.randn(6, 8))
    assert [(g.producer, g.path, g.size) for g in groups] == [("1.fc1", "1.fc2", 48), ("3", "5", 32),
                                                                ("7.fc2", "8", 16)]
    # Not: 0 -> 1.fc1 (a residual uses 0's output), 5 -> 7.fc1 (a LayerNorm between), Leaky's fc1 -> fc2
    # (its output feeds a sum too). 7.fc2 -> 8 is one: the sum it meets is broadcast over the channels,
    # so channel j of 8's input is fc2's channel j plus a shared term, and both go with the column.


@pytest.fixture(scope="module")
def bert(tmp_path_factory):
    pytest.importorskip("transformers")
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parent))
    from tiny_bert import make_tiny_bert

    from compressor.hf import hf_encoder

    d = make_tiny_bert(tmp_path_factory.mktemp("hf") / "tiny-bert", layers=3, hidden=32, heads=4)
    torch.manual_seed(0)
    batch = {"input_ids": torch.randint(5, 60, (12, 20)), "attention_mask": torch.ones(12, 20, dtype=torch.long)}
    batch["attention_mask"][:5, 14:] = 0
    return d, hf_encoder(path=str(d)).eval(), batch


def test_hf_encoder_groups_are_heads_and_ffn_pairs(bert):
    _, model, batch = bert
    groups = W.find_groups(model, batch)
    heads = [g for g in groups if g.kind == "heads"]
    ffn = [g for g in groups if g.kind == "ffn"]
    assert [g.path for g in heads] == [f"model.encoder.layer.{i}.attention" for i in range(3)]
    assert all(g.gate.endswith("attention.output.dense") and g.size == 4 and g.width == 8 for g in heads)
    assert [(g.producer, g.path) for g in ffn] == [
        (f"model.encoder.layer.{i}.intermediate.dense", f"model.encoder.layer.{i}.output.dense") for i in range(3)]


def test_distilbert_heads_are_found_and_cut_by_its_own_prune_heads():
    """DistilBERT's attention keeps its head count as ``n_heads`` (not ``num_attention_heads``) and prunes
    itself: its heads are a group beside the FFN pairs, and the plan cuts them exactly."""
    pytest.importorskip("transformers")
    U = _user_models()
    from compressor.intake import intake
    from compressor.tasks import call

    m = U.hf_distilbert().eval()
    batch = {"input_ids": torch.randint(5, 200, (8, 16), generator=torch.Generator().manual_seed(0)),
             "attention_mask": torch.ones(8, 16, dtype=torch.long)}
    model = intake(m, call(m, batch), names=tuple(batch))
    heads = [g for g in W.find_groups(model, batch) if g.kind == "heads"]
    assert [g.path for g in heads] == [f"distilbert.transformer.layer.{i}.attention" for i in range(2)]
    assert all(g.gate.endswith("attention.out_lin") and g.size == 4 for g in heads)
    pruned, plan, info = W.prune_width(model, [batch], 0.4, multiple=8, log=lambda s: None)
    assert info["max_abs_diff_vs_masked"] < 1e-5 and any(plan["heads"].values())
    again = W.apply_plan(copy.deepcopy(model), json.loads(json.dumps(plan)))
    torch.testing.assert_close(call(again, batch), call(pruned, batch))


# (builder, the attention modules' layout, the attributes that follow a cut, FFN producers beside the first,
# producer halves): found by cutting on a copy, never by name
LAYOUTS = [
    ("hf_llama", "model.layers.{}.self_attn", ("separate", 2, {}), ("model.layers.{}.mlp.up_proj",), 1),
    ("hf_gpt2", "transformer.h.{}.attn", ("blocked", 1, {"num_heads": "heads", "split_size": "width"}), (), 1),
    ("hf_gpt_neox", "gpt_neox.layers.{}.attention", ("interleaved", 1, {}), (), 1),
    ("hf_opt", "model.decoder.layers.{}.self_attn", ("separate", 1, {"num_heads": "heads"}), (), 1),
    ("hf_modernbert", "model.layers.{}.attn", ("blocked", 1, {"num_heads": "heads", "all_head_size": "width"}), (), 2),
]


@pytest.mark.parametrize("name,attention,layout,also,halves", LAYOUTS, ids=[c[0] for c in LAYOUTS])
def test_heads_without_prune_heads_are_cut_by_their_layout(name, attention, layout, also, halves):
    """Llama (grouped-query attention, SwiGLU), GPT-2 (Conv1D, split by a width it keeps), GPT-NeoX (heads
    interleaved in one projection), OPT (reshaped by its num_heads), ModernBERT (a fused gate and up projection):
    every layer's heads and FFN are groups, a cut of both is exact, and the plan rebuilds the student."""
    pytest.importorskip("transformers")
    model = getattr(_user_models(), name)().eval()
    gen = torch.Generator().manual_seed(0)
    batch = {"input_ids": torch.randint(1, 256, (8, 16), generator=gen), "attention_mask": torch.ones(8, 16).long()}
    groups = W.find_groups(model, batch)
    heads, ffn = [g for g in groups if g.kind == "heads"], [g for g in groups if g.kind == "ffn"]
    assert [g.path for g in heads] == [attention.format(i) for i in range(2)]
    assert {(g.layout["kind"], g.layout["rep"], tuple(sorted(g.layout["attrs"].items()))) for g in heads} == {
        (layout[0], layout[1], tuple(sorted(layout[2].items())))}
    assert [g.also for g in ffn] == [tuple(a.format(i) for a in also) for i in range(2)]
    assert {g.halves for g in ffn} == {halves} and len(ffn) == 2
    for remove, kinds in ((0.1, {"ffn": False}), (0.4, {})):  # heads alone, then heads and neurons
        pruned, plan, info = W.prune_width(model, [batch], remove, multiple=8, log=lambda s: None, **kinds)
        assert info["max_abs_diff_vs_masked"] < 1e-5 and info["flops_after"] <= (1 - remove) * info["flops_before"]
        assert set(plan.get("layouts", {})) == set(plan["heads"]) and (plan["heads"] or not kinds)
        again = W.apply_plan(copy.deepcopy(model), json.loads(json.dumps(plan)))
        again.load_state_dict(pruned.state_dict())  # the same shapes: Conv1Ds cut became the Linears they equal
        with torch.no_grad():
            torch.testing.assert_close(output(again.eval(), batch), output(pruned.eval(), batch))


@pytest.mark.parametrize("name,layout,attrs", [("hf_llama", "separate", {"num_key_value_groups": "heads"}),
                                               ("hf_falcon", "blocked", {"num_heads": "heads"})])
def test_multi_query_attention_loses_query_heads_and_keeps_its_one_key_value_head(name, layout, attrs):
    """One key/value head for all: query heads are the elements; the key/value rows stay, and the count of
    queries per key/value head follows (Llama repeats k and v by it where a padding mask is given)."""
    from compressor.intake import intake
    from compressor.tasks import call

    pytest.importorskip("transformers")
    U = _user_models()
    model = (U.hf_llama(kv_heads=1) if name == "hf_llama" else U.hf_falcon()).eval()
    mask = torch.ones(8, 16).long()
    mask[:4, 10:] = 0  # padding: Llama's sdpa path repeats k and v by num_key_value_groups
    batch = {"input_ids": torch.randint(1, 256, (8, 16), generator=torch.Generator().manual_seed(0)),
             "attention_mask": mask}
    model = intake(model, call(model, batch), names=tuple(batch))
    heads = [g for g in W.find_groups(model, batch) if g.kind == "heads"]
    assert len(heads) == 2 and all(g.size == 4 and g.layout["shared"] and g.layout["kind"] == layout
                                   and g.layout["attrs"] == attrs for g in heads)
    pruned, plan, info = W.prune_width(model, [batch], 0.1, ffn=False, multiple=8, log=lambda s: None)
    assert plan["heads"] and info["max_abs_diff_vs_masked"] < 1e-5
    for path, removed in plan["heads"].items():
        att = pruned.get_submodule(path)
        proj = att.q_proj if name == "hf_llama" else att.query_key_value
        assert proj.out_features == (4 - len(removed)) * 8 + (0 if name == "hf_llama" else 16)
    again = W.apply_plan(copy.deepcopy(model), json.loads(json.dumps(plan)))
    again.load_state_dict(pruned.state_dict())
    torch.testing.assert_close(call(again, batch), call(pruned, batch))


class _PositionMLP(nn.Module):
    """Swin V2's position bias: an MLP over a buffer of coordinates, added to every sample; and a real FFN."""

    def __init__(self, dim=32):
        super().__init__()
        self.patch = nn.Conv2d(1, dim, 4, 4)
        ys, xs = torch.meshgrid(torch.linspace(-1, 1, 4), torch.linspace(-1, 1, 4), indexing="ij")
        self.register_buffer("coords", torch.stack([xs, ys], -1).reshape(16, 2))
        self.pos = nn.Sequential(nn.Linear(2, 64), nn.ReLU(), nn.Linear(64, dim))
        self.ffn = nn.Sequential(nn.Linear(dim, 64), nn.GELU(), nn.Linear(64, dim))
        self.head = nn.Linear(dim, 10)

    def forward(self, x):
        h = self.patch(x).flatten(2).transpose(1, 2) + self.pos(self.coords)
        return self.head(self.ffn(h).mean(1))


class _BiasedAttention(nn.Module):
    """A user's attention with a learned bias per head on the scores (relative-position tables, learned slopes)."""

    def __init__(self, dim=32, num_heads=4, tokens=16):
        super().__init__()
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.q_proj, self.k_proj, self.v_proj, self.out_proj = (nn.Linear(dim, dim) for _ in range(4))
        self.bias = nn.Parameter(torch.randn(num_heads, tokens, tokens) * 0.1)
        self.rel = nn.Embedding(tokens, num_heads)  # a per-head table read by index, as WavLM's

    def forward(self, x):
        b, t, _ = x.shape
        q, k, v = (p(x).view(b, t, -1, self.head_dim).transpose(1, 2) for p in (self.q_proj, self.k_proj, self.v_proj))
        s = q @ k.transpose(-1, -2) * self.head_dim ** -0.5 + self.bias + self.rel.weight.T[:, None, :t]
        return x + self.out_proj((s.softmax(-1) @ v).transpose(1, 2).reshape(b, t, -1))


def test_heads_with_a_table_of_their_own_are_cut_with_it():
    """The cut sliced q, k, v and the output projection but not a table indexed by head, so no cut was exact and
    the attention was no group."""
    torch.manual_seed(0)
    model = nn.Sequential(_BiasedAttention(), _BiasedAttention(), nn.Linear(32, 4)).eval()
    x = torch.randn(8, 16, 32)
    heads = [g for g in W.find_groups(model, x) if g.kind == "heads"]
    assert [g.path for g in heads] == ["0", "1"] and all(g.layout["tables"] == [("bias", 0), ("rel.weight", 1)]
                                                         for g in heads)
    pruned, plan, info = W.prune_width(model, [x], 0.2, multiple=8, ffn=False, log=lambda s: None)
    assert plan["heads"] and info["max_abs_diff_vs_masked"] < 1e-5
    kept = 4 - len(plan["heads"]["0"]) if "0" in plan["heads"] else 4
    assert pruned[0].bias.shape[0] == kept and pruned[0].rel.weight.shape[1] == pruned[0].rel.embedding_dim == kept
    again = W.apply_plan(copy.deepcopy(model), json.loads(json.dumps(plan)))
    again.load_state_dict(pruned.state_dict())
    torch.testing.assert_close(again(x), pruned(x))


class _AnnotatedAttention(nn.Module):
    """The Annotated Transformer's MultiHeadedAttention: ``self.h`` heads of ``self.d_k``, four Linears in a list."""

    def __init__(self, d_model=32, h=4):
        super().__init__()
        self.d_k, self.h = d_model // h, h
        self.linears = nn.ModuleList(nn.Linear(d_model, d_model) for _ in range(4))

    def forward(self, x):
        b = x.size(0)
        q, k, v = (lin(x).view(b, -1, self.h, self.d_k).transpose(1, 2) for lin in self.linears[:3])
        a = torch.einsum("bhqd,bhkd->bhqk", q, k).div(self.d_k ** 0.5).softmax(-1)
        return x + self.linears[-1]((a @ v).transpose(1, 2).reshape(b, -1, self.h * self.d_k))


def test_swins_heads_are_cut_with_their_relative_position_bias():
    """Swin's prune_heads cuts q, k, v and the output but not the relative-position bias table indexed by head, so
    no cut was exact and Swin kept every head (its FLOPs are mostly convolutions' otherwise)."""
    from compressor.intake import intake
    from compressor.tasks import call

    pytest.importorskip("transformers")
    m = _user_models().hf_swin().eval()
    x = torch.randn(8, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    model = intake(m, call(m, x))
    heads = [g for g in W.find_groups(model, x) if g.kind == "heads"]
    assert len(heads) == 4 and all(g.layout["tables"] == [("self.relative_position_bias_table", 1)] for g in heads)
    pruned, plan, info = W.prune_width(model, [x], 0.3, multiple=8, log=lambda s: None)
    assert plan["heads"] and info["max_abs_diff_vs_masked"] < 1e-5
    for path, gone in plan["heads"].items():
        att = pruned.get_submodule(path).self
        assert att.relative_position_bias_table.shape[1] == att.num_attention_heads == (
            model.get_submodule(path).self.num_attention_heads - len(gone))
    again = W.apply_plan(copy.deepcopy(model), json.loads(json.dumps(plan)))
    again.load_state_dict(pruned.state_dict())
    torch.testing.assert_close(call(again, x), call(pruned, x))


def test_heads_counted_as_h_of_d_k_are_cut():
    """A head count named ``h`` and a head size named ``d_k`` (the Annotated Transformer, and code written from it)
    were not looked for: no head was found."""
    torch.manual_seed(0)
    model = nn.Sequential(_AnnotatedAttention(), _AnnotatedAttention(), nn.Linear(32, 4)).eval()
    x = torch.randn(8, 16, 32)
    heads = [g for g in W.find_groups(model, x) if g.kind == "heads"]
    assert [g.path for g in heads] == ["0", "1"] and all(g.layout["attrs"] == {"h": "heads"} for g in heads)
    pruned, plan, info = W.prune_width(model, [x], 0.2, multiple=8, ffn=False, log=lambda s: None)
    assert plan["heads"] and info["max_abs_diff_vs_masked"] < 1e-5
    assert all(m.h * m.d_k == m.linears[0].out_features for m in pruned[:2])


class _NamedAttention(nn.Module):
    """A user's attention keeping its head count and head size under names of its own choosing."""

    def __init__(self, count, size, d_model=32, heads=4):
        super().__init__()
        self.count, self.size = count, size
        setattr(self, count, heads)
        setattr(self, size, d_model // heads)
        self.q, self.k, self.v, self.o = (nn.Linear(d_model, d_model) for _ in range(4))

    def forward(self, x):
        n, d = getattr(self, self.count), getattr(self, self.size)
        q, k, v = (p(x).unflatten(-1, (n, d)).transpose(1, 2) for p in (self.q, self.k, self.v))
        return x + self.o(nn.functional.scaled_dot_product_attention(q, k, v).transpose(1, 2).flatten(2))


@pytest.mark.parametrize("count,size", [("nhead", "dh"), ("n_heads_q", "dim_per_head"), ("num_head", "hd")])
def test_heads_under_names_of_the_users_choosing_are_cut(count, size):
    """Only the names in groups.COUNTS and SIZES were looked for: nn.Transformer's own ``nhead``, a ``num_head``
    or a ``dim_per_head`` left every head (and no FFN, here) to cut."""
    torch.manual_seed(0)
    model = nn.Sequential(_NamedAttention(count, size), _NamedAttention(count, size), nn.Linear(32, 4)).eval()
    x = torch.randn(8, 16, 32)
    heads = [g for g in W.find_groups(model, x) if g.kind == "heads"]
    assert [g.path for g in heads] == ["0", "1"]
    pruned, plan, info = W.prune_width(model, [x], 0.2, multiple=8, ffn=False, log=lambda s: None)
    assert plan["heads"] and info["max_abs_diff_vs_masked"] < 1e-5
    assert any(getattr(m, count) < 4 for m in pruned[:2])


def test_an_mlp_no_input_reaches_is_no_ffn_pair():
    """Width pruning cut Swin V2's position-bias MLP (512 neurons to 48) for most of its budget: runtimes fold
    that MLP at load, so nothing deployed got faster, while every sample's position bias changed (its student
    fell to 0.23 against 0.67)."""
    groups = W.find_groups(_PositionMLP().eval(), torch.randn(4, 1, 16, 16))
    paths = [g.path for g in groups]
    assert "ffn.2" in paths and not any(p.startswith("pos.") for p in paths + [g.producer for g in groups])


def test_t5_heads_are_cut_by_its_prune_heads():
    """T5's attention has prune_heads but keeps its head size as key_value_proj_dim, not attention_head_size: no
    head was found, and width pruning cut only FFN neurons. The shared relative position bias is masked by each
    layer's own pruned heads (T5's code), so encoder and decoder heads are cut exactly."""
    from compressor.intake import intake
    from compressor.tasks import call

    pytest.importorskip("transformers")
    m = _user_models().hf_t5().eval()
    ids = torch.randint(2, 256, (8, 16), generator=torch.Generator().manual_seed(0))
    ids[:, -1] = 1  # one <eos> each
    batch = {"input_ids": ids, "attention_mask": torch.ones(8, 16).long()}
    model = intake(m, call(m, batch), names=tuple(batch))
    heads = [g for g in W.find_groups(model, batch) if g.kind == "heads"]
    assert {g.path.split(".")[1] for g in heads} == {"encoder", "decoder"} and all(g.size == 4 for g in heads)
    assert "transformer.encoder.block.0.layer.0.SelfAttention" in [g.path for g in heads]  # the bias's own layer
    pruned, plan, info = W.prune_width(model, [batch], 0.4, multiple=8, log=lambda s: None)
    assert plan["heads"] and info["max_abs_diff_vs_masked"] < 1e-5
    again = W.apply_plan(copy.deepcopy(model), json.loads(json.dumps(plan)))
    again.load_state_dict(pruned.state_dict())
    torch.testing.assert_close(call(again, batch), call(pruned, batch))


def test_heads_a_model_biases_from_outside_are_not_cut_and_a_block_holding_its_attention_is():
    """Bloom's ALiBi slopes come from the config's head count, outside the attention: no cut of its heads is
    exact, so they are no group (its FFN pairs are). A user's block holding ``heads``, one fused qkv Linear,
    SDPA and its FFN: the heads are found on the block, and the FFN after them is a pair still."""
    pytest.importorskip("transformers")
    U = _user_models()
    batch = {"input_ids": torch.randint(1, 256, (8, 16), generator=torch.Generator().manual_seed(0)),
             "attention_mask": torch.ones(8, 16).long()}
    assert [g.kind for g in W.find_groups(U.hf_bloom().eval(), batch)] == ["ffn", "ffn"]
    groups = W.find_groups(U.fused_qkv_vit().eval(), torch.randn(4, 1, 16, 16))
    assert [(g.kind, g.path) for g in groups] == [("heads", f"blocks.{i}") for i in range(3)] + [
        ("ffn", f"blocks.{i}.mlp.2") for i in range(3)]
    assert all(g.layout["kind"] == "blocked" and g.layout["attrs"] == {"heads": "heads"} for g in groups[:3])


def test_linearised_scores_rank_heads_by_their_real_output_loss(bert):
    """s_j (first order, random projections) against E||y(without head j) - y||^2, every head alone."""
    _, model, batch = bert
    groups = [g for g in W.find_groups(model, batch) if g.kind == "heads"]
    W.score_groups(model, groups, [batch], projections=16)
    ref = output(model, batch)
    real, est = [], []
    for g in groups:
        for j in range(g.size):
            with W._swapped(model, W.heads_swap(model, g, [j])), torch.no_grad():
                real.append(float((output(model, batch) - ref).pow(2).sum(1).mean()))
            est.append(g.scores[j])
    assert spearmanr(est, real).statistic > 0.7, (est, real)


def _group(kind, size, flops_each, scores, path):
    g = W.Group(kind, path, path, path + ".producer", size, 1 if kind == "ffn" else 8, flops_each)
    g.scores = scores
    return g


def test_select_meets_the_budget_in_blocks_and_keeps_one_of_each():
    ffn = _group("ffn", 40, 10.0, [float(j) for j in range(40)], "f")
    heads = _group("heads", 3, 100.0, [0.5, 50.0, 0.1], "h")
    plan = W.select([ffn, heads], budget=250.0, multiple=8)
    # Cheapest per FLOP first: head 2 (0.001/FLOP), head 0 (0.005), then the first 8-block of neurons
    # (0.35/FLOP) rather than head 1 (0.5/FLOP): 280 FLOPs in all.
    assert plan["heads"] == {"h": [0, 2]}
    assert plan["ffn"]["f"]["keep"] == list(range(8, 40))
    # Everything but one block and one head is the most a budget can take.
    plan = W.select([ffn, heads], budget=200 + 32 * 10, multiple=8)
    assert len(plan["ffn"]["f"]["keep"]) == 8 and len(plan["heads"]["h"]) == 2
    with pytest.raises(UserError, match="every FFN pair to one block of 8 and every attention to one head saves "
                                        "520 FLOPs per sample, short of the 521 asked; lower prune.width.remove"):
        W.select([ffn, heads], budget=200 + 32 * 10 + 1, multiple=8)
    with pytest.raises(UserError, match=r"cutting every FFN pair to one block of 8 saves 320 .*\(no attention heads "
                                        r"were found to cut"):  # it said "and every attention" without any
        W.select([ffn], budget=321, multiple=8)
    # A width that is not a multiple: the first block takes the remainder, so what stays is a multiple.
    odd = _group("ffn", 37, 10.0, [float(j) for j in range(37)], "o")
    assert len(W.select([odd], budget=10.0, multiple=8)["ffn"]["o"]["keep"]) == 32


def test_prune_width_cuts_exactly_and_meets_the_budget(bert):
    _, model, batch = bert
    pruned, plan, info = W.prune_width(model, [batch], 0.4, multiple=8, log=lambda s: None)
    assert info["max_abs_diff_vs_masked"] < 1e-5
    assert info["flops_after"] <= 0.6 * info["flops_before"] and info["flops_after"] == flops(pruned, batch)
    assert all(len(p["keep"]) % 8 == 0 for p in plan["ffn"].values())
    assert all(len(h) < 4 for h in plan["heads"].values())
    assert pruned(**batch).shape == (12, 32)
    # The plan alone, on a fresh copy of the model, gives the same student.
    again = W.apply_plan(copy.deepcopy(model), json.loads(json.dumps(plan)))
    torch.testing.assert_close(again(**batch), pruned(**batch))
    # The model handed in is unchanged.
    assert model.model.encoder.layer[0].intermediate.dense.out_features == 64


def test_no_group_is_a_clear_error():
    conv = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 3)).eval()
    with pytest.raises(UserError, match="no FFN pairs or attention heads"):
        W.prune_width(conv, [torch.randn(2, 1, 8, 8)], 0.3)



# ------------------------------------------------------------------------------ the residual stream

def _user_models():
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parent))
    import user_models as U

    return U


def test_stream_is_found_by_permutation_on_models_we_did_not_write(bert):
    """Post-LN (a Hugging Face encoder and classifier) and pre-LN (a residual MLP with the add in forward):
    the stream's members found from one forward pass; nn.MultiheadAttention's fused projection is refused."""
    U = _user_models()
    _, enc, batch = bert
    s = S.find_stream(enc, batch)
    assert s.width == 32 and len(s.embeddings) == 3 and len(s.norms) == 7  # the embeddings' and two per layer
    assert all(f"model.encoder.layer.{i}.{m}" in s.readers for i in range(3)
               for m in ("attention.self.query", "attention.self.key", "attention.self.value", "intermediate.dense"))
    assert s.writers == [f"model.encoder.layer.{i}.{m}" for i in range(3) for m in ("attention.output.dense", "output.dense")]
    cls = U.hf_bert()
    s = S.find_stream(cls, torch.randint(0, 256, (4, 16)))
    assert "bert.pooler.dense" in s.readers and "classifier" not in s.readers + s.writers
    mlp = U.residual_mlp(dim=32, hidden=64, depth=3).eval()
    s = S.find_stream(mlp, torch.randn(8, 1, 16, 16))
    assert s.writers == ["inp", "blocks.0.3", "blocks.1.3", "blocks.2.3"] and s.readers[-1] == "out"
    assert S.find_stream(U.vit(dim=32, depth=2, heads=4, mlp=64).eval(), torch.randn(8, 1, 16, 16)) is None


def test_stream_scores_rank_channels_by_their_real_output_loss():
    """s_j against E||y(channel j zeroed at every LayerNorm) - y||^2, each of a residual MLP's channels alone."""
    U = _user_models()
    torch.manual_seed(0)
    mlp = U.residual_mlp(dim=32, hidden=64, depth=3).eval()
    x = torch.randn(64, 1, 16, 16)
    s = S.score_stream(mlp, S.find_stream(mlp, x), [x], projections=16)
    ref = output(mlp, x)
    real = []
    for j in range(s.width):
        mask = torch.ones(s.width)
        mask[j] = 0
        hs = [mlp.get_submodule(p).register_forward_hook(lambda _m, _a, o: o * mask) for p in s.norms]
        with torch.no_grad():
            real.append(float((output(mlp, x) - ref).pow(2).sum(1).mean()))
        for h in hs:
            h.remove()
    assert spearmanr(s.scores, real).statistic > 0.7, (s.scores, real)


@pytest.mark.parametrize("which", ["encoder", "residual_mlp"])
def test_hidden_cut_narrows_the_stream_and_rebuilds_from_its_plan(bert, which):
    if which == "encoder":
        _, model, batch = bert
    else:
        model, batch = _user_models().residual_mlp(dim=32, hidden=64, depth=3).eval(), torch.randn(12, 1, 16, 16)
    before = output(model, batch)
    pruned, plan, info = W.prune_width(model, [batch], 0.5, multiple=8, hidden=0.25, log=lambda s: None)
    assert info["hidden"]["kept"] == len(plan["hidden"]["keep"]) == 24
    assert info["flops_after"] <= 0.5 * info["flops_before"] and info["flops_after"] == flops(pruned, batch)
    # A sentence encoder's embedding narrows with its stream; a classifier's logits do not.
    assert output(pruned, batch).shape == ((12, 24) if which == "encoder" else (12, 10))
    again = W.apply_plan(copy.deepcopy(model), json.loads(json.dumps(plan)))
    torch.testing.assert_close(output(again, batch), output(pruned, batch))
    torch.testing.assert_close(output(model, batch), before)  # the model handed in is unchanged
    # The stream's cut alone past the budget: no neuron or head goes.
    _, plan, _ = W.prune_width(model, [batch], 0.1, multiple=8, hidden=0.5, log=lambda s: None)
    assert not plan["ffn"] and not plan["heads"] and len(plan["hidden"]["keep"]) == 16



class TinyLM(nn.Module):
    """Pre-LN blocks over a token table; a classifier head with its own hidden layer on the first token, or a
    language-model head tied to the token table."""

    def __init__(self, vocab=40, d=32, depth=2, tied=False, zero_slot=False):
        super().__init__()
        self.tok = nn.Embedding(vocab, d)
        self.blocks = nn.ModuleList(nn.Sequential(nn.LayerNorm(d), nn.Linear(d, 2 * d), nn.GELU(), nn.Linear(2 * d, d))
                                    for _ in range(depth))
        self.norm = nn.LayerNorm(d)
        self.tied, self.zero_slot, self.d = tied, zero_slot, d
        if tied:
            self.head = nn.Linear(d, vocab, bias=False)
            self.head.weight = self.tok.weight
        else:
            self.head = nn.Sequential(nn.Linear(d, d), nn.Dropout(0.1), nn.Linear(d, 3))

    def forward(self, ids):
        x = self.tok(ids)
        if self.zero_slot:  # a slot of the width written into the code
            x = torch.cat([x.new_zeros(len(x), 1, self.d), x], 1)
        for b in self.blocks:
            x = x + b(x)
        x = self.norm(x)
        return self.head(x) if self.tied else self.head(x[:, 0])


def test_stream_leaves_heads_alone_keeps_ties_and_refuses_a_width_in_the_code():
    torch.manual_seed(0)
    ids = torch.randint(0, 40, (6, 10))
    cls = TinyLM().eval()
    s = S.find_stream(cls, ids)
    # the head's own hidden layer (its output passes a Dropout unchanged) is not the stream's
    assert s.readers == ["blocks.0.1", "blocks.1.1", "head.0"] and s.writers == ["blocks.0.3", "blocks.1.3"]
    lm = TinyLM(tied=True).eval()
    assert "head" in S.find_stream(lm, ids).readers
    pruned, _, _ = W.prune_width(lm, [ids], 0.3, multiple=8, hidden=0.25, log=lambda s: None)
    assert pruned.head.weight is pruned.tok.weight and pruned.tok.weight.shape == (40, 24)
    assert S.find_stream(TinyLM(zero_slot=True).eval(), ids) is None

def test_hidden_cuts_a_stream_through_nn_multihead_attention_and_a_pooled_head():
    """A text transformer from torch's own modules: nn.MultiheadAttention reads the stream with one fused weight, and
    the head reads norm(h).mean(1), a new tensor; the stream was refused. Every attention is split into Linears
    first (the plan's ``split``, repeated before the stream's cut on rebuild), and a Linear of the stream's width
    whose input is no stream tensor joins the readers where the permutation check then passes."""
    torch.manual_seed(0)
    model = _user_models().text_transformer().eval()
    ids = torch.randint(0, 256, (16, 16))
    for remove in (0.2, 0.5):
        pruned, plan, info = W.prune_width(model, [ids], remove, multiple=8, hidden=0.25, log=lambda s: None)
        assert len(plan["split"]) == 2 and info["hidden"]["kept"] == 48
        assert "head" in plan["hidden"]["readers"] and pruned.head.in_features == 48
        again = W.apply_plan(copy.deepcopy(model), plan).eval()
        assert torch.equal(again(ids), pruned.eval()(ids))
    assert isinstance(model.encoder.layers[0].self_attn, torch.nn.MultiheadAttention)  # the model itself is left


@pytest.mark.parametrize("which", ["vit", "hf_vit"])
def test_hidden_cuts_a_vits_stream_from_its_patch_convolution_and_bare_tables(which):
    """A ViT writes its stream's first tensor through a patch convolution, flattened, a class token concatenated and
    a position table added, both bare parameters: none of it is a Linear or an Embedding the trace sees, and the
    stream was refused. The convolutions of the stream's width and the bare parameters along it join where the
    permutation check then passes; the cut rebuilds from the plan."""
    from compressor.intake import adapt
    from compressor.tasks import output

    torch.manual_seed(0)
    model = adapt(getattr(_user_models(), which)().eval())
    x = torch.randn(8, 1, 16, 16)
    pruned, plan, info = W.prune_width(model, [x], 0.4, multiple=8, hidden=0.25, log=lambda s: None)
    assert plan["hidden"]["stems"] and plan["hidden"]["params"] and info["hidden"]["kept"] == 24
    again = W.apply_plan(copy.deepcopy(model), plan).eval()
    assert torch.equal(output(again, x), output(pruned.eval(), x))


def test_hidden_cuts_a_post_ln_stream_that_starts_at_the_tables_sum():
    """Post-LN blocks (nn.TransformerEncoderLayer's default) whose first reads the unnormalised sum of the token and
    position tables: the trace found no stream tensor before the first LayerNorm, so the first attention's readers
    and writer were not seen and the stream was refused. A Linear reading the tables' sum now starts it."""
    torch.manual_seed(0)
    layer = torch.nn.TransformerEncoderLayer(32, 4, 64, dropout=0.0, batch_first=True, norm_first=False)

    class PostLN(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.tok, self.pos = torch.nn.Embedding(64, 32), torch.nn.Embedding(8, 32)
            self.encoder = torch.nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
            self.head = torch.nn.Linear(32, 4)

        def forward(self, ids):
            return self.head(self.encoder(self.tok(ids) + self.pos(torch.arange(ids.shape[1])))[:, 0])

    model, ids = PostLN().eval(), torch.randint(0, 64, (4, 8))
    pruned, plan, _ = W.prune_width(model, [ids], 0.3, multiple=8, hidden=0.25, log=lambda s: None)
    assert "encoder.layers.0.self_attn.q_proj" in plan["hidden"]["readers"]
    assert "encoder.layers.0.self_attn.out_proj" in plan["hidden"]["writers"]
    assert torch.equal(W.apply_plan(copy.deepcopy(model), plan).eval()(ids), pruned.eval()(ids))


def test_hidden_without_a_stream_is_a_clear_error():
    """Swin's stream changes width between stages (patch merging): no one stream permutes."""
    from compressor.intake import adapt

    swin = adapt(_user_models().hf_swin().eval())
    with pytest.raises(UserError, match="prune.width.hidden: .*no residual stream"):
        W.prune_width(swin, [torch.randn(4, 1, 16, 16)], 0.3, hidden=0.25, log=lambda s: None)

def test_width_spec_checks():
    from pydantic import ValidationError

    from compressor.recipe import PruneSpec

    with pytest.raises(ValidationError, match="remove: 0 prunes nothing"):
        PruneSpec(by="units", remove=0)
    with pytest.raises(ValidationError):
        PruneSpec(by="units", remove=1, width={"remove": 1.0})
    assert PruneSpec(by="units", remove=0, width={"remove": 0.5}).width.multiple == 16
    timed = {"by": "units", "remove": 1, "width": {"remove": 0.5, "cost": "latency"}}
    assert PruneSpec(**timed, device="local-cpu").device == "local-cpu"  # the device the width cut is timed on
    with pytest.raises(ValidationError, match="device also with width.cost: latency"):
        PruneSpec(by="units", remove=1, width={"remove": 0.5}, device="local-cpu")
    with pytest.raises(ValidationError, match="latency: predict covers whole layers only"):
        PruneSpec(by="latency", remove=0.3, latency="predict", predictor="p.json", width=timed["width"])
    with pytest.raises(ValidationError, match="no measured cost"):
        PruneSpec(by="units", remove=1, width={"remove": 0.5, "cost": "latency", "hidden": 0.25})


def test_latency_cost_cuts_first_the_heads_a_device_makes_dear(bert, monkeypatch):
    """width.cost: latency. On a device where a head costs 0.5 ms and an FFN neuron 0.001 ms (far more than their
    FLOPs' ratio), the measured costs reach each group, the cut takes heads where the FLOPs cut takes neurons too,
    and it removes the fraction of the device's milliseconds asked."""
    from compressor import measure as M

    _, enc, batch = bert

    def ms(m):
        heads = sum(c.num_attention_heads for c in m.modules() if hasattr(c, "attention_head_size"))
        neurons = sum(c.out_features for n, c in m.named_modules() if n.endswith("intermediate.dense"))
        return 1.0 + 0.5 * heads + 0.001 * neurons

    seen = []

    def timed(models, example, device, **kw):
        out = [ms(m) for m in models]  # the models may come one at a time
        seen.append(len(out))
        return out

    monkeypatch.setattr(M, "round_robin_ms", timed)
    _, by_flops, _ = W.prune_width(enc, [batch], 0.3, multiple=8, log=lambda s: None)
    logs = []
    cut, plan, info = W.prune_width(enc, [batch], 0.3, multiple=8, log=logs.append,
                                    latency={"device": None, "example": take(batch, 1)})
    assert seen == [1 + 6]  # the model and each of its 3 attentions and 3 FFN pairs cut to its least, together
    costs = {g["path"]: g["ms_per_element"] for g in info["groups"]}
    assert all(c == pytest.approx(0.5 if "attention" in p else 0.001) for p, c in costs.items()), costs
    lat = info["latency"]
    assert lat["ms_before"] == pytest.approx(ms(enc)) and lat["cut_ms"] >= 0.3 * lat["ms_before"]
    assert ms(cut) <= 0.7 * ms(enc) + 1e-9  # the budget holds on the device's own figures

    def gone(p, kind):
        return sum(len(v) for v in p["heads"].values()) if kind == "heads" else \
            sum(g.size - len(p["ffn"].get(g.path, {"keep": range(g.size)})["keep"]) for g in groups)

    groups = [g for g in W.find_groups(enc, batch) if g.kind == "ffn"]
    assert gone(plan, "heads") > gone(by_flops, "heads") and gone(plan, "ffn") < gone(by_flops, "ffn")
    assert any("ms measured; one element saves" in line for line in logs)


def test_latency_cost_on_a_residual_mlp_cuts_where_the_device_is_slow(monkeypatch):
    """A model of FFN pairs alone (the add in forward): on a device where the first block's neurons cost ten times
    the others', the latency cut takes more of the first block than the FLOPs cut does, and meets its budget."""
    from compressor import measure as M

    U = _user_models()
    torch.manual_seed(0)
    mlp = U.residual_mlp(dim=32, hidden=64, depth=3).eval()
    x = torch.randn(16, 1, 16, 16)

    def ms(m):
        return 0.5 + sum(w * b[1].out_features for w, b in zip((0.01, 0.001, 0.001), m.blocks))

    monkeypatch.setattr(M, "round_robin_ms", lambda models, example, device, **kw: [ms(m) for m in models])
    _, by_flops, _ = W.prune_width(mlp, [x], 0.3, multiple=8, log=lambda s: None)
    cut, plan, info = W.prune_width(mlp, [x], 0.3, multiple=8, log=lambda s: None,
                                    latency={"device": None, "example": x[:1]})

    def kept(p, i):
        return len(p["ffn"].get(f"blocks.{i}.3", {"keep": range(64)})["keep"])

    assert kept(plan, 0) < kept(by_flops, 0)
    assert ms(cut) <= 0.7 * ms(mlp) + 1e-9
    assert {g["path"]: round(g["ms_per_element"], 6) for g in info["groups"]} == {
        "blocks.0.3": 0.01, "blocks.1.3": 0.001, "blocks.2.3": 0.001}


@pytest.mark.slow
@pytest.mark.parametrize("hidden,cost", [(0.0, "flops"), (0.25, "flops"), (0.0, "latency")])
def test_compress_run_with_width_pruning_rebuilds_from_its_genome(bert, tmp_path, hidden, cost):
    """Drop one of three layers, cut 40% of the rest's FLOPs in heads and neurons (and with ``hidden`` a quarter
    of the residual stream first: a narrower sentence embedding; with ``cost: latency`` 5% of its milliseconds
    on local-cpu instead: all that the cut may remove measured 13 to 30% of them between runs), distil, export:
    the bundle verifies, and the genome in the manifest rebuilds a student that loads the shipped weights."""
    from compressor.bundle import verify
    from compressor.pipeline import run

    d, _, _ = bert
    recipe = {
        "name": "tiny-width", "task": "embedding",
        "teacher": {"model": "hf-encoder", "kwargs": {"path": str(d)}},
        "data": {"dataset": "docstrings", "kwargs": {"max_length": 32, "max_train": 120, "max_test": 60},
                 "batch_size": 32},
        "prune": {"by": "units", "remove": 1, "width": {"remove": 0.4 if cost == "flops" else 0.05, "multiple": 8,
                                                    "hidden": hidden, "cost": cost}},
        "distill": {"epochs": 1, "lr": 1e-3, "losses": [
            {"name": "cosine", "relation": 1.0},
            {"name": "minilm", "heads": 8, "pairs": [["model.encoder.layer.1.attention.self",
                                                      "model.encoder.layer.2.attention.self"]]}]},
        "targets": ["local-cpu"],
        "profile": {"batch_sizes": [1], "runs": 5, "warmup": 1},
    }
    out = run(recipe, tmp_path / "bundle", log=lambda s: None)
    m = json.loads((out / "manifest.json").read_text())
    prune = next(s for s in m["stages"] if s["name"] == "prune")
    w = prune["metrics"]["width"]
    assert w["max_abs_diff_vs_masked"] < 1e-5
    if cost == "flops":
        assert w["flops_after"] <= 0.6 * w["flops_before"]
    else:  # milliseconds measured on the first target, local-cpu, at the data's length
        # (a model this small is mostly what no cut removes: its embeddings, norms and the runtime's own overhead)
        assert w["latency"]["cut_ms"] >= 0.05 * w["latency"]["ms_before"] > 0
        assert all(g["ms_per_element"] > 0 for g in w["groups"])
    genome = m["student"]
    assert genome["width"] == prune["outputs"]["width"] and len(genome["removed"]) == 1
    student = rebuild(genome)
    student.load_state_dict(torch.load(out / "model" / "student.pt"))  # shapes match the shipped weights
    assert m["quality"]["student"]["agreement"] > 0.3
    assert len(genome["width"].get("hidden", {}).get("keep", range(32))) == (24 if hidden else 32)
    verify(out)
