"""Which training precision the hardware runs natively: bf16 autocast on a CUDA GPU that supports it and on a
CPU whose flags list AMX or AVX512-BF16 (read from the CPU, never assumed), fp32 elsewhere. The distill stage's
trainer and the teacher's training on first use both ask here."""
from __future__ import annotations

import contextlib

import torch


def resolve(want: str = "auto", accelerator: str = "cpu") -> tuple[str, str]:
    """(Lightning precision name, why). ``want`` other than ``auto`` is returned as the recipe's choice."""
    if want != "auto":
        return want, "set in the recipe"
    if accelerator in ("gpu", "cuda", "auto") and torch.cuda.is_available():
        if torch.cuda.is_bf16_supported():
            return "bf16-mixed", f"{torch.cuda.get_device_name(0)} runs bf16"
        return "32-true", f"{torch.cuda.get_device_name(0)} has no bf16"
    from devices.bench_onnxruntime import cpu_flags

    have = sorted(cpu_flags() & {"amx_bf16", "avx512_bf16"})
    if have:
        return "bf16-mixed", f"this CPU has {', '.join(have)}"
    return "32-true", "this CPU has neither AMX nor AVX512-BF16"


def check_finite(model: torch.nn.Module, what: str, precision: str, setting: str) -> None:
    """A UserError naming the parameters that hold NaN or inf after training at ``precision``. PyTorch's CPU bf16
    convolution backward gives the taps of a kernel that only ever cover padding (a 3x3 stride-2 conv on a 1x1
    map, as SwiftFormer's last downsampling at 16x16 inputs) garbage, NaN among it; the forward skips those taps,
    so accuracy and export parity looked fine, and ONNX Runtime's calibrator (which multiplies the padding) then
    failed with a bare 'scale issue'."""
    from .errors import UserError

    bad = [n for n, p in model.named_parameters() if not torch.isfinite(p).all()]
    if bad:
        fix = f"set {setting}: 32-true" if is_bf16(precision) else "lower the learning rate"
        raise UserError(f"{what} has NaN or inf in {len(bad)} parameter(s) after training at {precision} "
                        f"({', '.join(bad[:3])}{', ...' if len(bad) > 3 else ''}); {fix}")


def is_bf16(precision: str) -> bool:
    """Whether a Lightning precision name runs bf16 (``bf16-mixed``, ``bf16-true``, ``bf16``)."""
    return precision.startswith("bf16")


def autocast(precision: str, device: str = "cpu"):
    """A context for a forward pass at ``precision`` (a Lightning name): bf16 autocast for ``bf16-mixed``,
    nothing for the rest, nor on a device autocast does not support (the meta device the tests use)."""
    if not is_bf16(precision) or not torch.amp.is_autocast_available(device):
        return contextlib.nullcontext()
    return torch.autocast(device, dtype=torch.bfloat16)
