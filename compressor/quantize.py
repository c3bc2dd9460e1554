"""Quantization methods on a PyTorch student: which layers stay float, BatchNorm folding, NNCF int8
(post-training, and the fake-quantized model QAT fine-tunes), the parity check of a quantized ONNX file,
and Polino's bucketed weights (compressor.polino). The quantize stage (compressor.stages.quantize) runs them
as the recipe says. NNCF, torchao and OpenVINO are optional and imported only when a mode needs them.
"""
from __future__ import annotations

import copy
import types
import warnings
from pathlib import Path

import torch
from torch import nn

from .errors import StageError, UserError
from .polino import W4_ATOL, W4_RTOL, BucketQuant, bucket_quantize, compressed_bits, integer_grid, w4_parity  # noqa: F401

# Layers the int8 quantizers (ORT, NNCF) and Polino's weight quantizer handle. Norms stay float (folded
# or cheap); any other layer with its own weights is one the quantizers have no rule for.
QUANTIZABLE = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.Linear)
FLOAT_OK = (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm, nn.Embedding)


ORT_MODES = ("ptq-ort", "ptq-dynamic")  # ONNX Runtime quantizes the exported graph, node by node


def float_layers(model: nn.Module, spec, log=print) -> tuple[list[str], list[str]]:
    """(module paths kept in float with everything under them, modules with weights of their own).

    The first are ``quantize.keep_float`` (below 8 bits by default the first and last layer). The second are
    modules whose own weights are not a Conv's, a Linear's, a norm's or an embedding's (nn.MultiheadAttention's
    packed projection, a layer-scale gain, a relative-position table). Nothing is held back for them: ONNX
    Runtime quantizes every MatMul, Gemm and Conv of the exported graph whose weights it can, NNCF every
    operation its rules cover (a linear of the packed projection), and the layers inside them (an attention's
    output Linear, a ConvNeXt block's convolutions) are quantized as usual; what no rule covers (a gain's
    multiply) stays float, and the Q/DQ check allows a float operation of that module's own, not of its
    children. Raises on unknown paths, or on such a module under NNCF or Polino when ``allow_float`` is off."""
    names = dict(model.named_modules())
    weighted = [n for n, m in names.items() if n and isinstance(m, QUANTIZABLE)]
    keep = list(spec.keep_float) if spec.keep_float is not None else \
        ([weighted[0], weighted[-1]] if spec.bits < 8 and weighted else [])
    unknown = [p for p in keep if p not in names]
    if unknown:
        raise UserError(f"quantize.keep_float: no module {', '.join(map(repr, unknown))} in the student "
                        f"(its layers: {', '.join(weighted[:12])}{' ...' if len(weighted) > 12 else ''})")
    own = []
    for n, m in names.items():
        if not n or isinstance(m, QUANTIZABLE + FLOAT_OK) or any(n == k or n.startswith(k + ".") for k in keep):
            continue
        params = [p for p, _ in m.named_parameters(recurse=False)]
        if not params:
            continue
        own.append(n)
        what = f"layer {n!r} ({type(m).__name__}) has weights of its own ({', '.join(params)})"
        if spec.bits < 8:
            said = f"they stay float at {spec.bits} bits"
        elif spec.mode in ORT_MODES:
            log(f"quantize: {what}; ONNX Runtime quantizes the MatMul, Gemm and Conv they feed, the rest stays float")
            continue
        else:
            said = "NNCF quantizes the operations its rules cover (a linear of them), the rest stays float"
        if not spec.allow_float:
            raise UserError(f"quantize: {what}, which may stay float under {spec.mode}; add it to "
                            "quantize.keep_float or set quantize.allow_float: true")
        log(f"warning: quantize: {what}: {said}; the layers inside it are quantized")
    return keep, own


class _Wrap(nn.Module):
    """nncf.quantize fails on a top-level nn.Sequential: wrap it (paths gain a 'net.' prefix)."""

    def __init__(self, net):
        super().__init__()
        self.net = net

    def forward(self, x):
        return self.net(x)


def fold_batchnorm(model: nn.Module, log=print) -> nn.Module:
    """A copy with each Conv->BatchNorm folded into the Conv (BN replaced by Identity), so the quantized
    weights are the ones that ship and TensorRT sees Q/DQ right on the Conv. torch.fx finds the pairs, but
    the copy keeps the user's own module class and paths (NNCF takes a GraphModule down another backend).
    Unchanged, with a note, when symbolic tracing cannot follow the model."""
    from torch.nn.utils.fusion import fuse_conv_bn_eval

    model = copy.deepcopy(model).eval()
    if not _bn_count(model):
        return model  # nothing to fold (Transformers use LayerNorm)
    try:
        graph = torch.fx.symbolic_trace(model).graph
    except Exception as e:
        log(f"quantize: BatchNorm not folded (torch.fx cannot trace {type(model).__name__}: {type(e).__name__})")
        return model
    mods = dict(model.named_modules())
    calls = [n.target for n in graph.nodes if n.op == "call_module"]
    convs = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
    for node in graph.nodes:
        src = node.args[0] if node.args else None
        if not (node.op == "call_module" and isinstance(mods.get(node.target), nn.modules.batchnorm._BatchNorm)
                and getattr(src, "op", None) == "call_module" and isinstance(mods.get(src.target), convs)
                and len(src.users) == 1 and calls.count(src.target) == 1 and calls.count(node.target) == 1):
            continue
        for path, new in ((src.target, fuse_conv_bn_eval(mods[src.target], mods[node.target])),
                          (node.target, nn.Identity())):
            parent, _, name = path.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, name, new)
    return model


def _bn_count(model: nn.Module) -> int:
    return sum(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


def is_transformer(model: nn.Module) -> bool:
    return any(isinstance(m, (nn.MultiheadAttention, nn.TransformerEncoderLayer)) or
               type(m).__name__.endswith(("SelfAttention", "Attention")) for m in model.modules())


def _nncf_ignored(model: nn.Module, example, keep: list[str]) -> list[str]:
    """NNCF's names of the operations that use a weight of a module under ``keep``. Its node names drop a
    ModuleList's index (blocks.0.conv's convolution is conv/conv2d/0), so they are not matched by path: each
    operation is found by the parameters it takes, whose constant nodes keep their full names."""
    from nncf.torch.function_hook.nncf_graph.nncf_graph_builder import build_nncf_graph

    graph = build_nncf_graph(model, example)
    found, names = set(), []
    for n in graph.get_all_nodes():
        owners = [e.from_node.node_name.rpartition(".")[0] for e in graph.get_input_edges(n)
                  if e.from_node.metatype.__name__ == "PTConstNoopMetatype"]  # a parameter, by its full path
        hit = [k for k in keep if any(o == k or o.startswith(k + ".") for o in owners)]
        if hit:
            found.update(hit)
            names.append(n.node_name)
    missing = [k for k in keep if k not in found]
    if missing:
        raise UserError(f"quantize.keep_float: NNCF's graph has no operation that uses a weight of "
                        f"{', '.join(map(repr, missing))}; name a module with weights (a Conv or Linear, or a block)")
    return names


def _nncf_depthwise_conv1d() -> None:
    """NNCF 3.4 spells the depthwise Conv1d metatype's ``hw_config_names`` as ``hw_config_name``, so no
    quantizer (weight or input) goes on a depthwise Conv1d (ConvBERT's span convolution) and the file fails
    the Q/DQ check. It is set to a plain convolution's: a depthwise one's allows only a per-channel input
    quantizer, which NNCF placed before ConvBERT's transpose, on the sequence axis (16 scales for 16 tokens),
    and ONNX Runtime's QLinearConv refused it ("zero point must be a scalar")."""
    try:
        from nncf.common.hardware.opset import HWOpName
        from nncf.torch.graph.operator_metatypes import PTDepthwiseConv1dSubtype
    except ImportError:
        return
    if not PTDepthwiseConv1dSubtype.hw_config_names or PTDepthwiseConv1dSubtype.hw_config_names == [
            HWOpName.DEPTHWISE_CONVOLUTION]:
        PTDepthwiseConv1dSubtype.hw_config_names = [HWOpName.CONVOLUTION]


def _copy_method_wrapper(x, memo):
    """A descriptor's (or a class's) method-wrapper by reference; any other as copy does (bound to the copy)."""
    if isinstance(getattr(x, "__self__", None), (types.GetSetDescriptorType, types.MemberDescriptorType, type)):
        return x
    return copy._reconstruct(x, memo, *x.__reduce_ex__(4))


def _copyable_method_wrappers() -> None:
    """NNCF records a tensor property read in the forward (ModernBERT's ``rows.T``, Falcon's ``x @ self.weight.T``)
    as an operation whose function is the ``__get__`` method-wrapper of ``Tensor.T``'s getset descriptor, then
    deep-copies its graph, which ``copy.deepcopy`` cannot ("cannot pickle 'getset_descriptor' object"). Such a
    wrapper belongs to the class, not to any copied object, so it is kept by reference; a wrapper bound to an
    ordinary object is still re-bound to its copy, as before."""
    copy._deepcopy_dispatch.setdefault(types.MethodWrapperType, _copy_method_wrapper)


def nncf_quantize(model, calib, spec, act: str, keep: list[str], reduce_range: bool = False):
    """NNCF post-training int8 of ``model`` calibrated on ``calib`` (the operations of its layers under
    ``keep`` stay float); the fake-quantized model, ready for QAT or export."""
    import os

    # NNCF compiles a C++ extension on first use (~30 s idle) and gives up after 60 s: on a busy
    # machine that is not enough. Ten minutes, unless the user set their own.
    os.environ.setdefault("NNCF_EXTENSION_LOAD_TIMEOUT", "600")
    try:
        import nncf
    except ImportError:
        raise UserError(f"quantize.mode {spec.mode} needs NNCF: pip install 'compressor[quant]' "
                        "(nncf and torchao), or use quantize.mode: ptq-ort") from None
    _nncf_depthwise_conv1d()
    _copyable_method_wrappers()
    if isinstance(model, nn.Sequential):
        model = _Wrap(model)
        keep = [f"net.{k}" for k in keep]
    from .tasks import size, take

    batches = [take({k: v[i:] for k, v in calib.items()} if isinstance(calib, dict) else calib[i:], 32)
               for i in range(0, size(calib), 32)]
    ignored = nncf.IgnoredScope(names=_nncf_ignored(model.eval(), take(batches[0], 1), keep) if keep else [],
                                validate=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            # Transformers get NNCF's own scheme (no quantizers on the softmax/LayerNorm paths).
            kind = {"model_type": nncf.ModelType.TRANSFORMER} if is_transformer(model) else {}
            if reduce_range:  # 7-bit weights everywhere (NNCF's default fixes only the first layer)
                from nncf.quantization.advanced_parameters import AdvancedQuantizationParameters, OverflowFix

                kind["advanced_parameters"] = AdvancedQuantizationParameters(overflow_fix=OverflowFix.ENABLE)
            q = nncf.quantize(model.eval(), nncf.Dataset(batches), subset_size=len(batches), ignored_scope=ignored,
                              **kind)
        except Exception as e:
            import traceback

            inner = next((f"{f.name} ({Path(f.filename).name}:{f.lineno})" for f in reversed(traceback.extract_tb(
                e.__traceback__)) if "nncf" in Path(f.filename).parts), None)  # the frame where NNCF gave up
            raise StageError("quantize", f"nncf.quantize failed on {type(model).__name__}: {type(e).__name__}: "
                             f"{str(e).splitlines()[0][:300]}" + (f" (in NNCF's {inner})" if inner else "")
                             + "; quantize.mode: ptq-ort or ptq-dynamic quantize the exported file instead, "
                             "without NNCF") from None
    if act == "int8":
        # TensorRT wants signed int8 with zero point 0 everywhere; NNCF makes post-ReLU quantizers unsigned,
        # and its HW configs reject signedness_to_force. Flipping them keeps each range (the symmetric
        # scale is the range's end) at one bit less resolution, which QAT then trains with.
        from nncf.torch.quantization.layers import SymmetricQuantizer

        for mod in q.modules():
            if isinstance(mod, SymmetricQuantizer) and not mod.signed:
                mod.signed = True
    return q


def nncf_strip(q, example):
    """nncf.strip(NATIVE) turns NNCF's quantizers into torch fake-quant ops, which the TorchScript
    exporter writes as standard QuantizeLinear/DequantizeLinear; without strip it writes a custom
    FakeQuantize op ORT rejects, and the dynamo exporter fails on them."""
    import nncf
    from nncf.torch.function_hook.wrapper import get_hook_storage
    from nncf.torch.quantization.layers import BaseQuantizer

    # One quantizer NNCF shares between several hook points (the inputs of a torch.cat, the halves of a chunk)
    # is converted under its first name only: the others kept NNCF's quantizer, which exports as a custom
    # FakeQuantize op (ShuffleNet, a two-input model). They get the converted one too (the same shared scale).
    names: dict[int, list[str]] = {}
    for name, m in get_hook_storage(q).named_hooks(remove_duplicate=False):
        if isinstance(m, BaseQuantizer):
            names.setdefault(id(m), []).append(name)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            out = nncf.strip(q.eval(), strip_format=nncf.StripFormat.NATIVE, example_input=example)
        except ImportError as e:
            raise UserError(f"nncf.strip needs torchao ({e}): pip install 'compressor[quant]'") from None
    storage = get_hook_storage(out)
    now = dict(storage.named_hooks(remove_duplicate=False))
    for shared in (v for v in names.values() if len(v) > 1):
        done = next((now[n] for n in shared if not isinstance(now.get(n), BaseQuantizer)), None)
        for n in shared if done is not None else ():
            if isinstance(now.get(n), BaseQuantizer):
                storage.set_submodule(n, done)
    return out


def _said(e: Exception) -> str:
    """An exception's message without the runtime's location lines (OpenVINO leads with a stack of
    "Exception from src/...cpp:N:" lines and puts the cause last)."""
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip() and not ln.startswith("Exception from ")]
    return f"{type(e).__name__}: {' '.join(lines)[:300]}"


BAKED = ("the export fixed the example's batch in the file (a trace records a reshape by len(x) as a constant, and "
         "NNCF's quantized model only traces); write x.shape[0] (or -1) in the forward, or use quantize.mode: "
         "ptq-ort, which quantizes the export stage's file (torch.export keeps the batch free)")


def _runs_at_the_example_batch(fn, path: Path, x) -> bool:
    from .tasks import take, to_numpy

    try:
        return fn(path, to_numpy(take(x, 2))) is not None
    except Exception:
        return False


def parity(path: Path, reference, x, tol: float, what: str, reduced: bool = True, openvino: bool = True,
           log=print) -> dict:
    """ORT (and OpenVINO, when installed) against ``reference`` outputs. Against the fake-quantized model,
    raise when the worst difference exceeds ``tol`` times the largest |output|: runtimes run int8 kernels
    whose requantization rounds differently from float fake quant (on the quickstart ~1% of the logit
    range, while int8 vs fp32 differ by ~10%). Against fp32 (ORT PTQ has no fake-quant model) it only reports.

    A file with full-range int8 weights (``reduced`` False) made on a host whose int8 kernels saturate, for
    targets that do not: both runtimes would be off here and right there. The enforced check then runs
    ORT on the graph as written (optimizations off: DequantizeLinear and the float op, no integer kernel),
    reports what the integer kernels gave beside it, and does not run OpenVINO.

    ``openvino`` False (no target runs OpenVINO): OpenVINO is still tried, but what it says is reported, not
    raised: a graph it cannot compile (Swin's window mask, DeBERTa's If) must not stop an ONNX Runtime run."""
    import numpy as np

    from devices.bench_onnxruntime import int8_saturates
    from exporters.qdq import run_onnxruntime, run_openvino

    from .tasks import size, to_numpy

    ref = reference if isinstance(reference, np.ndarray) else reference.detach().numpy()
    scale = float(np.abs(ref).max()) or 1.0
    out = {"against": what, "tolerance": f"{tol} x max|output| = {tol * scale:.3g}", "samples": size(x)}
    enforced = what != "fp32 PyTorch"
    runtimes = (("onnxruntime", run_onnxruntime, enforced), ("openvino", run_openvino, enforced and openvino))
    if enforced and not reduced and int8_saturates():
        out["note"] = ("8-bit weights on a host whose int8 kernels saturate (x86 without VNNI): ONNX Runtime "
                       "checked with graph optimizations off, OpenVINO not run")
        runtimes = (("onnxruntime_integer_kernels", run_onnxruntime, False),
                    ("onnxruntime", lambda p, v: run_onnxruntime(p, v, optimized=False), True))
    for rt, fn, enforce in runtimes:
        try:
            got = fn(path, to_numpy(x))
        except Exception as e:
            if rt == "openvino" and not openvino:
                out[rt] = f"cannot run it ({_said(e)}); no target runs OpenVINO, so not enforced"
                log(f"quantize: OpenVINO cannot run {path.name} ({_said(e)}); no target runs OpenVINO, so the "
                    "run goes on")
                continue
            if _runs_at_the_example_batch(fn, path, x):
                raise StageError("quantize", f"{rt} cannot run {path.name} on a batch of {size(x)} ({_said(e)}), "
                                 f"but runs it on the export's example batch: {BAKED}") from None
            raise StageError("quantize", f"{rt} cannot run {path.name}: {_said(e)}") from None
        if got is None:
            out[rt] = "not installed (skipped)"
            continue
        if got.shape != ref.shape:
            baked = got.ndim == ref.ndim and got.shape[1:] == ref.shape[1:]  # the forward's len(x), traced
            raise StageError("quantize", f"{rt} gives {path.name} an output of shape {tuple(got.shape)} for inputs "
                             f"whose model output is {tuple(ref.shape)}" + (f": {BAKED}" if baked else ""))
        diff = float(np.abs(got - ref).max())
        out[rt] = {"max_abs": diff, "max_rel_to_range": diff / scale,
                   "top1_agreement": float((got.argmax(-1) == ref.argmax(-1)).mean())}
        if rt == "openvino" and not openvino and enforced and diff > tol * scale:
            log(f"quantize: OpenVINO's output of {path.name} differs from the {what} model by {diff / scale:.1%} "
                "of the output range; no target runs OpenVINO, so the run goes on")
        if enforce and diff > tol * scale:
            raise StageError("quantize", f"{rt} output of {path.name} differs from the {what} model by "
                             f"{diff:.3g}, {diff / scale:.1%} of the output range (quantize.parity_tol {tol})")
    return out
