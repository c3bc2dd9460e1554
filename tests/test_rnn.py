"""Recurrent layers (nn.LSTM, nn.GRU, nn.RNN) under structural pruning and the FLOP count: a keyword-spotting or
sensor model lost no channel (torch-pruning's LSTM rule cut the wrong axes, GRU and RNN had none and their
weights were cut as loose parameters), and an LSTM's FLOPs were not counted on the CPU."""
import copy
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from compressor.flops import count_flops, flop_counts
from compressor.structural import prune_channels
from compressor.structural.plan import apply_plan
from compressor.structural.rnn import pruners

sys.path.insert(0, str(Path(__file__).parent))
import user_models as U  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore")


def _zeroed(layer: nn.RNNBase, gone: list[int]) -> nn.RNNBase:
    """``layer`` with the units ``gone`` silenced: their rows in every gate of every layer and direction zeroed,
    which keeps such a unit's state at zero from a zero start (LSTM, GRU and tanh/ReLU RNN alike)."""
    z = copy.deepcopy(layer)
    h, gates = z.hidden_size, {"LSTM": 4, "GRU": 3}.get(z.mode, 1)
    rows = [j + g * h for g in range(gates) for j in gone]
    with torch.no_grad():
        for name, p in z.named_parameters():
            p[rows] = 0
    return z


@pytest.mark.parametrize("cls", [nn.LSTM, nn.GRU, nn.RNN])
@pytest.mark.parametrize("bidirectional", [False, True])
def test_cutting_a_recurrent_layers_units_equals_silencing_them(cls, bidirectional):
    torch.manual_seed(0)
    layer = cls(12, 10, num_layers=2, batch_first=True, bidirectional=bidirectional).eval()
    x = torch.randn(3, 7, 12)
    gone = [1, 4, 5]
    dirs = 2 if bidirectional else 1
    idxs = [j + d * 10 for d in range(dirs) for j in gone]
    cut = pruners()[cls].prune_out_channels(copy.deepcopy(layer), idxs)
    assert cut.hidden_size == 7 and pruners()[cls].get_out_channels(cut) == 7 * dirs
    kept = [j for j in range(10 * dirs) if j not in idxs]
    torch.testing.assert_close(cut(x)[0], _zeroed(layer, gone)(x)[0][..., kept])


def test_a_bidirectional_layer_loses_the_same_units_in_both_directions():
    layer = nn.GRU(6, 8, bidirectional=True)
    with pytest.raises(ValueError, match="same units in both directions"):
        pruners()[nn.GRU].prune_out_channels(layer, [1, 8 + 2])
    assert pruners()[nn.GRU].get_out_channel_groups(layer) == 2


@pytest.mark.parametrize("name", ["lstm", "bilstm", "conv_gru"])
def test_prune_channels_cuts_recurrent_models(name):
    """Each model loses at least 40% of its FLOPs, its recurrent layer narrower; the plan's skeleton (the
    recurrent layer's flat weight list pointed at its new tensors) takes the pruned weights and gives the same
    outputs."""
    torch.manual_seed(0)
    model, x = getattr(U, name)().eval(), torch.randn(64, 1, 16, 16)
    pruned, plan, info = prune_channels(model, [x], 0.5, log=lambda s: None)
    assert info["flops_after"] <= 0.6 * info["flops_before"]
    rnn = next(m for m in pruned.modules() if isinstance(m, nn.RNNBase))
    assert rnn.hidden_size < next(m for m in model.modules() if isinstance(m, nn.RNNBase)).hidden_size
    skeleton = apply_plan(copy.deepcopy(model), plan)
    skeleton.load_state_dict(pruned.state_dict())
    assert torch.equal(skeleton.eval()(x), pruned(x))


def test_an_lstm_is_counted_as_the_matmuls_it_runs():
    """On the CPU nn.LSTM is one oneDNN kernel per layer and direction, which torch's counter has no formula for:
    it counted the classifier alone (1,280 FLOPs). Its count is now what the step-by-step path counts."""
    model, x = U.bilstm().eval(), torch.randn(2, 1, 16, 16)
    ours = count_flops(model, x)
    with torch.backends.mkldnn.flags(enabled=False):  # the same LSTM in plain operators
        plain, _ = flop_counts(model, x)
    assert ours == plain > 100 * 2 * 128 * 10


@pytest.mark.slow
def test_a_keyword_spotter_is_pruned_distilled_and_quantized(tiny_recipe, tmp_path):
    """A Conv1d + GRU model, end to end: half its FLOPs cut by channels (its GRU's hidden units among them),
    distilled, quantized by ONNX Runtime (the GRU stays float), verified."""
    import compressor

    tiny_recipe.update(teacher={"model": "user_models:conv_gru", "train": {"epochs": 6, "lr": 0.01}},
                       prune={"channels": {"remove": 0.5}}, distill={"epochs": 3, "lr": 0.005},
                       quantize={"mode": "ptq-ort"}, targets=[])
    tiny_recipe.pop("student")
    man = compressor.verify(compressor.run(tiny_recipe, tmp_path / "b", log=lambda s: None))
    stage = {s["name"]: s.get("metrics") or {} for s in man["stages"]}
    assert stage["prune"]["flops"] <= 0.55 * stage["analyze"]["teacher"]["flops"]
    assert man["quality"]["student_int8"]["onnx_accuracy"] > 0.6


def test_pruning_leaves_nothing_in_torch_prunings_shared_defaults():
    """MetaPruner's in/out_channel_groups default to one dict shared by every call, which it fills with the
    modules it groups (a bidirectional layer, attention heads): two cuts of this model left 48 modules of
    discarded copies alive there."""
    import inspect

    import torch_pruning as tp

    model, x = U.bilstm().eval(), torch.randn(32, 1, 16, 16)
    prune_channels(model, [x], 0.5, log=lambda s: None)
    params = inspect.signature(tp.pruner.MetaPruner.__init__).parameters
    assert not params["out_channel_groups"].default and not params["in_channel_groups"].default
