"""Model -> files. Each exporter writes an artefact and returns its Artifact record.

Never imports compressor: it takes a torch module (or a file) and writes files.
"""
from __future__ import annotations

from .artifact import Artifact, ExportError, sha256


def _onnx(*args, **kwargs):
    from .onnx import export_onnx

    return export_onnx(*args, **kwargs)


# format -> export function
EXPORTERS = {"onnx": _onnx}

__all__ = ["EXPORTERS", "Artifact", "ExportError", "sha256"]
