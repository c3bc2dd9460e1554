"""The teacher's outputs computed once (compressor.distill.cache): the same training as running the teacher on
every batch, a cache file reused, and the teacher still run where the data or a loss needs it."""
import copy

import pytest
import torch
from torch.utils.data import Dataset, TensorDataset

from compressor.data import collate, load_data
from compressor.distill import cache
from compressor.distill.train import fit
from compressor.models import ResNet
from compressor.recipe import load_recipe

pytestmark = pytest.mark.filterwarnings("ignore")


class Jitter(Dataset):
    """Random augmentation: each read of a sample differs."""

    def __init__(self, n=8):
        self.x = torch.randn(n, 3)

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return self.x[i] + 0.1 * torch.randn(3), 0


def test_deterministic_tells_augmented_data_apart():
    assert cache.deterministic(TensorDataset(torch.randn(8, 3), torch.zeros(8)))
    assert not cache.deterministic(Jitter())


def test_outputs_are_computed_once_and_read_back(tmp_path):
    teacher = torch.nn.Linear(3, 4)
    ds = TensorDataset(torch.randn(10, 3), torch.zeros(10, dtype=torch.long))
    with torch.no_grad():
        expected = teacher(ds.tensors[0])
    calls = []
    teacher.register_forward_hook(lambda m, i, o: calls.append(len(i[0])))
    first = cache.teacher_outputs(teacher, ds, tmp_path, collate, batch_size=4, log=lambda s: None)
    assert sum(calls) == 10 and first.shape == (10, 4) and torch.allclose(first, expected)
    again = cache.teacher_outputs(teacher, ds, tmp_path, collate, log=lambda s: None)
    assert sum(calls) == 10 and torch.equal(first, again)  # read from the file, the teacher not run
    with torch.no_grad():
        teacher.weight.add_(1.0)  # another teacher: another file
    cache.teacher_outputs(teacher, ds, tmp_path, collate, log=lambda s: None)
    assert sum(calls) == 20 and len(list(tmp_path.glob("teacher-outputs-*.npy"))) == 2


def test_outputs_under_bf16_are_what_the_trainer_would_compute_and_kept_apart(tmp_path):
    torch.manual_seed(0)
    teacher = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 4))
    ds = TensorDataset(torch.randn(10, 16), torch.zeros(10, dtype=torch.long))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        live = teacher(ds.tensors[0]).float()  # a bf16-mixed trainer runs the teacher so on every batch
    fp32 = cache.teacher_outputs(teacher, ds, tmp_path, collate, log=lambda s: None)
    logs = []
    bf16 = cache.teacher_outputs(teacher, ds, tmp_path, collate, log=logs.append, precision="bf16-mixed")
    assert torch.equal(bf16, live) and not torch.equal(bf16, fp32)  # bf16 rounding, not the fp32 file
    assert "under bf16 autocast" in logs[0]
    assert sorted(f.name.endswith("-bf16.npy") for f in tmp_path.glob("teacher-outputs-*.npy")) == [False, True]


def _setup(tiny_recipe, **distill):
    # fp32: bf16 results depend on the batch (the cache runs 256 samples at a time, the trainer 128), so only
    # fp32 training can be compared weight for weight
    r = load_recipe({**tiny_recipe, "distill": {"epochs": 2, "lr": 0.01, "trainer": {"precision": "32-true"}, **distill}})
    data = load_data(r.data, 0)
    torch.manual_seed(0)
    teacher = ResNet(widths=(8, 16), depths=(1, 1), in_channels=1).eval()
    torch.manual_seed(1)
    student = ResNet(widths=(4, 8), depths=(1, 1), in_channels=1)
    return r, data, teacher, student


def test_cached_teacher_trains_the_same_student(tiny_recipe, tmp_path):
    r, data, teacher, student = _setup(tiny_recipe)
    logs = []
    a, b = copy.deepcopy(student), copy.deepcopy(student)
    ra = fit(a, teacher, data, r.distill, r.data, tmp_path / "a" / "ckpt", log=logs.append)
    rb = fit(b, teacher, data, r.distill.model_copy(update={"cache_teacher": False}), r.data, tmp_path / "b" / "ckpt",
             log=logs.append)
    assert ra["teacher_outputs"] == "cached" and rb["teacher_outputs"] == "every batch"
    assert any("computed once and cached" in line for line in logs)
    assert any("runs on every batch (distill.cache_teacher is false)" in line for line in logs)
    for (k, va), vb in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.allclose(va.float(), vb.float(), atol=1e-5), k


def test_hidden_features_are_cached_and_train_the_same_student(tiny_recipe, tmp_path):
    r, data, teacher, student = _setup(tiny_recipe, epochs=1, losses=[
        {"name": "kd", "weight": 1.0},
        {"name": "feature", "weight": 1.0, "pairs": [["stages.1", "stages.1"]]}])
    logs = []
    calls = []
    teacher.register_forward_hook(lambda m, i, o: calls.append(len(i[0])))
    a, b = copy.deepcopy(student), copy.deepcopy(student)
    out = fit(a, teacher, data, r.distill, r.data, tmp_path / "a" / "ckpt", log=logs.append)
    assert out["teacher_outputs"] == "cached"
    assert any("features at 1 module(s) and outputs on" in line and "float32" in line for line in logs)
    train_calls = sum(calls) - len(data.val) * r.distill.epochs  # validation still runs the teacher
    assert train_calls <= len(data.train) + 4  # one pass for the features and the outputs, and the probes
    fit(b, teacher, data, r.distill.model_copy(update={"cache_teacher": False}), r.data, tmp_path / "b" / "ckpt",
        log=logs.append)
    for (k, va), vb in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.allclose(va.float(), vb.float(), atol=1e-5), k


class Tokens(torch.nn.Module):
    """A token model whose hooked layers give N x L x D and N x L x L (two token axes)."""

    def __init__(self):
        super().__init__()
        self.emb = torch.nn.Embedding(20, 4)
        self.proj = torch.nn.Linear(4, 4)
        self.rel = torch.nn.Identity()

    def forward(self, input_ids, attention_mask):
        h = self.proj(self.emb(input_ids)) * attention_mask[..., None]
        return self.rel(h @ h.transpose(1, 2)).sum((1, 2))[:, None].expand(-1, 3)


def test_token_features_are_stored_at_full_length_and_cut_to_each_batch(tmp_path):
    torch.manual_seed(0)
    n, length = 6, 8
    ids = torch.randint(1, 20, (n, length))
    mask = torch.zeros(n, length, dtype=torch.long)
    for i, k in enumerate((3, 8, 2, 5, 5, 6)):  # two of length 5: a batch of consecutive samples
        mask[i, :k] = 1

    class Data(Dataset):
        def __len__(self):
            return n

        def __getitem__(self, i):
            return {"input_ids": ids[i], "attention_mask": mask[i]}, 0

    model = Tokens().eval()
    feats, axes = cache.teacher_features(model, Data(), tmp_path, collate, ["proj", "rel"], batch_size=2,
                                         log=lambda s: None)
    assert axes == {"proj": (1,), "rel": (1, 2)}
    assert feats["proj"].shape == (n, length, 4) and feats["rel"].shape == (n, length, length)
    x, _ = collate([Data()[i] for i in (0, 2)])  # a batch trimmed to 3 tokens
    from compressor.distill.hooks import capture

    with capture(model, ["proj", "rel"]) as live, torch.no_grad():
        model(**x)
    rows = [0, 2]
    for p in ("proj", "rel"):
        got = cache.cut_features(torch.from_numpy(feats[p][rows]), axes[p], x["attention_mask"].shape[1])
        assert torch.allclose(got, live[p], atol=1e-6), p
    # The cache is filled longest first (batches of like length); each row is still its own sample's.
    assert [i.tolist() for i, _ in cache.in_length_order(Data(), 2, collate)] == [[1, 5], [3, 4], [0, 2]]
    assert (tmp_path / next(p.name for p in tmp_path.glob("teacher-outputs-*.npy"))).is_file()  # the same pass
    outs = cache.teacher_outputs(model, Data(), tmp_path / "own", collate, batch_size=2, log=lambda s: None)
    assert torch.allclose(outs, cache.teacher_outputs(model, Data(), tmp_path, collate, log=lambda s: None), atol=1e-5)
    for i in range(n):
        x, _ = collate([Data()[i]])
        with capture(model, ["proj"]) as live, torch.no_grad():
            y = model(**x)
        assert torch.allclose(outs[i], y[0], atol=1e-5)
        got = cache.cut_features(torch.from_numpy(feats["proj"][[i]]), axes["proj"], x["attention_mask"].shape[1])
        assert torch.allclose(got, live["proj"], atol=1e-6)


def test_precision_auto_follows_the_cpu_flags(monkeypatch):
    import devices.bench_onnxruntime as bench
    from compressor.distill.train import precision
    from compressor.recipe import TrainerSpec

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(bench, "cpu_flags", lambda: {"avx2", "amx_bf16"})
    assert precision(TrainerSpec(precision="auto")) == ("bf16-mixed", "this CPU has amx_bf16")
    monkeypatch.setattr(bench, "cpu_flags", lambda: {"avx2", "avx512f"})
    assert precision(TrainerSpec(precision="auto"))[0] == "32-true"
    assert precision(TrainerSpec(precision="16-mixed")) == ("16-mixed", "set in the recipe")


def test_the_cache_follows_a_bf16_trainer_only_on_its_own_device(tiny_recipe, tmp_path, monkeypatch):
    """A bf16 trainer on the CPU fills the cache under bf16 autocast, as it would run the teacher per batch; a
    trainer on another device (a GPU: the meta device stands in) leaves the CPU-side cache in fp32."""
    import pytorch_lightning as pl

    from compressor.distill import train as train_mod

    r, data, teacher, student = _setup(tiny_recipe)
    spec = r.distill.model_copy(update={"trainer": r.distill.trainer.model_copy(update={"precision": "bf16-mixed"})})
    seen = []

    class Stop(Exception):
        pass

    def spy(module, teacher, data, spec, directory, log, precision="32-true"):
        seen.append(precision)
        raise Stop

    monkeypatch.setattr(train_mod, "_cache_teacher", spy)
    with pytest.raises(Stop):
        fit(copy.deepcopy(student), teacher, data, spec, r.data, tmp_path / "a" / "ckpt", log=lambda s: None)
    monkeypatch.setattr(pl.strategies.SingleDeviceStrategy, "root_device", property(lambda self: torch.device("meta")))
    with pytest.raises(Stop):
        fit(copy.deepcopy(student), teacher, data, spec, r.data, tmp_path / "b" / "ckpt", log=lambda s: None)
    assert seen == ["bf16-mixed", "32-true"]


def test_frozen_weights_stay_as_they_were_and_train_again_afterwards(tiny_recipe, tmp_path):
    """distill.freeze: the weights under those paths are not trained (nor in the optimizer); the rest are, and
    every weight is trainable again after fit. A path the student lacks, or one holding every weight, is refused."""
    from compressor.errors import UserError

    r, data, teacher, student = _setup(tiny_recipe, epochs=1, freeze=["stages.0", "head"])
    before = copy.deepcopy(student.state_dict())
    logs = []
    fit(student, teacher, data, r.distill, r.data, tmp_path / "ckpt", log=logs.append)
    after = student.state_dict()
    frozen = [k for k in before if k.startswith(("stages.0.", "head.")) and before[k].is_floating_point()
              and "running" not in k]  # batch-norm statistics are buffers, not weights: they still follow the data
    assert frozen and all(torch.equal(before[k], after[k]) for k in frozen)
    assert not torch.equal(before["stages.1.0.conv1.weight"], after["stages.1.0.conv1.weight"])
    assert all(p.requires_grad for p in student.parameters())
    assert any("weights frozen (stages.0, head)" in line for line in logs)
    for paths, needle in ((["stages.9"], "no module 'stages.9'"), ([""], "nothing would train")):
        with pytest.raises(UserError, match=needle):
            fit(student, teacher, data, r.distill.model_copy(update={"freeze": paths}), r.data, tmp_path / "x",
                log=lambda s: None)


def test_a_student_that_distillation_makes_worse_ships_as_it_came_with_a_warning(tiny_recipe, tmp_path):
    """The distill stage keeps its best epoch, but a rate too high to fine-tune a cut teacher can leave every epoch
    below the student it was given (hf_mobilenet's cut: 0.872, then 0.728 after 3 epochs at 3e-3); the student is
    now scored before training, as if epoch 0, and where it beats every epoch it ships as it came, with a warning.
    A student that training improves says nothing."""
    r = load_recipe({**tiny_recipe, "distill": {"epochs": 1, "lr": 5.0, "trainer": {"precision": "32-true"}}})
    data = load_data(r.data, 0)
    x, y = data.tensors("train")
    torch.manual_seed(0)
    teacher = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(x[0].numel(), 10))
    opt = torch.optim.LBFGS(teacher.parameters(), max_iter=100)

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(teacher(x), y)
        loss.backward()
        return loss

    opt.step(closure)
    teacher.eval()
    logs = []
    student = copy.deepcopy(teacher)
    out = fit(student, teacher, data, r.distill, r.data, tmp_path / "a" / "ckpt", log=logs.append, as_it_came=True)
    assert out["start_val_acc"] > 0.85 > out["best_val_acc"] and out["kept"] == "as it came"
    assert any(f"{out['start_val_acc']:.4f} before training), so it ships as it came: distill.lr 5" in s for s in logs)
    for a, b in zip(student.state_dict().values(), teacher.state_dict().values()):
        assert torch.equal(a, b)  # the student as it came: every epoch scored lower
    logs = []
    fresh = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(x[0].numel(), 10))
    out = fit(fresh, teacher, data, r.distill.model_copy(update={"lr": 0.01}), r.data, tmp_path / "b" / "ckpt",
              log=logs.append, as_it_came=True)
    assert out["best_val_acc"] > out["start_val_acc"] and out["kept"] == "best epoch"
    assert not any("warning" in s for s in logs)
    # a student from random weights (as_it_came false, the default) is not scored before training: one that scores by
    # chance above a bad epoch is no student to ship
    out = fit(copy.deepcopy(teacher).requires_grad_(True), teacher, data, r.distill, r.data, tmp_path / "c" / "ckpt",
              log=lambda s: None)
    assert "start_val_acc" not in out and "kept" not in out
