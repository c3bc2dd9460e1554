"""Outputs of an ONNX file on a batch through ONNX Runtime or OpenVINO (for parity checks), and the
feeds both build from one array or a dict by input name."""
from __future__ import annotations

from pathlib import Path

from ..artifact import ExportError


def _named(names: list[str], x) -> dict:
    """Feeds for inputs ``names``: ``x`` is one array (a single-input model) or a dict by input name."""
    if isinstance(x, dict):
        missing = [n for n in names if n not in x]
        if missing:
            raise ExportError(f"no data for the model input(s) {', '.join(missing)} (have {', '.join(x)})")
        return {n: x[n] for n in names}
    return {names[0]: x}


def _length(x) -> int:
    return len(next(iter(x.values()))) if isinstance(x, dict) else len(x)


def run_onnxruntime(path: str | Path, x, optimized: bool = True):
    """Outputs through ONNX Runtime's CPU provider. ``optimized=False`` turns graph optimizations off: a QDQ
    graph then runs as written (DequantizeLinear, then the float op), with no integer kernel."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    if not optimized:
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    return sess.run(None, _named([i.name for i in sess.get_inputs()], x))[0]


def run_openvino(path: str | Path, x):
    """Outputs through OpenVINO's CPU plugin in f32 inference precision; None when openvino is absent.

    The precision hint matters: on AMX CPUs OpenVINO otherwise runs bf16 and the comparison would
    measure bf16 rounding, not the int8 graph.
    """
    try:
        import openvino as ov
    except ImportError:
        return None
    compiled = ov.Core().compile_model(str(path), "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    feeds = _named([i.get_any_name() for i in compiled.inputs], x)
    return compiled.create_infer_request().infer(feeds)[compiled.output(0)]
