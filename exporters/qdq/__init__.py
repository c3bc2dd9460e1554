"""INT8 (and low-bit) ONNX in the standard QuantizeLinear/DequantizeLinear (QDQ) form.

File -> file, like every exporter (it never imports compressor):

- ``quantize_static``: ONNX Runtime's post-training static quantization of an fp32 ONNX file.
- ``check_qdq``: the graph rules ONNX Runtime, OpenVINO and TensorRT's explicit quantization share:
  only standard Q/DQ (no custom FakeQuantize op), Q/DQ on the inputs of every Conv/Gemm/MatMul that is
  not deliberately kept in float, per-channel weight scales.
- ``pack_bucketed``: rewrite fp32 weights that lie on Polino's bucketed b-bit grid as 4-bit codes
  (UINT4 DequantizeLinear, opset 21) so the file shrinks; ONNX Runtime dequantizes them at load time.
- ``pack_w4``: the same weights as com.microsoft.MatMulNBits where a Linear's buckets are K-blocks (ORT
  computes with the 4-bit codes), ``pack_bucketed`` for the rest, with the reason per layer.
- ``run_onnxruntime`` / ``run_openvino``: outputs of a file on a batch, for parity checks.

Modules: ``ptq`` (ORT static/dynamic quantization), ``graph`` (QDQ rules), ``rewrite`` (weight folding, Q/DQ
after moves), ``bucketed`` and ``nbits`` (4-bit packing), ``run`` (runners).
"""
from __future__ import annotations

from .bucketed import pack_bucketed
from .graph import (
    COMPUTE_OPS,
    SHAPE_OPS,
    check_qdq,
    module_path,
)
from .nbits import (
    NBITS_NOTE,
    NBITS_ZP_NOTE,
    pack_w4,
    pack_zero_points,
    unpack_zero_points,
)
from .ptq import quantize_dynamic, quantize_static
from .rewrite import fold_weight_quantizers, requantize_moved
from .run import run_onnxruntime, run_openvino

__all__ = [
    "COMPUTE_OPS", "NBITS_NOTE", "NBITS_ZP_NOTE", "SHAPE_OPS", "check_qdq", "fold_weight_quantizers", "module_path",
    "pack_bucketed", "pack_w4", "pack_zero_points", "quantize_dynamic", "quantize_static", "requantize_moved",
    "run_onnxruntime",
    "run_openvino", "unpack_zero_points",
]
