"""Files -> measurements. A Device measures (or, labelled so, estimates) a model file on a target.

Never imports compressor or exporters: it takes files and their format.
"""
from __future__ import annotations

from typing import Protocol

from .measurement import Measurement
from .profile import DeviceError, DeviceProfile, builtin_profiles, load_profile


class Device(Protocol):
    profile: DeviceProfile

    def available(self) -> bool: ...
    def why_unavailable(self) -> str | None: ...
    def measure(self, model, *, batch: int = 1, warmup: int = 10, runs: int = 100,
                max_seconds: float = 30.0, precision: str = "fp32", dims: dict | None = None) -> Measurement: ...


def _onnxruntime(profile):
    from .cpu import OnnxRuntimeCPU

    return OnnxRuntimeCPU(profile)


def _openvino(profile):
    from .openvino import OpenVINODevice

    return OpenVINODevice(profile)


def _tensorrt(profile):
    from .gpu import GPUDevice

    return GPUDevice(profile)


def _vela(profile):
    from .ethos import EthosUEstimator

    return EthosUEstimator(profile)


# runtime name -> factory(profile) -> Device
DEVICES = {"onnxruntime": _onnxruntime, "openvino": _openvino, "tensorrt": _tensorrt, "vela": _vela}


def get_device(profile: DeviceProfile | str) -> Device:
    if isinstance(profile, str):
        profile = load_profile(profile)
    try:
        factory = DEVICES[profile.runtime]
    except KeyError:
        raise DeviceError(f"device {profile.name}: no backend for runtime {profile.runtime!r} "
                          f"(known: {', '.join(DEVICES)})") from None
    if not profile.local:
        # A board over SSH: the runtime's standalone script runs there (devices/remote.py). Runtimes
        # without such a script keep their own device, which reports the remote board unavailable.
        from .remote import SCRIPTS, RemoteDevice

        if profile.runtime in SCRIPTS:
            return RemoteDevice(profile)
    return factory(profile)


__all__ = ["DEVICES", "Device", "DeviceError", "DeviceProfile", "Measurement", "builtin_profiles",
           "get_device", "load_profile"]
