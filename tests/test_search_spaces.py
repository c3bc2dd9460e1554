"""Search spaces: derived from the teacher, genomes are plain data, students rebuild from them."""
import json
import random
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from compressor.errors import UserError
from compressor.models import MLP, ResNet
from compressor.search.spaces import Space, detect, encoder_classifier, from_spec, genome_key


def spec(**kw):
    return SimpleNamespace(**{"family": None, "builder": None, "space": {}, **kw})


def test_cnn_space_from_resnet_teacher_builds_every_sample():
    teacher = ResNet((32, 64, 128), (2, 2, 2), in_channels=1, num_classes=10)
    sp = detect(teacher)
    assert sp.family == "cnn" and sp.builder == "resnet"
    assert sp.genes["depth_1"] == [1, 2] and max(sp.genes["width_2"]) == 128 and min(sp.genes["width_0"]) == 4
    rng = random.Random(0)
    x = torch.randn(2, 1, 16, 16)
    for _ in range(5):
        g = sp.sample(rng)
        assert json.loads(json.dumps(g)) == g  # plain data
        m = sp.build(g, {"in_channels": 1, "num_classes": 10})
        assert m(x).shape == (2, 10)
        assert [b[0].conv1.out_channels for b in m.stages] == sp.config(g)["widths"]
    assert genome_key(g) == genome_key(dict(reversed(list(g.items()))))


def test_mlp_and_transformer_spaces():
    sp = detect(MLP((256, 128), in_features=64))
    assert sp.family == "mlp"
    m = sp.build({"layers": 1, "width_0": 64, "width_1": 8}, {"in_features": 64, "num_classes": 10})
    assert m(torch.randn(3, 64)).shape == (3, 10)
    t = encoder_classifier(layers=2, hidden=32, heads=4, ffn=64, vocab=2000)
    sp = detect(t)
    assert sp.family == "transformer" and max(sp.genes["layers"]) == 2 and max(sp.genes["vocab"]) == 2000
    s = sp.build({"layers": 1, "hidden": 16, "heads": 2, "ffn": 32, "vocab": 1000}, {"num_classes": 2})
    assert s(torch.randint(0, 5000, (2, 12))).shape == (2, 2)


def test_unknown_family_needs_a_space():
    teacher = nn.Sequential(nn.Flatten(), nn.Linear(64, 10))
    with pytest.raises(UserError, match="family is unknown"):
        from_spec(spec(), teacher)
    sp = from_spec(spec(family="mlp", space={"layers": [1], "width_0": [16, 32]}), teacher)
    assert sp.builder == "mlp" and sp.size == 2


def test_recipe_genes_override_and_empty_space_errors():
    teacher = ResNet((8, 16), (1, 1), in_channels=1)
    sp = from_spec(spec(space={"kernel": [3]}), teacher)
    assert sp.genes["kernel"] == [3] and "width_1" in sp.genes
    with pytest.raises(UserError, match="empty"):
        from_spec(spec(space={"kernel": []}), teacher)
    with pytest.raises(UserError, match="empty"):
        Space("cnn", "resnet", {})
