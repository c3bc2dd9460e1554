import math

import pytest
import torch

from compressor.distill import KD, CE, build_loss


def test_kd_golden_value():
    s = torch.tensor([[1.0, 0.0], [0.0, 0.0]])
    t = torch.tensor([[0.0, 1.0], [0.0, 0.0]])
    T = 2.0
    # by hand: row 1: p_t = softmax([0, .5]), q_s = softmax([.5, 0]); row 2 identical -> KL 0
    pt = [1 / (1 + math.exp(0.5)), math.exp(0.5) / (1 + math.exp(0.5))]
    qs = pt[::-1]
    kl1 = sum(p * math.log(p / q) for p, q in zip(pt, qs))
    expected = (kl1 + 0.0) / 2 * T * T
    assert KD(temperature=T)(student=s, teacher=t).item() == pytest.approx(expected, rel=1e-6)
    assert KD()(student=t, teacher=t).item() == pytest.approx(0.0, abs=1e-7)


def test_ce_and_registry():
    s = torch.tensor([[2.0, 0.0]])
    assert CE()(student=s, target=torch.tensor([0])).item() == pytest.approx(math.log(1 + math.exp(-2)))
    with pytest.raises(ValueError, match="takes no parameter"):
        build_loss("kd", temp=3)


def test_distill_module_in_a_users_own_trainer(tmp_path):
    import pytorch_lightning as pl

    from compressor.distill import DistillModule

    torch.manual_seed(0)
    x = torch.randn(64, 8)
    y = (x[:, 0] > 0).long()
    teacher = torch.nn.Sequential(torch.nn.Linear(8, 2))
    with torch.no_grad():
        teacher[0].weight.zero_()
        teacher[0].weight[1, 0], teacher[0].weight[0, 0] = 5.0, -5.0
    student = torch.nn.Linear(8, 2)
    module = DistillModule(student, teacher, [(0.7, KD(temperature=2)), (0.3, CE())], lr=0.05, epochs=20)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=16)
    trainer = pl.Trainer(max_epochs=20, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, default_root_dir=tmp_path)
    trainer.fit(module, loader, loader)
    assert not teacher.training and all(not p.requires_grad for p in teacher.parameters())
    assert "teacher" not in "".join(module.state_dict())  # the teacher stays out of checkpoints
    assert ((student(x).argmax(-1) == y).float().mean()) > 0.9


def test_nan_loss_stops_training():
    from compressor.distill import DistillModule

    teacher = torch.nn.Linear(2, 2)
    module = DistillModule(torch.nn.Linear(2, 2), teacher, [(1.0, KD())])
    with pytest.raises(FloatingPointError, match="loss became nan"):
        module.training_step((torch.full((2, 2), float("nan")), torch.tensor([0, 1])), 0)


def test_adamw_is_fused_where_the_device_has_the_kernel():
    """schedule.adamw: torch's fused AdamW for CPU (or CUDA) weights, decided when it is built (torch itself
    checks only at the first step); any other device gets the per-tensor loop, the same update."""
    from compressor.schedule import adamw

    w = torch.nn.Parameter(torch.ones(3))
    opt = adamw([w], lr=0.1, weight_decay=0.0)
    assert opt.defaults["fused"] is True
    w.grad = torch.ones(3)
    opt.step()
    ref = torch.nn.Parameter(torch.ones(3))
    plain = torch.optim.AdamW([ref], lr=0.1, weight_decay=0.0)
    ref.grad = torch.ones(3)
    plain.step()
    assert torch.allclose(w, ref)
    assert not adamw([torch.nn.Parameter(torch.ones(3, device="meta"))], lr=0.1).defaults["fused"]
