"""OpenVINO on the local CPU or an Intel NPU: real measurements of an IR (.xml) or an ONNX file.

The inference precision is always set explicitly (INFERENCE_PRECISION_HINT) and what ran is read back
from the compiled model: on CPUs with AMX, OpenVINO's default is bf16 even for an fp32 model.
"""
from __future__ import annotations

from pathlib import Path

from .bench_openvino import HINTS  # the same precision hints a remote board gets
from .measurement import Measurement
from .profile import DeviceError, DeviceProfile, check_ready, script_errors

NOISY_CV = 0.5


class OpenVINODevice:
    def __init__(self, profile: DeviceProfile):
        self.profile = profile
        self.target = str(profile.options.get("device", "CPU")).upper()

    def available(self) -> bool:
        return self.why_unavailable() is None

    def why_unavailable(self) -> str | None:
        if not self.profile.local:
            return (f"{self.profile.name} is reached over {self.profile.connection}: this class measures here; "
                    "get_device() gives a remote board a devices.remote.RemoteDevice")
        try:
            import openvino as ov
        except ImportError:
            return "OpenVINO is not installed (pip install 'compressor[openvino]')"
        found = ov.Core().available_devices
        if not any(d.split(".")[0] == self.target for d in found):
            return (f"OpenVINO finds no {self.target} device here (available: {', '.join(found) or 'none'}); "
                    f"the {self.target} plugin needs the device and its driver")
        return None

    def _hint(self, precision: str) -> str:
        family = self.target.split(".")[0]
        try:
            return HINTS[family][precision]
        except KeyError:
            raise DeviceError(f"device {self.profile.name}: OpenVINO {family} cannot run precision "
                              f"{precision!r}") from None

    def measure(self, model: str | Path, *, batch: int = 1, warmup: int = 10, runs: int = 100,
                max_seconds: float = 30.0, precision: str = "fp32", dims: dict | None = None) -> Measurement:
        """Time ``runs`` synchronous inferences of ``model`` (.xml IR or .onnx) after ``warmup``, with
        the same code a remote board runs (devices/bench_openvino.py).

        ``dims`` gives full shapes for inputs with dynamic axes other than the batch: {name: [..]}.
        """
        from . import bench_openvino

        check_ready(self, precision)
        self._hint(precision)  # a precision the device family cannot run is this device's error
        model = Path(model)
        if model.suffix not in (".xml", ".onnx") or not model.is_file():
            raise DeviceError(f"device {self.profile.name}: {model} is not an OpenVINO .xml or .onnx file")
        with script_errors(self.profile.name):  # unreadable model, shapes, compile, synthetic inputs
            r = bench_openvino.measure(str(model), batch=batch, threads=self.profile.threads, warmup=warmup,
                                       runs=runs, max_seconds=max_seconds, shapes=dims, precision=precision,
                                       device=self.target)
        m = Measurement(device=self.profile.name, precision=precision, artifact=model.name, **r)
        if m.cv > NOISY_CV:
            m.notes.append(f"wide spread: coefficient of variation {m.cv:.2f}")
        return m
