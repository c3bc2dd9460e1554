"""PyTorch -> ONNX with a dynamic batch axis, checked by onnx.checker and by ONNX Runtime parity."""
from __future__ import annotations

import os
import shutil
import tempfile
import warnings
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


def export_onnx(model, example_inputs: tuple, path: str | Path, *, input_names=("input",),
                output_names=("logits",), opset: int = 17, dynamic_batch: bool = True,
                dynamic_axes: dict | None = None, precision: str = "fp32", role: str = "student") -> Artifact:
    """Export ``model`` (eval mode) to ``path``; written to a temporary name and renamed.

    ``example_inputs`` are positional (input_ids, attention_mask for a text encoder); ``dynamic_axes``
    names axes besides the batch ({"input_ids": {0: "batch", 1: "sequence"}}, Optimum's names)."""
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
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            # The TorchScript exporter (dynamo=False) is fast and is the path that NNCF's QDQ export
            # needs too; torch.export-based export is the fallback for models it cannot trace.
            try:
                torch.onnx.export(model, example_inputs, str(tmp), input_names=list(input_names),
                                  output_names=list(output_names), dynamic_axes=axes, opset_version=opset,
                                  dynamo=False, external_data=big)
            except Exception as first:
                try:
                    torch.onnx.export(model, example_inputs, str(tmp), input_names=list(input_names),
                                      output_names=list(output_names), dynamic_axes=axes,
                                      opset_version=max(opset, 18), dynamo=True, external_data=big)
                except Exception:
                    raise ExportError(f"ONNX export of {type(model).__name__} failed: "
                                      f"{type(first).__name__}: {str(first).splitlines()[0][:300]}") from None
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
