"""PyTorch -> ONNX with a dynamic batch axis, checked by onnx.checker and by ONNX Runtime parity."""
from __future__ import annotations

import os
import re
import shutil
import tempfile
import warnings
from contextlib import contextmanager
from pathlib import Path

from .artifact import Artifact, ExportError, sha256

# Models above this many bytes of weights are written with external data (ONNX protobufs cap at 2 GB).
EXTERNAL_DATA_BYTES = 1_800_000_000


def _io(values) -> list[dict]:
    import onnx

    out = []
    for v in values:
        t = v.type.tensor_type
        shape = [d.dim_param if d.dim_param else d.dim_value for d in t.shape.dim]
        out.append({"name": v.name, "shape": shape, "dtype": onnx.TensorProto.DataType.Name(t.elem_type).lower()})
    return out


def describe(path: str | Path, precision: str = "fp32", role: str = "student", parent: str = "export") -> Artifact:
    """An Artifact record for an existing ONNX file (inputs, outputs, opset, hash)."""
    import onnx

    path = Path(path)
    try:
        m = onnx.load(str(path), load_external_data=False)
    except Exception as e:  # protobuf raises a zoo of types on garbage
        raise ExportError(f"{path} is not a readable ONNX model ({type(e).__name__})") from None
    opset = next((o.version for o in m.opset_import if o.domain in ("", "ai.onnx")), None)
    data = path.with_name(f"{path.name}.data")  # external weights of a model over 2 GB
    size = path.stat().st_size + (data.stat().st_size if data.is_file() else 0)
    return Artifact(path=str(path), format="onnx", precision=precision, sha256=sha256(path),
                    bytes=size, inputs=_io(m.graph.input), outputs=_io(m.graph.output),
                    opset=opset, toolchain={"onnx": onnx.__version__}, role=role, parent=parent)


@contextmanager
def plain_attention():
    """nn.TransformerEncoder / nn.MultiheadAttention without their fused eval fast path
    (``aten::_transformer_encoder_layer_fwd``, which no ONNX exporter takes): the plain operators are traced."""
    import torch

    before = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        yield
    finally:
        torch.backends.mha.set_fastpath_enabled(before)


@contextmanager
def traceable_masks():
    """Hugging Face's attention masks (transformers >= 4.53) built without ``torch.vmap``, which the TorchScript
    exporter cannot trace (a Llama, Qwen2 or GPT-NeoX classifier failed with ``unordered_map::at``), and its
    cache and packed-sequence helpers in a form it traces: Optimum's own patches, for the exports that do not go
    through Optimum (the quantize stage's NNCF QDQ file, a user's model holding a decoder). A no-op where
    transformers is not loaded or Optimum is not installed."""
    import sys

    try:
        if "transformers" not in sys.modules:
            raise ImportError
        import transformers.masking_utils as mu
        from optimum.exporters.onnx import model_patcher as op
        masks = {"sdpa": op.sdpa_mask_without_vmap, "eager": op.eager_mask_without_vmap}
        functions = [(mu, "find_packed_sequence_indices", op.find_packed_sequence_indices_patched)]
        from transformers.cache_utils import DynamicLayer
        functions.append((DynamicLayer, "update", op.patched_dynamic_layer_update))
    except (ImportError, AttributeError):  # older transformers has no vmap masks; no Optimum, nothing to borrow
        yield
        return
    table = mu.AttentionMaskInterface._global_mapping
    saved_masks, saved = {k: table[k] for k in masks}, [(o, n, getattr(o, n)) for o, n, _ in functions]
    table.update(masks)
    for o, n, f in functions:
        setattr(o, n, f)
    try:
        yield
    finally:
        table.update(saved_masks)
        for o, n, f in saved:
            setattr(o, n, f)


_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_OP = re.compile(r"aten(?:::|\.)([A-Za-z_][A-Za-z0-9_]*)")


def culprit(model, example_inputs: tuple, op: str) -> str | None:
    """The path of the innermost module whose forward ran the aten operator ``op`` (None if none did):
    one forward pass under a dispatch mode that records operators, with hooks keeping the module stack."""
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode

    stack, found, handles = [], [], []

    class Record(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if not found and func.__name__.split(".")[0] == op:
                found.append(stack[-1] if stack else "")
            return func(*args, **(kwargs or {}))

    for name, m in model.named_modules():
        handles.append(m.register_forward_pre_hook(lambda _m, _a, name=name: stack.append(name)))
        handles.append(m.register_forward_hook(lambda _m, _a, _o: stack.pop() and None))  # None: output unchanged
    try:
        with torch.no_grad(), plain_attention(), Record():
            model(*example_inputs)
    except Exception:
        pass
    finally:
        for h in handles:
            h.remove()
    return found[0] if found else None


def _why(model, example_inputs, errors: list[Exception]) -> str:
    """One line: each exporter's first error line, and the module that runs the operator they name."""
    def first_line(e):
        text = _ANSI.sub("", str(e)).strip()
        return f"{type(e).__name__}: {text.splitlines()[0][:200]}" if text else type(e).__name__

    ops = [m.group(1) for e in errors for m in [_OP.search(_ANSI.sub("", str(e)))] if m]
    for op in dict.fromkeys(ops):
        path = culprit(model, example_inputs, op)
        if path is not None:
            kind = type(model.get_submodule(path)).__name__ if path else type(model).__name__
            return (f"operator aten::{op} runs in module {path or '(the model itself)'} ({kind}), and neither "
                    f"exporter converts it ({first_line(errors[0])}): rewrite it with exportable operators, or "
                    "keep it out of the student")
    return " / ".join(dict.fromkeys(first_line(e) for e in errors))


def export_onnx(model, example_inputs: tuple, path: str | Path, *, input_names=("input",),
                output_names=("logits",), opset: int = 17, dynamic_batch: bool = True,
                dynamic_axes: dict | None = None, precision: str = "fp32", role: str = "student",
                dynamo_first: bool = False) -> Artifact:
    """Export ``model`` (eval mode) to ``path``; written to a temporary name and renamed.

    ``example_inputs`` are positional (input_ids, attention_mask for a text encoder); ``dynamic_axes``
    names axes besides the batch ({"input_ids": {0: "batch", 1: "sequence"}}, Optimum's names).

    The TorchScript exporter runs first (NNCF's QDQ export needs it), torch.export's second when it fails;
    ``dynamo_first`` swaps them (a model whose TorchScript trace baked a batch size in, seen as a failed
    parity check at another batch size). A model neither takes raises ExportError naming the operator and
    the module that runs it."""
    import onnx
    import torch

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    axes = dynamic_axes or ({n: {0: "batch"} for n in (*input_names, *output_names)} if dynamic_batch else None)
    model = model.eval()
    big = sum(p.numel() * p.element_size() for p in model.parameters()) > EXTERNAL_DATA_BYTES
    # Export into a private directory beside the target (an exporter may scatter external-data files
    # there), then move the finished file(s) in: a crash never leaves half a model at ``path``.
    scratch = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    tmp = scratch / path.name
    try:
        with warnings.catch_warnings(), torch.no_grad(), plain_attention(), traceable_masks():
            warnings.simplefilter("ignore")
            # The TorchScript exporter (dynamo=False) is fast and is the path that NNCF's QDQ export
            # needs too; torch.export-based export is the fallback for models it cannot trace.
            errors = []
            for dynamo in ((True, False) if dynamo_first else (False, True)):
                try:
                    torch.onnx.export(model, example_inputs, str(tmp), input_names=list(input_names),
                                      output_names=list(output_names), dynamic_axes=axes,
                                      opset_version=max(opset, 18) if dynamo else opset, dynamo=dynamo,
                                      external_data=big)
                    break
                except Exception as e:  # the exporters raise a zoo of types
                    errors.append(e)
                    for stray in scratch.iterdir():
                        shutil.rmtree(stray, ignore_errors=True) if stray.is_dir() else stray.unlink()
            else:
                raise ExportError(f"ONNX export of {type(model).__name__} failed with both exporters: "
                                  f"{_why(model, example_inputs, errors)}")
        if big:
            # Protobuf caps a model at 2 GB: weights go to one ``<name>.data`` file beside it, whatever
            # layout the exporter chose.
            proto = onnx.load(str(tmp))
            single = scratch / "single"
            single.mkdir()
            onnx.save_model(proto, str(single / path.name), save_as_external_data=True,
                            all_tensors_to_one_file=True, location=f"{path.name}.data", size_threshold=1024)
            tmp = single / path.name
        try:
            onnx.checker.check_model(str(tmp), full_check=True)
        except onnx.checker.ValidationError as e:
            raise ExportError(f"exported ONNX fails onnx.checker: {str(e).splitlines()[0]}") from None
        data = tmp.with_name(f"{path.name}.data")
        if data.exists():
            os.replace(data, path.with_name(data.name))
        os.replace(tmp, path)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    art = describe(path, precision=precision, role=role)
    art.toolchain["torch"] = torch.__version__
    art.extra["exporter"] = "dynamo" if dynamo else "torchscript"
    return art


def export_checked(model, example_inputs: tuple, path: str | Path, check_inputs, *, atol: float = 1e-4,
                   rtol: float = 1e-3, log=None, given: Artifact | None = None, **export_kw) -> Artifact:
    """``export_onnx`` (or ``given``, a file already at ``path``), then ``parity`` against PyTorch on
    ``check_inputs`` (a batch of another size than ``example_inputs``'): the file a bundle ships. A TorchScript
    file that fails the check is exported again with torch.export's exporter first, which keeps Python values
    symbolic where a trace bakes them in (a ``len(x)`` of the example's batch, say), and checked again. ``log``
    hears about the second try. The Artifact's ``extra["parity"]`` holds the check; a file that fails it
    twice raises ExportError."""
    art = given or export_onnx(model, example_inputs, path, **export_kw)
    try:
        check = parity(path, model, check_inputs, atol=atol, rtol=rtol)
    except Exception as e:
        if art.extra.get("exporter") != "torchscript":
            raise ExportError(str(e)) from None
        if log is not None:
            log(f"the TorchScript export of {type(model).__name__} does not match PyTorch "
                f"({str(e).splitlines()[0][:160]}); trying torch.export")
        art = export_onnx(model, example_inputs, path, **{**export_kw, "dynamo_first": True})
        try:
            check = parity(path, model, check_inputs, atol=atol, rtol=rtol)
        except Exception as e2:
            raise ExportError(str(e2)) from None
    art.extra["parity"] = check
    return art


# Optimum's axis names -> ours (the bench scripts' --dim sequence=N, the profile's dims)
_AXES = {"batch_size": "batch", "sequence_length": "sequence"}


def export_optimum(model, path: str | Path, *, task: str, example_inputs: dict, opset: int = 17,
                   role: str = "student") -> Artifact:
    """A Hugging Face model through Optimum's exporter (what `optimum-cli export onnx` runs), so its inputs,
    outputs and dynamic axes are the ones Optimum users know. ``model`` must return its ModelOutput.
    Axes are renamed to ours (batch, sequence); the other symbolic axes (an image's height and width) are
    fixed to ``example_inputs``' sizes, as the rest of the toolchain runs one shape. Raises ExportError
    when Optimum is missing, does not support the architecture, or wants an input the data does not give."""
    import onnx

    try:
        from optimum.exporters.onnx import onnx_export_from_model
    except ImportError as e:
        raise ExportError(f"Optimum's ONNX exporter is not installed ({e})") from None
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                onnx_export_from_model(model, scratch, task=task, opset=opset, do_validation=False)
            except Exception as e:
                raise ExportError(f"Optimum does not export {type(model).__name__} for {task}: "
                                  f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}") from None
        proto = onnx.load(str(scratch / "model.onnx"))
        names = [i.name for i in proto.graph.input]
        extra = [n for n in names if n not in example_inputs]
        if extra:
            raise ExportError(f"Optimum's export of {type(model).__name__} takes {', '.join(extra)}, which the data "
                              f"does not give (it gives {', '.join(example_inputs)})")
        for v in [*proto.graph.input, *proto.graph.output]:
            shape = example_inputs[v.name].shape if v.name in example_inputs else None
            for k, d in enumerate(v.type.tensor_type.shape.dim):
                if d.dim_param in _AXES:
                    d.dim_param = _AXES[d.dim_param]
                elif d.dim_param and shape is not None:
                    d.dim_value = int(shape[k])  # clears dim_param
        tmp = scratch / f"fixed-{path.name}"
        onnx.save_model(proto, str(tmp))
        try:
            onnx.checker.check_model(str(tmp), full_check=True)
        except onnx.checker.ValidationError as e:
            raise ExportError(f"Optimum's ONNX fails onnx.checker: {str(e).splitlines()[0]}") from None
        os.replace(tmp, path)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    art = describe(path, role=role)
    import optimum.version

    art.toolchain["optimum"] = optimum.version.__version__
    art.extra["exporter"] = "optimum"
    return art


def parity(path: str | Path, model, inputs, *, atol: float = 1e-4, rtol: float = 1e-3) -> dict:
    """Compare ONNX Runtime against PyTorch on ``inputs`` (a batch tensor, or a dict of tensors named as
    the model's inputs); raise on a mismatch.

    The relative error is the worst |a-b| / (|b| + atol); ``ok`` means |a-b| <= atol + rtol*|b| everywhere
    (numpy.allclose's rule).
    """
    import numpy as np
    import onnxruntime as ort
    import torch

    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = [i.name for i in sess.get_inputs()]
    with torch.no_grad():
        ref = model.eval()(**inputs) if isinstance(inputs, dict) else model.eval()(inputs)
    ref = (ref[0] if isinstance(ref, (tuple, list)) else ref).detach().cpu().numpy()
    if isinstance(inputs, dict):
        feeds = {n: inputs[n].detach().cpu().numpy() for n in names}
        n_samples = len(next(iter(inputs.values())))
    else:
        feeds, n_samples = {names[0]: inputs.detach().cpu().numpy()}, int(inputs.shape[0])
    got = sess.run(None, feeds)[0]
    if got.shape != ref.shape:
        raise ExportError(f"ONNX output shape {got.shape} differs from PyTorch's {ref.shape}")
    diff = np.abs(got - ref)
    result = {
        "samples": n_samples, "max_abs": float(diff.max()),
        "max_rel": float((diff / (np.abs(ref) + atol)).max()), "atol": atol, "rtol": rtol,
        "ok": bool(np.all(diff <= atol + rtol * np.abs(ref))),
    }
    if not result["ok"]:
        raise ExportError(f"ONNX Runtime output differs from PyTorch beyond tolerance: max abs error "
                          f"{result['max_abs']:.3g} (atol {atol}, rtol {rtol}) on {result['samples']} "
                          "held-out inputs")
    return result
