"""Recurrent layers (nn.LSTM, nn.GRU, nn.RNN) for torch-pruning's dependency graph.

torch-pruning's own LSTM rule cuts a single layer's tensors along the wrong axes (the input weights' columns
by the gates' rows), asserts one layer, and GRU and RNN have no rule at all, so a keyword-spotting or sensor
model with a recurrent layer could not lose a channel. Here a recurrent layer's hidden units are its output
channels: cutting unit j removes its rows in every gate of every layer (input and recurrent weights, both
biases), its column in each recurrent weight, and its column in the next layer's input weights. Its input
channels are the first layer's input weights' columns.

A bidirectional layer writes [forward | reverse] units, which must stay equal in number: it has two channel
groups, so torch-pruning cuts the same units from both directions. An LSTM with ``proj_size`` writes its
projections: its inputs are cut, its outputs stay (``whole``).

The graph is traced with each recurrent layer as one autograd node from its input to its outputs
(``one_node``): a GRU or RNN on the CPU runs step by step (unbind the time axis, a matmul per step, stack),
which torch-pruning read as a split of the channels by time step."""
from __future__ import annotations

import functools
from contextlib import contextmanager

import torch
from torch import nn

from .structure import _tp


def _gates(layer: nn.RNNBase) -> int:
    return {"LSTM": 4, "GRU": 3}.get(layer.mode, 1)


def _suffixes(layer: nn.RNNBase) -> tuple[str, ...]:
    return ("", "_reverse") if layer.bidirectional else ("",)


def whole(model: nn.Module) -> list[nn.Module]:
    """The recurrent layers whose outputs are not cut (an LSTM with projections)."""
    return [m for m in model.modules() if isinstance(m, nn.RNNBase) and m.proj_size]


@functools.cache
def pruners() -> dict:
    """torch-pruning ``customized_pruners`` for nn.LSTM, nn.GRU and nn.RNN."""
    base = _tp().pruner.function.BasePruningFunc

    class RecurrentPruner(base):
        def _cut(self, layer: nn.RNNBase, name: str, idxs: torch.Tensor, dim: int) -> None:
            setattr(layer, name, self._prune_parameter_and_grad(getattr(layer, name), idxs.tolist(), dim))

        def prune_out_channels(self, layer: nn.RNNBase, idxs) -> nn.Module:
            if layer.proj_size:
                raise ValueError(f"the outputs of an {type(layer).__name__} with proj_size are not cut")
            h, dirs = layer.hidden_size, len(_suffixes(layer))
            gone = [{int(i) - d * h for i in idxs if d * h <= int(i) < (d + 1) * h} for d in range(dirs)]
            if any(g != gone[0] for g in gone):  # two channel groups: the same units of each direction
                raise ValueError(f"a bidirectional {type(layer).__name__} loses the same units in both directions")
            keep = torch.tensor(sorted(set(range(h)) - gone[0]), dtype=torch.long)
            rows = torch.cat([keep + g * h for g in range(_gates(layer))])
            below = torch.cat([keep + d * h for d in range(dirs)])  # the layer below's outputs: [forward | reverse]
            for k in range(layer.num_layers):
                for s in _suffixes(layer):
                    self._cut(layer, f"weight_ih_l{k}{s}", rows, 0)
                    if k:
                        self._cut(layer, f"weight_ih_l{k}{s}", below, 1)
                    self._cut(layer, f"weight_hh_l{k}{s}", rows, 0)
                    self._cut(layer, f"weight_hh_l{k}{s}", keep, 1)
                    if layer.bias:
                        self._cut(layer, f"bias_ih_l{k}{s}", rows, 0)
                        self._cut(layer, f"bias_hh_l{k}{s}", rows, 0)
            layer.hidden_size = len(keep)
            return layer

        def prune_in_channels(self, layer: nn.RNNBase, idxs) -> nn.Module:
            keep = torch.tensor(sorted(set(range(layer.input_size)) - {int(i) for i in idxs}), dtype=torch.long)
            for s in _suffixes(layer):
                self._cut(layer, f"weight_ih_l0{s}", keep, 1)
            layer.input_size = len(keep)
            return layer

        def get_out_channels(self, layer: nn.RNNBase) -> int:
            return (layer.proj_size or layer.hidden_size) * (2 if layer.bidirectional else 1)

        def get_in_channels(self, layer: nn.RNNBase) -> int:
            return layer.input_size

        def get_out_channel_groups(self, layer: nn.RNNBase) -> int:
            return len(_suffixes(layer))

    p = RecurrentPruner()
    return {nn.LSTM: p, nn.GRU: p, nn.RNN: p}


class _Node(torch.autograd.Function):
    """Outputs computed elsewhere, made to depend on ``x`` and the layer's ``weights`` (a node even where no
    input needs a gradient): one node in the autograd graph, only traced, never differentiated."""

    @staticmethod
    def forward(ctx, x, n, *rest):  # rest: the n weights, then the outputs
        ctx.inputs = 2 + len(rest)
        return tuple(o.clone() for o in rest[n:])

    @staticmethod
    def backward(ctx, *grads):
        return (None,) * ctx.inputs


@contextmanager
def one_node():
    """While the dependency graph is traced: every nn.LSTM, nn.GRU and nn.RNN call is one autograd node from
    its input to its outputs (their values unchanged)."""
    saved = {cls: cls.forward for cls in (nn.LSTM, nn.GRU, nn.RNN)}

    def patched(forward):
        def run(self, input, hx=None):
            if not isinstance(input, torch.Tensor):  # a PackedSequence: traced as it is
                return forward(self, input, hx)
            with torch.no_grad():
                out, h = forward(self, input, hx)
            weights = list(self.parameters())
            flat = _Node.apply(input, len(weights), *weights, out, *(h if isinstance(h, tuple) else (h,)))
            return flat[0], (tuple(flat[1:]) if isinstance(h, tuple) else flat[1])
        return run

    try:
        for cls, forward in saved.items():
            cls.forward = patched(forward)
        yield
    finally:
        for cls, forward in saved.items():
            cls.forward = forward
