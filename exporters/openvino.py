"""ONNX -> OpenVINO IR (.xml + .bin) with openvino.convert_model / save_model.

The IR keeps the ONNX model's precision: an fp32 ONNX gives fp32 weights, a QDQ int8 ONNX gives an IR
whose FakeQuantize nodes OpenVINO runs in int8. What precision *runs* is chosen at compile time by the
device (INFERENCE_PRECISION_HINT), not here.
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

from .artifact import Artifact, ExportError, sha256


def _io(ports) -> list[dict]:
    out = []
    for p in ports:
        shape = [d.get_length() if d.is_static else "?" for d in p.get_partial_shape()]
        out.append({"name": p.get_any_name(), "shape": shape, "dtype": p.get_element_type().get_type_name()})
    return out


def export_openvino(onnx_path: str | Path, path: str | Path, *, precision: str = "fp32",
                    role: str = "student", parent: str = "export") -> Artifact:
    """Convert ``onnx_path`` to an IR at ``path`` (``.xml``; the ``.bin`` lies beside it).

    ``precision`` fp16 stores the weights as fp16 (save_model's compress_to_fp16); fp32 and int8 keep
    them as they are. Note save_model compresses to fp16 *by default*: we always pass it explicitly.
    """
    try:
        import openvino as ov
    except ImportError:
        raise ExportError("OpenVINO is not installed: pip install 'compressor[openvino]'") from None
    onnx_path, path = Path(onnx_path), Path(path)
    if path.suffix != ".xml":
        raise ExportError(f"an OpenVINO IR path ends in .xml, not {path.name}")
    if precision not in ("fp32", "fp16", "int8"):
        raise ExportError(f"OpenVINO IR export: precision {precision!r} is not fp32, fp16 or int8")
    if not onnx_path.is_file():
        raise ExportError(f"OpenVINO IR export: {onnx_path} does not exist")
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        model = ov.convert_model(str(onnx_path))
    except Exception as e:
        raise ExportError(f"OpenVINO could not convert {onnx_path.name}: "
                          f"{str(e).strip().splitlines()[-1][:300]}") from None
    # Write both files under a temporary directory beside the target, then rename: never half an IR.
    with tempfile.TemporaryDirectory(dir=path.parent, prefix=".ov-") as tmp:
        tmp_xml = Path(tmp) / path.name
        ov.save_model(model, str(tmp_xml), compress_to_fp16=(precision == "fp16"))
        os.replace(tmp_xml.with_suffix(".bin"), path.with_suffix(".bin"))
        os.replace(tmp_xml, path)
    bin_path = path.with_suffix(".bin")
    return Artifact(path=str(path), format="openvino", precision=precision, sha256=sha256(path),
                    bytes=path.stat().st_size + bin_path.stat().st_size, inputs=_io(model.inputs),
                    outputs=_io(model.outputs), toolchain={"openvino": ov.get_version()}, role=role,
                    parent=parent, extra={"weights": bin_path.name, "weights_sha256": sha256(bin_path),
                                          "source": onnx_path.name})
