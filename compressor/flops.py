"""The one FLOP counter: analyze, prune, search, calibrate and the roofline ratio all call ``count_flops``.

torch.utils.flop_counter counts the aten operators a forward pass runs (a multiply-add is 2 FLOPs). Two
things hide arithmetic from it, and both are handled here:

- nn.TransformerEncoder / nn.MultiheadAttention in eval mode take a fused fast path
  (``aten::_transformer_encoder_layer_fwd``) that the counter does not see (it counted 14 kFLOPs of a
  22.6 MFLOPs ViT). The fast path is switched off while counting, so the plain operators run, as they do
  in the exported ONNX graph.
- On the CPU, scaled_dot_product_attention dispatches to ``_scaled_dot_product_flash_attention_for_cpu``,
  which has no formula in torch's table, so attention's two matmuls (Q K^T and A V) went uncounted;
  nn.MultiheadAttention and Hugging Face's sdpa attention both take it. A formula is added for it.
- nn.LSTM on the CPU runs one oneDNN kernel per layer and direction (``aten::mkldnn_rnn_layer``), which it
  does not count either (a 2-layer LSTM counted as its classifier alone); its matmuls are counted here. GRU
  and RNN run step by step in plain operators, which it counts.
"""
from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import nn

from exporters.onnx import plain_attention


# nn.MultiheadAttention / nn.TransformerEncoder without the fused eval fast path, restored after: counting,
# hooking, tracing and exporting all need the plain operators (one context, shared with the exporter).
no_fastpath = plain_attention


def _sdpa_cpu(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    from torch.utils.flop_counter import sdpa_flop_count

    return sdpa_flop_count(query_shape, key_shape, value_shape)


def _rnn_layer(input_shape, w_ih_shape, w_hh_shape, *args, out_shape=None, **kwargs) -> int:
    """One layer and direction of a recurrent layer over the whole sequence: its two matmuls at every step (the
    gates' elementwise work is not counted, as for any activation)."""
    steps = input_shape[0] * input_shape[1]  # time x batch, in either order
    return 2 * steps * (w_ih_shape[0] * w_ih_shape[1] + w_hh_shape[0] * w_hh_shape[1])


def _custom_mapping() -> dict:
    ops = torch.ops.aten
    mapping = {}
    for name in ("_scaled_dot_product_flash_attention_for_cpu", "_scaled_dot_product_fused_attention_overrideable"):
        op = getattr(ops, name, None)
        if op is not None:
            mapping[op] = _sdpa_cpu
    if (op := getattr(ops, "mkldnn_rnn_layer", None)) is not None:  # nn.LSTM on the CPU: one fused kernel
        mapping[op] = _rnn_layer
    return mapping


@contextmanager
def _counting(model: nn.Module, example, batch_one: bool = True):
    """A FlopCounterMode that has run ``model`` once on ``example`` (its first sample with ``batch_one``)
    in eval mode, without gradients, the fast path off and CPU attention counted."""
    from torch.utils.flop_counter import FlopCounterMode

    from .tasks import call, take

    x = take(example, 1) if batch_one else example
    was = model.training
    model.eval()  # as deployed: in training mode dropout sends attention down a path with more matmuls
    try:
        # The counter's module tracker hooks every module input that requires grad and asserts it has a
        # grad_fn; under no_grad a Parameter handed straight to a submodule (DeBERTa-v2 feeds its relative
        # position table to pos_key_proj) has none. Such a model is counted with autograd on (graph built, freed).
        for grad in (torch.no_grad, torch.enable_grad):
            try:
                with no_fastpath(), grad(), FlopCounterMode(display=False, custom_mapping=_custom_mapping()) as fc:
                    call(model, x)
                break
            except AssertionError as e:
                if grad is torch.enable_grad or "gradient function" not in str(e):
                    raise
    finally:
        model.train(was)
    yield fc


def flop_counts(model: nn.Module, example, *, batch_one: bool = True) -> tuple[int, dict]:
    """(total FLOPs, {aten op name: FLOPs}) of one forward pass in eval mode, without gradients.
    ``example`` is a tensor or a dict of tensors; with ``batch_one`` only its first sample runs."""
    with _counting(model, example, batch_one) as fc:
        per_op = {getattr(op, "__name__", str(op)): int(n) for op, n in fc.get_flop_counts().get("Global", {}).items()}
        return int(fc.get_total_flops()), per_op


def flops_by_module(model: nn.Module, example) -> dict[str, int]:
    """FLOPs of one sample per module path ("" the model itself; a module's count includes its children's)."""
    with _counting(model, example) as fc:
        counts = fc.get_flop_counts()
    out = {}
    for name, ops in counts.items():
        if name == "Global":
            continue
        # The counter names modules by their path under the root's class name ("ViT.encoder.layers.0").
        out[name.split(".", 1)[1] if "." in name else ""] = int(sum(ops.values()))
    return out


def count_flops(model: nn.Module, example) -> int:
    """Forward FLOPs of one sample (a multiply-add counts as 2). ``example`` is a tensor or a dict of
    tensors (token inputs: counted at the sequence length they have)."""
    return flop_counts(model, example)[0]
