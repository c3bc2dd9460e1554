"""nn.MultiheadAttention's heads: SplitAttention computes what it computes, and width pruning cuts its heads
(a ViT built from nn.TransformerEncoder, the most ordinary user Transformer, lost only FFN neurons before)."""
from __future__ import annotations

import copy
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).parent))
import user_models as U  # noqa: E402

from compressor.attention import SplitAttention, split_attention  # noqa: E402

E, H = 16, 4


def _pad():
    return torch.tensor([[False] * 5, [False] * 3 + [True] * 2])


CASES = {
    "plain": ({}, {}),
    "padding, no weights": ({}, {"key_padding_mask": _pad(), "need_weights": False}),
    "per-head weights": ({}, {"key_padding_mask": _pad(), "average_attn_weights": False}),
    "float mask": ({}, {"attn_mask": torch.randn(5, 5, generator=torch.Generator().manual_seed(1))}),
    "bool mask per head": ({}, {"attn_mask": torch.eye(5, dtype=torch.bool).roll(1, 1).repeat(2 * H, 1, 1),
                                "key_padding_mask": _pad()}),
    "causal": ({}, {"attn_mask": nn.Transformer.generate_square_subsequent_mask(5), "is_causal": True,
                    "need_weights": False}),
    "causal, no mask given": ({"batch_first": True}, {"is_causal": True, "need_weights": False}),
    "causal, padding, no mask given": ({"batch_first": True}, {"is_causal": True, "need_weights": False,
                                                               "key_padding_mask": _pad()}),
    "seq first": ({"batch_first": False}, {"key_padding_mask": _pad()}),
    "kdim, vdim, no bias": ({"kdim": 8, "vdim": 12, "bias": False}, {}),
}


@pytest.mark.parametrize("case", CASES)
def test_split_attention_computes_what_multihead_attention_computes(case):
    opts, kw = CASES[case]
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(E, H, **{"batch_first": True, **opts}).eval()
    split = SplitAttention.of(mha).eval()
    q = torch.randn(2, 5, E)
    k, v = (torch.randn(2, 5, opts["kdim"]), torch.randn(2, 5, opts["vdim"])) if "kdim" in opts else (q, q)
    if not mha.batch_first:
        q, k, v = q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1)
    if "no mask given" in case:  # nn.MultiheadAttention wants the mask it is told about
        want = mha(q, k, v, attn_mask=nn.Transformer.generate_square_subsequent_mask(5), **kw)
    else:
        want = mha(q, k, v, **kw)
    got = split(q, k, v, **kw)
    assert (want[1] is None) == (got[1] is None)
    for w, g in zip(want, got):
        if w is not None:
            torch.testing.assert_close(g, w, atol=1e-6, rtol=1e-5)


def test_unbatched_inputs_and_a_transformer_encoder_that_made_nested_tensors():
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(E, H).eval()
    x = torch.randn(5, E)
    want, got = mha(x, x, x), SplitAttention.of(mha)(x, x, x)
    torch.testing.assert_close(got[0], want[0])
    torch.testing.assert_close(got[1], want[1])
    layer = nn.TransformerEncoderLayer(E, H, 32, dropout=0.0, batch_first=True)
    enc = nn.TransformerEncoder(layer, 2, enable_nested_tensor=True).eval()
    split = copy.deepcopy(enc)
    assert split_attention(split) == ["layers.0.self_attn", "layers.1.self_attn"] and not split.use_nested_tensor
    x, pad = torch.randn(2, 5, E), _pad()
    with torch.no_grad():
        want, got = enc(x, src_key_padding_mask=pad), split(x, src_key_padding_mask=pad)
    torch.testing.assert_close(got[~pad], want[~pad], atol=1e-5, rtol=1e-5)  # the fused path zeroes the padding


def _vit_with_idle_heads():
    """The test ViT (nn.TransformerEncoder) whose first layer's heads 1-3 barely reach the output."""
    torch.manual_seed(0)
    model = U.vit(dim=32, depth=2, heads=4, mlp=64).eval()
    with torch.no_grad():
        model.encoder.layers[0].self_attn.out_proj.weight[:, 8:] *= 1e-3
    return model


def test_width_cuts_the_heads_of_nn_multihead_attention(tmp_path):
    from compressor.tasks import as_tuple, onnx_io
    from compressor.width import apply_plan, prune_width
    from exporters.onnx import export_onnx, parity

    model = _vit_with_idle_heads()
    batches = [torch.randn(8, 1, 16, 16, generator=torch.Generator().manual_seed(i)) for i in range(2)]
    pruned, plan, info = prune_width(model, batches, 0.3, multiple=8, log=lambda s: None)
    assert plan["heads"]["encoder.layers.0.self_attn"] == [1, 2, 3]
    assert plan["split"] == ["encoder.layers.0.self_attn"]  # only the attention that loses heads is split
    assert plan["layouts"]["encoder.layers.0.self_attn"]["attrs"] == {"num_heads": "heads"}
    assert info["max_abs_diff_vs_masked"] < 1e-5 and info["flops_after"] <= 0.7 * info["flops_before"]
    attn = pruned.encoder.layers[0].self_attn
    assert isinstance(attn, SplitAttention) and attn.num_heads == 1 and attn.q_proj.out_features == 8
    assert isinstance(pruned.encoder.layers[1].self_attn, nn.MultiheadAttention)
    assert isinstance(model.encoder.layers[0].self_attn, nn.MultiheadAttention)  # the teacher is left as it was
    again = apply_plan(U.vit(dim=32, depth=2, heads=4, mlp=64).eval(), plan)  # the genome rebuilds the shapes
    again.load_state_dict(pruned.state_dict())
    x = batches[0]
    with torch.no_grad():
        torch.testing.assert_close(again(x), pruned(x))
    export_onnx(pruned, as_tuple(x), tmp_path / "m.onnx", **onnx_io(x, "logits"))
    assert parity(tmp_path / "m.onnx", pruned, x)["ok"]


@pytest.mark.slow
def test_a_vit_from_transformer_encoder_loses_heads_distils_and_quantizes(tiny_recipe, tmp_path):
    import compressor
    from compressor.prune import rebuild

    r = tiny_recipe
    r.update(name="vit", teacher={"model": "user_models:vit", "kwargs": {"dim": 32, "depth": 2, "heads": 4, "mlp": 64},
                                  "train": {"epochs": 4, "lr": 0.003}},
             prune={"by": "units", "remove": 0, "width": {"remove": 0.5, "multiple": 8}},
             distill={"epochs": 2, "lr": 0.003}, quantize={"mode": "ptq-ort"}, targets=[])
    r.pop("student")
    out = compressor.run(r, tmp_path / "b", log=lambda s: None)
    man = compressor.verify(out)
    plan = man["student"]["width"]
    assert plan["heads"] and set(plan["split"]) == set(plan["heads"])
    student = rebuild(man["student"])
    student.load_state_dict(torch.load(out / "model" / "student.pt"))
    assert any(isinstance(m, SplitAttention) for m in student.modules())
    q = man["quality"]
    assert q["student"]["accuracy"] >= q["teacher"]["accuracy"] - 0.15
    assert q["student_int8"]["onnx_accuracy"] >= q["student"]["accuracy"] - 0.05
