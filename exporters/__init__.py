"""Model -> files. Each exporter writes an artefact and returns its Artifact record.

Never imports compressor: it takes a torch module (or a file) and writes files.
"""
from __future__ import annotations

from .artifact import Artifact, ExportError, sha256


def _onnx(*args, **kwargs):
    from .onnx import export_onnx

    return export_onnx(*args, **kwargs)


def _openvino(*args, **kwargs):
    from .openvino import export_openvino

    return export_openvino(*args, **kwargs)


def _tensorrt(*args, **kwargs):
    from .tensorrt import export_tensorrt

    return export_tensorrt(*args, **kwargs)


def _tflite(*args, **kwargs):
    from .ethos import export_tflite_int8

    return export_tflite_int8(*args, **kwargs)


def _vela(*args, **kwargs):
    from .ethos import compile_vela

    return compile_vela(*args, **kwargs)


# format -> export function. onnx and tflite take a torch module; openvino, tensorrt and vela take the
# file an earlier exporter wrote (ONNX, ONNX, int8 TFLite).
EXPORTERS = {"onnx": _onnx, "openvino": _openvino, "tensorrt": _tensorrt, "tflite": _tflite, "vela": _vela}

__all__ = ["EXPORTERS", "Artifact", "ExportError", "sha256"]
