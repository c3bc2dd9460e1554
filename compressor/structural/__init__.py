"""Structural (channel, neuron and head) pruning of any nn.Module, with torch-pruning's DepGraph.

DepGraph traces the model once and groups every parameter slice that must go together: a convolution's
output channels with the BatchNorm after it, the next layer's inputs, every layer a residual add ties
to them, a depthwise convolution's channels, a Transformer's FFN neurons, and, given the head layout,
whole attention heads. So nothing here knows a model family: the structure comes from the model.

1. Groups: every group DepGraph finds, except those that would change the classifier head's outputs
   (the classes), the input stem's with ``keep_stem`` (in most models the stem's outputs are the
   residual stream's width, so keeping it leaves only the blocks' inner widths), and those of the
   modules in ``ignore``. Without ``keep_stem`` the budget is met both ways, with the stem cut and kept,
   and the cut with the lower measured output loss is taken: the linearised score treats zeroing a stream
   channel as removing it, but LayerNorm renormalises over the channels left (a small ViT lost its
   stream's width for a loss of 69 against 59 with it kept, and distilled to 0.79 against 0.92). Attention: nn.MultiheadAttention's embedding width is the residual stream's,
   so it is narrowed with that group (its ``num_heads`` stay, ``head_dim`` shrinks; kept widths are
   multiples of every such attention's head count as well as of ``multiple``); Hugging Face attention
   (a module with ``num_attention_heads`` and ``query``/``key``/``value``, or DistilBERT's ``n_heads`` and
   ``q_lin``/``k_lin``/``v_lin``) loses whole heads, and its head count and widths are set again.
   Recurrent layers (LSTM, GRU, RNN) lose hidden units by rules of our own (rnn.py), traced as one node each.
2. Importance, per channel of each group (small interchangeable classes, as in torch-pruning):
   - ``output-loss`` (default): the output loss against the teacher, as layer pruning uses it. At the
     teacher's own weights that loss and its gradient are zero, so its first-order Taylor term is zero
     too; the first term that is not is the second-order one, 1/2 w^2 F with F the Fisher of the output
     (Optimal Brain Damage, torch-pruning's GroupHessianImportance). F is estimated with random
     projections of the output: for r ~ N(0, I), E[(d(r.y)/dw)^2] = diag(J^T J). Scores are at the
     model's output, so they compare across groups, and each is divided by the FLOPs one channel of the
     group costs: the cheapest output loss per FLOP goes first.
   - ``taylor``: first-order Taylor of the cross-entropy on the labels (Molchanov et al., 2019).
   - ``magnitude``: the group's L2 weight norm, torch-pruning's default (no data needed).
3. Budget: a pruning ratio found by bisection so that the FLOPs (or params) removed reach ``remove`` of
   the model's: global (the least important channels anywhere go first) where that reaches the budget,
   else uniform (every group loses the same share; global ranking can strip a group to its limit or an
   attention of its last head before the budget is met).
4. The result is a copy; ``plan`` records each module's new shapes and attributes, so ``apply_plan`` on
   the unpruned model rebuilds the skeleton that the shipped weights load into.
"""
from __future__ import annotations

from .importance import IMPORTANCE, ce_gradients, fisher
from .plan import apply_plan, plan_of
from .pruning import prune_channels, recalibrate_batchnorm
from .structure import head_layout, kept_by_default

__all__ = ["IMPORTANCE", "apply_plan", "ce_gradients", "fisher", "head_layout", "kept_by_default",
           "plan_of", "prune_channels", "recalibrate_batchnorm"]
