"""Zero-cost proxies: golden values on tiny models, invariances, and that scoring leaves models as they were."""
import copy

import pytest
import torch
from torch import nn

from compressor.models import MLP, ResNet, count_flops, count_params
from compressor.search import PROXIES
from compressor.search.proxies import TeacherView, diswot, naswot, relation_distance, semantic_distance, synflow


@pytest.fixture
def batch():
    g = torch.Generator().manual_seed(0)
    return torch.randn(16, 1, 16, 16, generator=g), torch.randint(0, 10, (16,), generator=g)


def resnet(widths=(8, 16), depths=(1, 1), seed=0):
    torch.manual_seed(seed)
    return ResNet(widths, depths, in_channels=1, num_classes=10)


def test_registry_names():
    assert set(PROXIES) == {"diswot", "naswot", "synflow", "params", "flops"}


def test_semantic_distance_golden():
    # Channel form by hand: g_k g_k^T row-normalised, sum of squared differences / (K * C).
    g_t = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    g_s = torch.tensor([[1.0, 1.0], [0.0, 1.0]])
    n = lambda v: torch.nn.functional.normalize(torch.outer(v, v), dim=1)
    want = sum(((n(a) - n(b)) ** 2).sum() for a, b in zip(g_s, g_t)) / 4
    assert semantic_distance(g_s, g_t, "channel") == pytest.approx(float(want))
    # Gram form: G G^T (K x K) row-normalised / K^2; works for different channel counts.
    g_s3 = torch.tensor([[1.0, 0.0, 0.0], [0.0, 3.0, 0.0]])
    assert semantic_distance(g_s3, g_t, "gram") == pytest.approx(0.0, abs=1e-7)  # both Grams are diagonal
    assert semantic_distance(g_s3, g_t) == semantic_distance(g_s3, g_t, "gram")  # auto picks gram
    with pytest.raises(ValueError):
        semantic_distance(g_s3, g_t, "channel")


def test_relation_distance_golden():
    a = torch.eye(2)
    b = torch.nn.functional.normalize(torch.ones(2, 2), dim=1)
    assert relation_distance(a, b) == pytest.approx(float(((a - b) ** 2).sum() / 4))


def test_diswot_identical_student_scores_zero_and_teacher_untouched(batch):
    teacher = resnet().eval()
    before = copy.deepcopy(teacher.state_dict())
    view = TeacherView.of(teacher, batch)
    for k, v in teacher.state_dict().items():  # running stats and weights unchanged
        assert torch.equal(v, before[k]), k
    assert not teacher.training
    same = copy.deepcopy(teacher)
    assert diswot(same, batch, view, form="channel") == pytest.approx(0.0, abs=1e-6)
    other = resnet((4, 8), seed=1)
    s = diswot(other, batch, view)
    assert s < 0 and torch.isfinite(torch.tensor(s))
    assert diswot(other, batch, teacher) == pytest.approx(s, rel=1e-5)  # a module works as the teacher too


def test_naswot_matches_the_two_matmul_definition(batch):
    x, y = batch
    torch.manual_seed(0)
    model = MLP((32, 16), in_features=256, num_classes=10)
    codes = []
    hooks = [m.register_forward_hook(lambda m, i, o: codes.append((o > 0).flatten(1).double()))
             for m in model.modules() if isinstance(m, nn.ReLU)]
    model.train()
    with torch.no_grad():
        model(x)
    for h in hooks:
        h.remove()
    k = sum(c @ c.t() + (1 - c) @ (1 - c).t() for c in codes)
    assert naswot(model, batch) == pytest.approx(float(torch.linalg.slogdet(k)[1]), rel=1e-9)
    # Functional F.relu (ResNet's blocks) is seen too: more ReLUs than nn.ReLU modules.
    assert naswot(resnet(), batch) > 0


def test_synflow_golden_and_model_restored(batch):
    lin = nn.Linear(3, 1)
    with torch.no_grad():
        lin.weight.copy_(torch.tensor([[1.0, -2.0, 3.0]]))
        lin.bias.fill_(-0.5)
    # R = |w| . 1 + |b|, so sum |theta * dR/dtheta| = sum |w| + |b|.
    assert synflow(lin, (torch.zeros(2, 3), None)) == pytest.approx(6.5)
    assert lin.weight.dtype == torch.float32 and lin.weight[0, 1] == -2.0  # signs and dtype restored
    model = resnet()
    before = copy.deepcopy(model.state_dict())
    s = synflow(model, batch)
    assert s > 0
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert any(isinstance(m, nn.BatchNorm2d) for m in model.modules())


def test_params_and_flops(batch):
    m = resnet()
    assert PROXIES["params"](m, batch) == count_params(m)
    assert PROXIES["flops"](m, batch) == count_flops(m, batch[0])


def test_hook_flops_match_the_flop_counter(batch):
    from compressor.search.proxies import conv_linear_flops, cost

    for m in (resnet(), resnet((4, 12), (2, 1)), MLP((32, 16), in_features=256)):
        x = batch[0] if isinstance(m, ResNet) else batch[0].flatten(1)
        assert conv_linear_flops(m, x) == count_flops(m, x)
    # On the meta device: shapes only, the same numbers.
    assert cost(lambda: resnet(), batch[0]) == (count_params(resnet()), count_flops(resnet(), batch[0]))
