"""Polino et al.'s bucketed uniform weight quantization (2-8 bits): the quantizer, its straight-through
parametrization for training, the compressed size, and the check of a 4-bit ONNX file against the
fake-quantized model."""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from .errors import StageError


def _buckets(w: torch.Tensor, bucket: int) -> torch.Tensor:
    """``w`` flattened into rows of ``bucket`` values; the last row is padded with the last value, so the
    padding never widens the last bucket's range."""
    flat = w.reshape(-1)
    pad = (-flat.numel()) % bucket
    if pad:
        flat = torch.cat([flat, flat[-1:].expand(pad)])
    return flat.view(-1, bucket)


def integer_grid(w: torch.Tensor, bits: int, bucket: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per bucket of ``w`` (flattened, padded as ``bucket_quantize``): (scale, zero point), each (n_buckets, 1).

    Asymmetric b-bit quantization with an integer zero point: scale = (max - min) / (2^b - 1), zp =
    clamp(round(-min / scale), 0, 2^b - 1). The range is first widened to hold 0 (min <= 0 <= max), as
    ONNX Runtime's own block quantizer does: for a bucket of only positive (or only negative) values the
    zero point would otherwise be clamped and the top of the range clipped. Buckets that straddle 0 (almost
    all of a trained layer's) are quantized over exactly their own range."""
    b = _buckets(w, bucket)
    lo = b.min(1, keepdim=True).values.clamp_max(0)
    hi = b.max(1, keepdim=True).values.clamp_min(0)
    levels = 2 ** bits - 1
    scale = ((hi - lo) / levels).clamp_min(1e-12)
    zp = torch.round(-lo / scale).clamp(0, levels)
    return scale, zp


def bucket_quantize(w: torch.Tensor, bits: int, bucket: int = 256, zero_point: str = "float") -> torch.Tensor:
    """Polino et al.: flatten, buckets of ``bucket``. ``zero_point="float"`` is Polino's own: per bucket
    alpha = max - min, beta = min, v = (w - beta) / alpha rounded to 2^b levels, w_q = alpha * v_q + beta.
    ``"integer"``: q = clamp(round(w / scale) + zp, 0, 2^b - 1), w_q = (q - zp) * scale with the scale and
    integer zero point of ``integer_grid`` (what MatMulNBits' uint8 zero points compute)."""
    b = _buckets(w, bucket)
    levels = 2 ** bits - 1
    if zero_point == "integer":
        scale, zp = integer_grid(w, bits, bucket)
        q = (torch.round(b / scale) + zp).clamp(0, levels)
        return ((q - zp) * scale).reshape(-1)[:w.numel()].view_as(w)
    if zero_point != "float":
        raise ValueError(f"zero_point {zero_point!r}: use integer or float")
    lo = b.min(1, keepdim=True).values
    alpha = (b.max(1, keepdim=True).values - lo).clamp_min(1e-12)
    q = torch.round((b - lo) / alpha * levels) / levels * alpha + lo
    return q.reshape(-1)[:w.numel()].view_as(w)


class BucketQuant(nn.Module):
    """A parametrization: the module keeps the fp32 shadow weight (``parametrizations.weight.original``),
    the forward sees the quantized one, and the gradient passes straight through to the shadow weight."""

    def __init__(self, bits: int, bucket: int, zero_point: str = "float"):
        super().__init__()
        self.bits, self.bucket, self.zero_point = bits, bucket, zero_point

    def forward(self, w):
        return w + (bucket_quantize(w, self.bits, self.bucket, self.zero_point) - w).detach()

    def grid(self, w) -> dict | None:
        """For integer zero points, the per-bucket {"scales", "zero_points"} (numpy, flattened bucket order)
        of the shadow weight ``w``: what the exporter writes. None for float zero points: the exporter
        reads Polino's alpha and beta back from the quantized weight (its min and max are on the grid)."""
        if self.zero_point != "integer":
            return None
        import numpy as np

        with torch.no_grad():
            scale, zp = integer_grid(w.detach(), self.bits, self.bucket)
        return {"scales": scale.reshape(-1).cpu().numpy().astype(np.float32),
                "zero_points": zp.reshape(-1).cpu().numpy().astype(np.uint8)}


def compressed_bits(model: nn.Module, quantized: dict[str, tuple[int, int]], zero_point: str = "float") -> int:
    """b bits per quantized weight + per bucket two fp32 numbers (alpha, beta; float zero points) or an fp32
    scale and a b-bit zero point (integer zero points); 32 bits for the rest."""
    total = 0
    for name, p in model.named_parameters():
        mod = name.rsplit(".", 1)[0]
        if name.endswith("weight") and mod in quantized:
            bits, bucket = quantized[mod]
            total += p.numel() * bits + -(-p.numel() // bucket) * (64 if zero_point == "float" else 32 + bits)
        else:
            total += p.numel() * 32
    return total + sum(b.numel() * b.element_size() * 8 for b in model.buffers())


# 4-bit codes times a float scale, plus a float offset: the file and the fake-quantized model compute the same
# weights up to fp32 rounding; what differs is the summation order of ORT's kernels (measured ~1e-7 relative).
W4_ATOL, W4_RTOL = 1e-4, 1e-3


def w4_parity(path: Path, reference, x, atol: float = W4_ATOL, rtol: float = W4_RTOL) -> dict:
    """ONNX Runtime's output of the 4-bit file against the fake-quantized PyTorch model's (``reference``,
    computed with the BucketQuant parametrization on) on the batch ``x``; raises beyond |d| <= atol + rtol|ref|."""
    import numpy as np

    from exporters.qdq import run_onnxruntime

    from .tasks import size, to_numpy

    ref = reference if isinstance(reference, np.ndarray) else \
        (reference[0] if isinstance(reference, (tuple, list)) else reference).detach().cpu().numpy()
    try:
        got = run_onnxruntime(path, to_numpy(x))
    except Exception as e:
        raise StageError("quantize", f"onnxruntime cannot run {path.name}: {type(e).__name__}: "
                         f"{str(e).splitlines()[0][:200]}") from None
    diff = np.abs(got - ref)
    out = {"against": "fake-quantized PyTorch (BucketQuant)", "runtime": "onnxruntime CPU", "samples": size(x),
           "max_abs": float(diff.max()), "max_rel_to_range": float(diff.max() / (np.abs(ref).max() or 1.0)),
           "tolerance": f"|ORT - PyTorch| <= {atol} + {rtol} x |PyTorch|"}
    if not np.all(diff <= atol + rtol * np.abs(ref)):
        raise StageError("quantize", f"4-bit ONNX {path.name} differs from the fake-quantized model by up to "
                         f"{out['max_abs']:.3g} ({out['tolerance']})")
    return out
