"""OpenVINO on the local CPU or an Intel NPU: real measurements of an IR (.xml) or an ONNX file.

The inference precision is always set explicitly (INFERENCE_PRECISION_HINT) and what ran is read back
from the compiled model: on CPUs with AMX, OpenVINO's default is bf16 even for an fp32 model.
"""
from __future__ import annotations

import time
from pathlib import Path

from .measurement import Measurement
from .profile import DeviceError, DeviceProfile, check_ready

NOISY_CV = 0.5

# The precision the profile asks for -> INFERENCE_PRECISION_HINT. int8 models carry their own
# quantization (FakeQuantize from QDQ): what is not quantized runs at the hint, so f32 on CPUs (bf16
# would change the numbers twice) and f16 on NPUs (which have no f32).
HINTS = {"CPU": {"fp32": "f32", "fp16": "f16", "bf16": "bf16", "int8": "f32"},
         "NPU": {"fp16": "f16", "int8": "f16"},
         "GPU": {"fp32": "f32", "fp16": "f16", "int8": "f16"}}

_OV_DTYPES = {"f32": "float32", "f16": "float16", "f64": "float64", "i64": "int64", "i32": "int32",
              "i8": "int8", "u8": "uint8", "boolean": "bool"}


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
        """Time ``runs`` synchronous inferences of ``model`` (.xml IR or .onnx) after ``warmup``.

        ``dims`` gives full shapes for inputs with dynamic axes other than the batch: {name: [..]}.
        """
        import numpy as np
        import openvino as ov

        from .bench_onnxruntime import host_info, summarize

        check_ready(self, precision)
        model = Path(model)
        if model.suffix not in (".xml", ".onnx") or not model.is_file():
            raise DeviceError(f"device {self.profile.name}: {model} is not an OpenVINO .xml or .onnx file")
        hint = self._hint(precision)
        core = ov.Core()
        try:
            net = core.read_model(str(model))
        except Exception as e:
            raise DeviceError(f"OpenVINO cannot read {model.name}: {str(e).strip().splitlines()[-1][:200]}") from None
        dims = dims or {}
        shapes = {}
        for p in net.inputs:
            name = p.get_any_name()
            if name in dims:
                shapes[name] = [int(d) for d in dims[name]]
                continue
            ps = p.get_partial_shape()
            shape = []
            for k, d in enumerate(ps):
                if d.is_static:
                    shape.append(d.get_length())
                elif k == 0:
                    shape.append(batch)
                else:
                    raise DeviceError(f"input {name!r} has a dynamic axis {k} besides the batch: "
                                      f"pass dims={{'{name}': [full shape]}}")
            shapes[name] = shape
        net.reshape(shapes)  # static shapes: the plugins compile faster kernels for them

        config = {"PERFORMANCE_HINT": "LATENCY"}
        supported = set(core.get_property(self.target, "SUPPORTED_PROPERTIES"))
        notes = []
        if "INFERENCE_PRECISION_HINT" in supported:
            config["INFERENCE_PRECISION_HINT"] = hint
        else:
            notes.append(f"{self.target} does not take INFERENCE_PRECISION_HINT; it runs its own precision")
        if self.profile.threads and "INFERENCE_NUM_THREADS" in supported:
            config["INFERENCE_NUM_THREADS"] = self.profile.threads
        if "NUM_STREAMS" in supported:
            config["NUM_STREAMS"] = 1
        try:
            compiled = core.compile_model(net, self.target, config)
        except Exception as e:
            raise DeviceError(f"OpenVINO {self.target} cannot compile {model.name}: "
                              f"{str(e).strip().splitlines()[-1][:200]}") from None

        ran = {}
        for key in ("INFERENCE_PRECISION_HINT", "EXECUTION_DEVICES", "INFERENCE_NUM_THREADS", "NUM_STREAMS"):
            try:
                v = compiled.get_property(key)
                ran[key] = v.get_type_name() if hasattr(v, "get_type_name") else (
                    [str(x) for x in v] if isinstance(v, (list, tuple)) else str(v))
            except Exception:  # not every plugin reports every property
                pass
        # Which precision each executed layer actually ran in (the runtime graph's rt_info).
        layer_precisions: dict[str, int] = {}
        try:
            for op in compiled.get_runtime_model().get_ordered_ops():
                rt = op.get_rt_info()
                if "runtimePrecision" in rt:
                    prec = str(rt["runtimePrecision"].astype(str) if hasattr(rt["runtimePrecision"], "astype")
                               else rt["runtimePrecision"])
                    layer_precisions[prec] = layer_precisions.get(prec, 0) + 1
        except Exception:
            pass

        rng = np.random.default_rng(0)
        feeds = {}
        for p in compiled.inputs:
            name = p.get_any_name()
            dt = np.dtype(_OV_DTYPES.get(p.get_element_type().get_type_name(), "float32"))
            shape = shapes[name]
            if np.issubdtype(dt, np.floating):
                feeds[name] = rng.standard_normal(shape).astype(dt)
            elif "mask" in name:
                feeds[name] = np.ones(shape, dtype=dt)
            else:
                feeds[name] = np.zeros(shape, dtype=dt)
        req = compiled.create_infer_request()
        for _ in range(max(warmup, 1)):
            req.infer(feeds)
        lat = []
        deadline = time.perf_counter() + max_seconds
        while len(lat) < runs and (len(lat) < 5 or time.perf_counter() < deadline):
            t0 = time.perf_counter()
            req.infer(feeds)
            lat.append((time.perf_counter() - t0) * 1e3)
        peak_rss_mb = None
        try:
            import resource

            peak_rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
        except (ImportError, OSError):
            pass
        try:
            full_name = str(core.get_property(self.target, "FULL_DEVICE_NAME"))
        except Exception:
            full_name = self.target
        m = Measurement(device=self.profile.name, runtime="openvino", runtime_version=ov.get_version().split("-")[0],
                        precision=precision, batch=batch, threads=self.profile.threads,
                        input_shapes={k: list(v.shape) for k, v in feeds.items()}, warmup=warmup,
                        provider=self.target, peak_rss_mb=peak_rss_mb, host={**host_info(), "device": full_name},
                        estimated=False, artifact=model.name, notes=notes,
                        extra={"build": ov.get_version(), "inference_precision_hint": config.get("INFERENCE_PRECISION_HINT"),
                               "compiled": ran, "layer_precisions": layer_precisions},
                        **summarize(lat))
        if m.cv > NOISY_CV:
            m.notes.append(f"wide spread: coefficient of variation {m.cv:.2f}")
        return m
