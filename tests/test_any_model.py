"""The user's own model, not ours: intake, the one FLOP counter, export, structural and layer pruning, and
whole runs, on models the tests define themselves (tests/user_models.py) and on tiny Hugging Face
classifiers. None of compressor's builders made any of them."""
from __future__ import annotations

import copy
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).parent))
import user_models as U  # noqa: E402

from compressor.flops import count_flops  # noqa: E402
from compressor.intake import intake, is_adapted  # noqa: E402
from compressor.tasks import call as _call  # noqa: E402

OWN = ["vit", "residual_mlp", "dw_cnn"]
HF = ["hf_resnet", "hf_mobilenet", "hf_vit", "hf_bert"]
ALL = OWN + HF


def _needs(name):
    if name.startswith("hf_"):
        pytest.importorskip("transformers")


def _example(name, n=2):
    if name in ("hf_bert", "hf_distilbert"):
        g = torch.Generator().manual_seed(0)
        return {"input_ids": torch.randint(1, 256, (n, 16), generator=g),
                "attention_mask": torch.ones(n, 16, dtype=torch.long)}
    return torch.randn(n, 1, 16, 16, generator=torch.Generator().manual_seed(0))


def _model(name):
    _needs(name)
    m = getattr(U, name)().eval()
    x = _example(name)
    return intake(m, _call(m, x)), x


# ------------------------------------------------------------------------------------------ FLOPs

def independent_flops(model: nn.Module, x) -> int:
    """FLOPs of one sample counted from module shapes alone (2 per multiply-add): convolutions and Linear
    layers by forward hooks, attention by its shapes (nn.MultiheadAttention's projections run as
    functions, not modules; softmax(QK^T)V is two L x S x E matmuls)."""
    total = 0

    def conv(m, i, o):
        nonlocal total
        total += 2 * o[0].numel() * (m.in_channels // m.groups) * m.kernel_size[0] * m.kernel_size[1]

    def linear(m, i, o):
        nonlocal total
        total += 2 * o[0].numel() * m.in_features

    def mha(m, i, o):
        nonlocal total
        q = i[0][0]  # batch_first: (L, E) of the first sample
        L, E = q.shape
        total += 2 * L * E * 3 * E + 2 * L * E * E + 4 * L * L * E

    def hf_attention(m, i, o):
        nonlocal total
        h = i[0][0]
        total += 4 * h.shape[0] * h.shape[0] * m.all_head_size

    handles = []
    for mod in model.modules():
        if isinstance(mod, nn.MultiheadAttention):
            handles.append(mod.register_forward_hook(mha))
        elif isinstance(mod, nn.Conv2d):
            handles.append(mod.register_forward_hook(conv))
        elif isinstance(mod, nn.Linear) and not any(isinstance(p, nn.MultiheadAttention) for p in model.modules()
                                                    if mod in list(p.children())):
            handles.append(mod.register_forward_hook(linear))
        elif hasattr(mod, "num_attention_heads") and hasattr(mod, "query"):
            handles.append(mod.register_forward_hook(hf_attention))
    one = {k: v[:1] for k, v in x.items()} if isinstance(x, dict) else x[:1]
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        with torch.no_grad():
            _call(model.eval(), one)
    finally:
        torch.backends.mha.set_fastpath_enabled(True)
        for h in handles:
            h.remove()
    return total


@pytest.mark.parametrize("name", ALL)
def test_flop_counter_matches_an_independent_count(name):
    model, x = _model(name)
    ours, theirs = count_flops(model, x), independent_flops(model, x)
    assert theirs > 0
    assert abs(ours - theirs) / theirs < 0.01, (ours, theirs)


def test_flop_counter_sees_through_the_transformer_fast_path():
    model, x = _model("vit")
    assert torch.backends.mha.get_fastpath_enabled()  # left as it was
    L, E, F_, depth = 17, 32, 128, 3  # 16 patches + the class token
    per_layer = 2 * (3 * L * E * E + L * E * E + 2 * L * E * F_) + 4 * L * L * E
    patch = 2 * 16 * E * 16
    assert count_flops(model, x) == depth * per_layer + patch + 2 * E * 10


# ------------------------------------------------------------------------------------------ intake

def test_a_tuple_forward_is_adapted_in_place_and_keeps_its_paths():
    m = U.residual_mlp().eval()
    x = _example("residual_mlp")
    assert isinstance(m(x), tuple)
    intake(m, m(x))
    assert is_adapted(m) and isinstance(m(x), torch.Tensor) and m(x).shape == (2, 10)
    assert m.get_submodule("blocks.0.1") is m.blocks[0][1]  # the user's module paths
    c = copy.deepcopy(m)
    assert isinstance(c(x), torch.Tensor)
    with torch.no_grad():
        c.out.bias += 1  # the copy's forward runs the copy, not the original
    assert not torch.allclose(c(x), m(x))
    assert set(m.state_dict()) == set(U.residual_mlp().state_dict())


def test_a_tensor_forward_is_left_alone():
    m = U.dw_cnn().eval()
    x = _example("dw_cnn")
    assert intake(m, m(x)) is m and not is_adapted(m) and "forward" not in m.__dict__


def test_hf_classifier_by_directory(tmp_path):
    pytest.importorskip("transformers")
    from compressor.models import build_model

    U.hf_resnet().save_pretrained(tmp_path / "resnet")
    m = build_model(str(tmp_path / "resnet"), {})
    assert type(m).__name__ == "ResNetForImageClassification" and is_adapted(m)
    out = m(_example("hf_resnet"))
    assert isinstance(out, torch.Tensor) and out.shape == (2, 10)
    ref = U.hf_resnet()
    assert torch.allclose(out, ref(_example("hf_resnet")).logits, atol=1e-6)  # the saved weights, loaded
    student = build_model("hf-classifier", {"path": str(tmp_path / "resnet"), "depths": [1, 1]})
    assert is_adapted(student)


# ------------------------------------------------------------------------------------------ export

@pytest.mark.parametrize("name", ["vit", "hf_vit", "hf_bert"])
def test_attention_models_export_with_parity(name, tmp_path):
    from compressor.tasks import as_tuple, onnx_io
    from exporters.onnx import export_onnx, parity

    model, x = _model(name)
    export_onnx(model, as_tuple(x), tmp_path / "m.onnx", **onnx_io(x, "logits"))
    assert parity(tmp_path / "m.onnx", model, x)["ok"]
    assert torch.backends.mha.get_fastpath_enabled()


def test_an_unexportable_operator_is_named_with_its_module(tmp_path):
    from exporters.artifact import ExportError
    from exporters.onnx import export_onnx

    sys.path.insert(0, str(Path(__file__).parent / "bad_inputs"))
    import user_bad

    with pytest.raises(ExportError, match=r"operator aten::histc runs in module 2 \(_Histogram\)"):
        export_onnx(user_bad.unexportable().eval(), (torch.randn(2, 1, 16, 16),), tmp_path / "m.onnx")


# ------------------------------------------------------------------------------------------ pruning

@pytest.mark.parametrize("importance", ["output-loss", "magnitude"])
@pytest.mark.parametrize("name", ALL)
def test_prune_channels_reaches_the_budget_and_rebuilds_from_its_plan(name, importance):
    from compressor.structural import apply_plan, prune_channels

    model, _ = _model(name)
    batches = [_example(name, 32)]
    before = count_flops(model, batches[0])
    pruned, plan, info = prune_channels(model, batches, 0.5, importance=importance, multiple=4, log=lambda s: None)
    after = count_flops(pruned, batches[0])
    assert after <= 0.52 * before and info["flops_after"] == after
    y = _call(pruned.eval(), batches[0])
    assert y.shape == _call(model, batches[0]).shape  # the classes stay
    skeleton = getattr(U, name)().eval()
    intake(skeleton, _call(skeleton, batches[0]))
    apply_plan(skeleton, plan).load_state_dict(pruned.state_dict())
    assert torch.allclose(_call(skeleton.eval(), batches[0]), y, atol=1e-5)


@pytest.mark.parametrize("name, count, width", [("hf_bert", "num_attention_heads", "all_head_size"),
                                                 ("hf_distilbert", "n_heads", "dim")])
def test_hf_attention_loses_whole_heads(name, count, width):
    """BERT's attention (query/key/value, num_attention_heads) and DistilBERT's (q_lin/k_lin/v_lin, n_heads,
    and a ``dim`` its forward reshapes by): whole heads go, the counts follow, the plan rebuilds it."""
    from compressor.structural import apply_plan, prune_channels

    model, _ = _model(name)
    x = _example(name, 32)
    pruned, plan, _ = prune_channels(model, [x], 0.5, multiple=None, log=lambda s: None)
    att = [m for m in pruned.modules() if hasattr(m, count) and hasattr(m, "attention_head_size")]
    assert att and all(1 <= getattr(a, count) <= 4 for a in att)
    assert any(getattr(a, count) < 4 for a in att)
    q = [a.query if hasattr(a, "query") else a.q_lin for a in att]
    assert all(qi.out_features == getattr(a, count) * a.attention_head_size == getattr(a, width) for a, qi in zip(att, q))
    skeleton = getattr(U, name)().eval()
    intake(skeleton, _call(skeleton, x))
    apply_plan(skeleton, plan).load_state_dict(pruned.state_dict())
    assert torch.allclose(_call(skeleton.eval(), x), _call(pruned.eval(), x), atol=1e-5)


def test_vit_loses_embedding_width_and_keeps_its_classes():
    """nn.MultiheadAttention's width is the residual stream's: it goes with the patch conv, class token,
    positions, every LayerNorm and the head's inputs (the FFN alone left 57% of a 1-layer ViT's FLOPs);
    heads stay, head_dim shrinks, and the plan rebuilds shapes the pruned weights load into."""
    from compressor.structural import apply_plan, prune_channels

    model = U.vit(dim=64, depth=1, heads=4, mlp=128).eval()
    x = _example("vit", 32)
    pruned, plan, info = prune_channels(model, [x], 0.75, log=lambda s: None)
    assert info["flops_after"] <= 0.25 * info["flops_before"]
    att = pruned.encoder.layers[0].self_attn
    assert att.embed_dim < 64 and att.num_heads == 4 and att.head_dim * att.num_heads == att.embed_dim
    assert pruned.patch.out_channels == pruned.cls.shape[-1] == pruned.pos.shape[-1] == att.embed_dim
    assert pruned.head.in_features == att.embed_dim and pruned.head.out_features == 10
    y = pruned.eval()(x)  # the fused fast path reads the attributes too
    assert y.shape == (32, 10)
    skeleton = apply_plan(U.vit(dim=64, depth=1, heads=4, mlp=128).eval(), plan)
    skeleton.load_state_dict(pruned.state_dict())
    sa = skeleton.encoder.layers[0].self_attn
    assert (sa.embed_dim, sa.num_heads, sa.head_dim) == (att.embed_dim, att.num_heads, att.head_dim)
    assert torch.allclose(skeleton(x), y, atol=1e-5)


def test_layer_pruning_finds_blocks_whose_residual_is_added_in_forward():
    from compressor.prune import find_units

    model, x = _model("residual_mlp")
    assert [u.path for u in find_units(model, x)] == ["blocks.0", "blocks.1", "blocks.2", "blocks.3"]
    assert [u.path for u in find_units(model, x, ignore=["blocks.1"])] == ["blocks.0", "blocks.2", "blocks.3"]


# ------------------------------------------------------------------------------------------ whole runs

def _recipe(tiny_recipe, name, prune):
    r = tiny_recipe
    r["name"] = name.replace("_", "-")
    r["teacher"] = {"model": f"user_models:{name}", "train": {"epochs": 2, "lr": 0.003}}
    r.pop("student")
    r["prune"] = prune
    r["distill"] = {"epochs": 1, "lr": 0.003}
    r["targets"] = []
    if name == "hf_bert":
        r["data"] = {"dataset": "user_models:token_data", "batch_size": 64}
    return r


@pytest.mark.slow
@pytest.mark.parametrize("name", ALL)
def test_prune_channels_runs_end_to_end_to_a_verified_bundle(name, tiny_recipe, tmp_path):
    import compressor
    from compressor.prune import rebuild

    _needs(name)
    bundle = compressor.run(_recipe(tiny_recipe, name, {"channels": {"remove": 0.5}}), tmp_path / "b",
                            log=lambda s: None)
    man = compressor.verify(bundle)
    analyze = next(s for s in man["stages"] if s["name"] == "analyze")["metrics"]
    prune = next(s for s in man["stages"] if s["name"] == "prune")["metrics"]
    assert analyze["teacher"]["flops"] > 0
    assert prune["flops"] <= 0.52 * analyze["teacher"]["flops"]
    export = next(s for s in man["stages"] if s["name"] == "export")["metrics"]
    assert export["student"]["parity_max_abs"] < 1e-3
    assert man["quality"]["student"]["onnx_accuracy"] == pytest.approx(man["quality"]["student"]["accuracy"], abs=0.01)
    if name.startswith("hf_"):  # Optimum's exporter where it takes the model and the data gives its inputs
        import importlib.util

        art = next(a for a in man["artifacts"] if a["role"] == "student" and a["format"] == "onnx")
        optimum = importlib.util.find_spec("optimum.exporters") is not None and name != "hf_bert"  # BERT: token_type_ids
        assert art["extra"]["exporter"] == ("optimum" if optimum else "torchscript")
        assert [i["name"] for i in art["inputs"]] == (["pixel_values"] if optimum else
                                                       ["input_ids", "attention_mask"] if name == "hf_bert" else ["input"])
    # The student rebuilds from the manifest's genome and the shipped weights.
    student = rebuild(man["student"])
    student.load_state_dict(torch.load(bundle / "model" / "student.pt", weights_only=True))
    assert sum(p.numel() for p in student.parameters()) == prune["params"]


@pytest.mark.slow
def test_resume_after_channel_pruning_restores_the_pruned_teacher(tiny_recipe, tmp_path, monkeypatch):
    import compressor
    from compressor.stages import distill

    recipe = _recipe(tiny_recipe, "residual_mlp", {"channels": {"remove": 0.5}})

    def dies(ctx):
        raise KeyboardInterrupt

    with monkeypatch.context() as m:
        m.setattr(distill, "run", dies)
        with pytest.raises(KeyboardInterrupt):
            compressor.run(copy.deepcopy(recipe), tmp_path / "b", log=lambda s: None)
    assert (tmp_path / "b.partial" / "stages" / "prune.json").is_file()
    lines = []
    bundle = compressor.run(recipe, tmp_path / "b", resume=True, log=lines.append)
    assert any(line.startswith("[prune] done earlier") for line in lines)
    man = compressor.verify(bundle)
    prune = next(s for s in man["stages"] if s["name"] == "prune")["metrics"]
    assert man["quality"]["student"]["accuracy"] > 0.5 and prune["params"] < 175_018


@pytest.mark.slow
def test_layer_pruning_of_a_residual_mlp_runs_end_to_end(tiny_recipe, tmp_path):
    import compressor

    bundle = compressor.run(_recipe(tiny_recipe, "residual_mlp", {"by": "flops", "remove": 0.25}), tmp_path / "b",
                            log=lambda s: None)
    man = compressor.verify(bundle)
    assert len(man["student"]["removed"]) >= 1 and all(p.startswith("blocks.") for p in man["student"]["removed"])


def _import_or_skip(name):
    try:
        return __import__(name)
    except Exception as e:  # the registry's torchvision is a CUDA build: it fails to load with the CPU torch
        pytest.skip(f"{name} does not load here ({type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''})")


@pytest.mark.parametrize("lib", ["torchvision", "timm"])
def test_torchvision_and_timm_models_when_installed(lib):
    from compressor.structural import prune_channels

    mod = _import_or_skip(lib)
    if lib == "torchvision":
        model = mod.models.resnet18(num_classes=10).eval()
    else:
        model = mod.create_model("resnet18", pretrained=False, num_classes=10).eval()
    x = torch.randn(4, 3, 32, 32)
    before = count_flops(model, x)
    assert before == independent_flops(model, x)
    pruned, _, _ = prune_channels(model, [x], 0.5, log=lambda s: None)
    assert count_flops(pruned, x) <= 0.52 * before and pruned(x).shape == (4, 10)
