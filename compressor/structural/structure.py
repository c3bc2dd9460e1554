"""What pruning needs to know of a model's structure: torch-pruning itself, the order a forward pass calls
the weighted modules in, the stem and head kept by default, and the Hugging Face attention head layout."""
from __future__ import annotations

import math
from contextlib import contextmanager

import torch
from torch import nn

from ..errors import UserError
from ..flops import no_fastpath
from ..hf import HEAD_LAYOUTS
from ..intake import select_output
from ..tasks import call, take


def _tp():
    try:
        import torch_pruning as tp
    except ImportError:
        raise UserError("prune.channels needs torch-pruning: pip install -c constraints.txt -e '.[prune]'") from None
    return tp


DEPGRAPH_SECONDS = 120.0  # torch-pruning's dependency graph of one copy; a tiny model's takes well under a second


@contextmanager
def channel_concats_only():
    """torch-pruning's index mapping through a torch.cat only where the cat joins channels. It maps one whenever
    the inferred widths of its inputs add up to the width downstream, and its guard against a cat along another
    dim reads ``_saved_dim``, which a negative dim leaves as 2**64 - 1 (taken for uninitialised memory). Llama's
    rotate_half, ``cat((-x2, x1), dim=-1)`` over head_dim, passed wherever k is half as wide as o_proj's input
    (grouped-query attention with two query heads per key/value head: Qwen3, Gemma2, Mistral and Llama
    configs), and its second input's +offset, taken round the cycle of rotary's elementwise q * cos +
    rotate_half(q) * sin, grew the indices without end: get_pruning_group never finished. A cat whose output is
    not as wide along its dim as its inputs' inferred channels add up to maps nothing here."""
    from torch_pruning.dependency import index_mapping, shape_infer

    original = index_mapping.update_concat_index_mapping

    def update(graph, node):
        g = node.grad_fn
        meta, dim = getattr(g, "_input_metadata", ()), getattr(g, "_saved_dim", None)
        if meta and isinstance(dim, int) and len(meta[0].shape):
            shape = list(meta[0].shape)
            d = (dim - 2 ** 64 if dim >= 2 ** 63 else dim) % len(shape)
            chs = [shape_infer.infer_channels_between(graph, n, node) for n in node.inputs]
            if None not in chs and sum(chs) != shape[d]:
                return
        return original(graph, node)

    index_mapping.update_concat_index_mapping = update
    try:
        yield
    finally:
        index_mapping.update_concat_index_mapping = original


class Untraceable(Exception):
    """torch-pruning did not finish building its dependency graph within DEPGRAPH_SECONDS."""


@contextmanager
def deadline(seconds: float):
    """Raise Untraceable when the block runs past ``seconds``. torch-pruning's closure over its index mappings
    can go round a cycle without end (Qwen2's grouped-query ``repeat_kv``, Phi's partial rotary split, FocalNet's
    modulation): the run hung, printing nothing. SIGALRM, so the main thread on Unix only; elsewhere no limit."""
    import signal
    import threading

    if not hasattr(signal, "SIGALRM") or threading.current_thread() is not threading.main_thread():
        yield
        return

    def alarm(_signum, _frame):
        raise Untraceable(f"torch-pruning did not finish building its dependency graph in {seconds:.0f} s")

    old = signal.signal(signal.SIGALRM, alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def _output(model, x):
    return select_output(call(model, x))


@torch.no_grad()
def _weighted_order(model: nn.Module, example) -> list[str]:
    """Paths of the modules with weights (conv, linear, embedding) in the order a forward pass calls them."""
    order, handles = [], []
    for name, m in model.named_modules():
        if isinstance(m, (nn.modules.conv._ConvNd, nn.Linear, nn.Embedding)):
            handles.append(m.register_forward_hook(lambda _m, _a, _o, name=name: order.append(name)))
    try:
        with no_fastpath():
            call(model.eval(), take(example, 1))
    finally:
        for h in handles:
            h.remove()
    return list(dict.fromkeys(order))


def kept_by_default(model: nn.Module, example) -> dict[str, str]:
    """The input stem (the first weighted module a forward calls) and the classifier head (the last):
    {path: why}. Embeddings count as the stem of a text model."""
    order = _weighted_order(model, example)
    if not order:
        return {}
    stem = [p for p in order if isinstance(model.get_submodule(p), nn.Embedding)] or order[:1]
    return {**{p: "input stem" for p in stem}, order[-1]: "classifier head"}


# The attention's own copies of the q/k/v width, which its forward reshapes by; set again after pruning.
_TOTAL_WIDTH = ("all_head_size", "dim", "embed_dim")
_HEAD_SIZE = ("attention_head_size", "head_dim")


def width_of(m: nn.Module, side: str) -> int:
    """A Linear's or a conv's number of inputs (``side="in"``) or outputs; 0 for any other module."""
    return getattr(m, f"{side}_features", None) or getattr(m, f"{side}_channels", 0)


def head_layout(model: nn.Module) -> tuple[dict, list]:
    """torch-pruning's ``num_heads`` ({q/k/v Linear: heads}) for Hugging Face-style attention, and those
    attention modules as (module, head-count attribute, query Linear, width attributes): their head counts
    and widths are set again after pruning."""
    heads, atts = {}, []
    for m in model.modules():
        for count, names in HEAD_LAYOUTS:
            n = getattr(m, count, None)
            qkv = [getattr(m, k, None) for k in names]
            if isinstance(n, int) and all(isinstance(q, nn.Linear) for q in qkv):
                for q in qkv:
                    heads[q] = n
                width = [a for a in _TOTAL_WIDTH if getattr(m, a, None) == qkv[0].out_features]
                atts.append((m, count, qkv[0], width))
                break
        else:  # Llama, Gemma, Phi: q/k/v reshaped by (-1, head_dim), no count kept: whole heads go, nothing to set
            d, qkv = getattr(m, "head_dim", None), [getattr(m, k, None) for k in dict(HEAD_LAYOUTS)["num_heads"]]
            if isinstance(d, int) and d > 0 and all(isinstance(q, nn.Linear) and q.out_features % d == 0 for q in qkv) \
                    and len({q.out_features for q in qkv}) == 1:  # grouped-query attention's k/v are narrower
                heads.update({q: q.out_features // d for q in qkv})
                # a count kept under another name (GPT-J's num_attention_heads beside q_proj) is set again too
                count = next((c for c, _ in HEAD_LAYOUTS if getattr(m, c, None) == heads[qkv[0]]), None)
                if count:
                    atts.append((m, count, qkv[0], [a for a in _TOTAL_WIDTH
                                                    if getattr(m, a, None) == qkv[0].out_features]))
    return heads, atts


def grouped_query(model: nn.Module) -> dict[str, str]:
    """The q/k/v projections of grouped-query attention (fewer key/value heads than query heads: Llama, Mistral,
    Qwen2/3, Gemma2), {path: why}: torch-pruning couples k and v to q and o_proj channel by channel (SDPA's
    enable_gqa, an elementwise op to it) or to nothing (repeat_kv's expand maps to no index), so neither cut is
    exact; they are kept whole, and prune.width cuts their heads."""
    out = {}
    for name, m in model.named_modules():
        q, k, v = (getattr(m, n, None) for n in ("q_proj", "k_proj", "v_proj"))
        if all(isinstance(p, nn.Linear) for p in (q, k, v)) and k.out_features < q.out_features:
            out.update({f"{name}.{n}": "grouped-query attention (prune.width cuts its heads)"
                        for n in ("q_proj", "k_proj", "v_proj")})
    return out


def width_unit(model: nn.Module, multiple: int | None) -> int | None:
    """torch-pruning's ``round_to``: ``multiple``, made a multiple of every nn.MultiheadAttention's head count.
    nn.MultiheadAttention's embedding width is the residual stream's, cut like any channel group (torch-pruning's
    MHA pruner keeps ``num_heads`` and narrows ``head_dim``), and must stay divisible by its heads; so it is not
    given to torch-pruning as ``num_heads``, which takes the whole residual group for one attention's heads and,
    without head-dim pruning, cuts nothing of it (a ViT kept its embedding width and every head)."""
    heads = [a.num_heads for a in model.modules() if isinstance(a, nn.MultiheadAttention)]
    if not heads:
        return multiple
    return math.lcm(multiple or 1, *heads)


class _TooFar(Exception):
    """A ratio that leaves some attention without a head: the bisection treats it as too much."""


def _fix_heads(atts, num_heads: dict) -> None:
    for m, count, query, width in atts:
        n = num_heads[query]
        sizes = [a for a in _HEAD_SIZE if isinstance(getattr(m, a, None), int)] or ["attention_head_size"]
        size = getattr(m, sizes[0], None)
        if isinstance(size, int) and size and query.out_features != n * size and query.out_features % size == 0:
            # torch-pruning lowered the count but left the projections whole (BEiT: its heads were not cut,
            # and a head size of 32 // 3 broke the reshape): the heads the projections still hold
            n = query.out_features // size
        if n < 1:
            raise _TooFar
        setattr(m, count, n)
        for a in sizes:  # BERT's attention_head_size, OPT's head_dim
            setattr(m, a, query.out_features // n)
        for a in width:  # each layer reads its own attributes, not the shared config
            setattr(m, a, query.out_features)


def raised_in(e: BaseException) -> tuple[str, str] | None:
    """(the innermost module with children whose code ``e`` passed through, the innermost module) as
    ``"path (Class)"``, paths under the outermost module on the traceback (the model that was running): a
    pruned copy that fails to run names the block whose own code did not follow the cut (an attention that
    reshapes by a head count of its own, which torch-pruning does not update). None when no module ran."""
    chain, held = [], []  # the modules whose code is on the traceback (as self); every module a frame holds
    tb = e.__traceback__.tb_next if e.__traceback__ is not None else None  # not the frame that caught it
    while tb is not None:
        local = tb.tb_frame.f_locals
        me = local.get("self")
        if isinstance(me, nn.Module) and "_modules" in me.__dict__ and not any(me is x for x in chain):
            chain.append(me)
        # a module deepcopy left half built (a non-leaf tensor it could not copy) has no _modules yet
        held += [v for v in local.values() if isinstance(v, nn.Module) and "_modules" in v.__dict__
                 and not any(v is x for x in held)]
        tb = tb.tb_next
    del tb
    # Inside a forward, the chain of selves says where (a loop variable may still hold a block that ran fine);
    # inside torch-pruning's own functions no module runs, and the layer being cut is one of the locals.
    mods = chain if chain else held
    if len(mods) < 2:
        return None
    # The model that ran: the module holding most of the others (the pruned copy, not the original beside it).
    ids = {id(m) for m in mods}
    root = max(mods, key=lambda m: sum(id(sub) in ids for sub in m.modules()))
    paths = {id(sub): name for name, sub in root.named_modules()}
    inner = [m for m in mods if m is not root and id(m) in paths]
    if not inner:
        return None
    block = next((m for m in reversed(inner) if list(m.children())), inner[-1])
    return tuple(f"{paths[id(m)]} ({type(m).__name__})" for m in (block, inner[-1]))
