"""NVIDIA GPUs: a TensorRT engine timed with CUDA events; else ONNX Runtime's CUDA provider; else the
PyTorch model on CUDA (CUDA graphs for small batches). The Measurement's ``runtime`` says which.

What runs depends on the file: ``.engine``/``.plan`` -> TensorRT; ``.onnx`` -> ONNX Runtime CUDA;
``.pt2`` (torch.export) or an ``nn.Module`` -> PyTorch. An engine carries a ``<engine>.json`` sidecar
(written by exporters.tensorrt) with the GPU compute capability and TensorRT version that built it;
an engine built elsewhere is refused with a one-line reason instead of a deserialization crash.
Nothing here is importable on a machine without CUDA, and nothing is imported until a measurement.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

from .measurement import Measurement
from .profile import DeviceError, DeviceProfile, check_ready, script_errors

NOISY_CV = 0.5
CUDA_GRAPH_MAX_BATCH = 8  # launch overhead matters below this; larger batches are compute-bound


def _torch_cuda():
    try:
        import torch
    except ImportError:
        return None
    return torch if torch.cuda.is_available() else None


def _trt():
    try:
        import tensorrt as trt
    except ImportError:  # the -bindings wheels install without libnvinfer and fail here, too
        return None
    except OSError:
        return None
    return trt


def _ort_cuda() -> bool:
    try:
        import onnxruntime as ort
    except ImportError:
        return False
    return "CUDAExecutionProvider" in ort.get_available_providers()


def gpu_host() -> dict:
    torch = _torch_cuda()
    if torch is None:
        return {}
    major, minor = torch.cuda.get_device_capability(0)
    props = torch.cuda.get_device_properties(0)
    return {"gpu": torch.cuda.get_device_name(0), "compute_capability": f"{major}.{minor}",
            "gpu_memory_gb": round(props.total_memory / 2**30, 1), "cuda": torch.version.cuda,
            "torch": torch.__version__}


def _summary(lat: list[float]) -> dict:
    from .bench_onnxruntime import summarize

    return summarize(lat)


def time_cuda(fn, stream, *, warmup: int, runs: int, max_seconds: float) -> list[float]:
    """Milliseconds per call of ``fn`` (which enqueues work on ``stream``), timed with CUDA events."""
    import torch

    for _ in range(max(warmup, 1)):
        fn()
    torch.cuda.synchronize()
    lat = []
    deadline = time.perf_counter() + max_seconds
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    while len(lat) < runs and (len(lat) < 5 or time.perf_counter() < deadline):
        start.record(stream)
        fn()
        end.record(stream)
        end.synchronize()
        lat.append(start.elapsed_time(end))
    return lat


class GPUDevice:
    def __init__(self, profile: DeviceProfile):
        self.profile = profile

    def available(self) -> bool:
        return self.why_unavailable() is None

    def runtimes(self) -> list[str]:
        """The runtimes that can run here, best first."""
        torch = _torch_cuda()
        out = []
        if torch is not None and _trt() is not None:
            out.append("tensorrt")
        if _ort_cuda():
            out.append("onnxruntime-cuda")
        if torch is not None:
            out.append("torch-cuda")
        return out

    def why_unavailable(self) -> str | None:
        if not self.profile.local:
            return (f"{self.profile.name} is reached over {self.profile.connection}: this class measures here; "
                    "get_device() gives a remote board a devices.remote.RemoteDevice")
        if not self.runtimes():
            return ("no CUDA GPU here: torch.cuda.is_available() is False, TensorRT is not installed and "
                    "ONNX Runtime has no CUDAExecutionProvider")
        return None

    def measure(self, model, *, batch: int = 1, warmup: int = 10, runs: int = 100, max_seconds: float = 30.0,
                precision: str = "fp32", dims: dict | None = None, example=None) -> Measurement:
        """Time ``model`` (an engine, ONNX or .pt2 path, or an nn.Module) at ``batch``.

        ``example``: one input tensor (any batch) for an nn.Module; a .pt2 uses its own example inputs.
        """
        check_ready(self, precision)
        if isinstance(model, (str, Path)):
            path = Path(model)
            if not path.is_file():
                raise DeviceError(f"device {self.profile.name}: {path} does not exist")
            if path.suffix in (".engine", ".plan", ".trt"):
                m = self._tensorrt(path, batch, warmup, runs, max_seconds, precision)
            elif path.suffix == ".onnx":
                m = self._onnxruntime(path, batch, warmup, runs, max_seconds, precision, dims)
            elif path.suffix == ".pt2":
                import torch

                ep = torch.export.load(str(path))
                ex = example if example is not None else ep.example_inputs[0][0]
                m = self._torch(ep.module(), ex, batch, warmup, runs, max_seconds, precision)
            else:
                raise DeviceError(f"device {self.profile.name}: cannot run {path.name} "
                                  "(an .engine/.plan, .onnx or .pt2 file, or an nn.Module)")
            m.artifact = path.name
        else:
            if example is None:
                raise DeviceError(f"device {self.profile.name}: timing an nn.Module needs example=<an input tensor>")
            m = self._torch(model, example, batch, warmup, runs, max_seconds, precision)
            m.artifact = type(model).__name__
        if m.cv > NOISY_CV:
            m.notes.append(f"wide spread: coefficient of variation {m.cv:.2f}")
        return m

    # ------------------------------------------------------------------------------- TensorRT

    def _tensorrt(self, path: Path, batch, warmup, runs, max_seconds, precision) -> Measurement:
        import numpy as np

        trt, torch = _trt(), _torch_cuda()
        if trt is None or torch is None:
            raise DeviceError(f"device {self.profile.name}: {path.name} is a TensorRT engine, but TensorRT "
                              f"{'is not installed' if trt is None else 'needs torch with CUDA for its buffers here'}")
        host = gpu_host()
        side = path.with_name(path.name + ".json")
        built = json.loads(side.read_text()) if side.is_file() else {}
        if built:
            if built.get("compute_capability") != host["compute_capability"]:
                raise DeviceError(f"engine {path.name} was built for compute capability "
                                  f"{built.get('compute_capability')} ({built.get('gpu', '?')}), this GPU is "
                                  f"{host['compute_capability']} ({host['gpu']}): rebuild it here with its "
                                  "build_*.sh script or export_tensorrt")
            if built.get("tensorrt", "").split(".")[:2] != trt.__version__.split(".")[:2]:
                raise DeviceError(f"engine {path.name} was built with TensorRT {built.get('tensorrt')}, this is "
                                  f"TensorRT {trt.__version__}: rebuild it here")
            if built.get("precision") and built["precision"] != precision:
                raise DeviceError(f"engine {path.name} was built for {built['precision']}, not {precision}")
        logger = trt.Logger(trt.Logger.ERROR)
        engine = trt.Runtime(logger).deserialize_cuda_engine(path.read_bytes())
        if engine is None:
            raise DeviceError(f"TensorRT {trt.__version__} cannot load engine {path.name} on {host['gpu']} "
                              "(built for another GPU or TensorRT version?): rebuild it here")
        ctx = engine.create_execution_context()
        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        inputs = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        shapes = {}
        for n in inputs:
            shape = [batch if (k == 0 and d < 0) else d for k, d in enumerate(engine.get_tensor_shape(n))]
            if any(d < 0 for d in shape) or not ctx.set_input_shape(n, shape):
                lo, _, hi = engine.get_tensor_profile_shape(n, 0) if any(
                    d < 0 for d in engine.get_tensor_shape(n)) else (shape, shape, shape)
                raise DeviceError(f"engine {path.name}: input {n} shape {shape} is outside its optimisation "
                                  f"profile ({list(lo)} .. {list(hi)})")
            shapes[n] = shape
        torch.cuda.reset_peak_memory_stats()
        buffers = {}
        for n in names:
            shape = tuple(ctx.get_tensor_shape(n))
            dt = torch.from_numpy(np.empty(0, dtype=trt.nptype(engine.get_tensor_dtype(n)))).dtype
            t = torch.empty(shape, dtype=dt, device="cuda")
            if n in shapes:
                t.normal_() if t.is_floating_point() else t.zero_()
            buffers[n] = t
            ctx.set_tensor_address(n, t.data_ptr())
        stream = torch.cuda.Stream()
        lat = time_cuda(lambda: ctx.execute_async_v3(stream.cuda_stream), stream, warmup=warmup, runs=runs,
                        max_seconds=max_seconds)
        dev_mem = getattr(engine, "device_memory_size_v2", None) or getattr(engine, "device_memory_size", 0)
        return Measurement(device=self.profile.name, runtime="tensorrt", runtime_version=trt.__version__,
                           precision=precision, batch=batch, threads=0, input_shapes=shapes, warmup=warmup,
                           provider="TensorRT", host=host, estimated=False,
                           peak_rss_mb=(torch.cuda.max_memory_allocated() + int(dev_mem)) / 2**20,
                           extra={"timer": "cuda events", "engine_built_for": built or None,
                                  "activation_memory_mb": int(dev_mem) / 2**20},
                           **_summary(lat))

    # --------------------------------------------------------------------------- ONNX Runtime

    def _onnxruntime(self, path: Path, batch, warmup, runs, max_seconds, precision, dims) -> Measurement:
        from . import bench_onnxruntime

        if not _ort_cuda():
            raise DeviceError(f"device {self.profile.name}: {path.name} is ONNX but ONNX Runtime has no "
                              "CUDAExecutionProvider here (install onnxruntime-gpu), and TensorRT needs an "
                              "engine: build one with exporters.tensorrt, or pass a .pt2 for PyTorch")
        with script_errors(self.profile.name):
            r = bench_onnxruntime.measure(str(path), batch=batch, threads=0, warmup=warmup, runs=runs,
                                          max_seconds=max_seconds, dims=dims,
                                          providers=["CUDAExecutionProvider", "CPUExecutionProvider"])
        if r["provider"] != "CUDAExecutionProvider":
            # ORT falls back to the CPU silently when CUDA libraries or the GPU are missing.
            raise DeviceError(f"device {self.profile.name}: ONNX Runtime fell back to {r['provider']} "
                              "(CUDA libraries missing?): not a GPU measurement")
        r["runtime"] = "onnxruntime-cuda"
        m = Measurement(device=self.profile.name, precision=precision, **{**r, "host": {**r["host"], **gpu_host()}})
        m.notes.append("wall-clock per session.run, host<->device copies included")
        return m

    # -------------------------------------------------------------------------------- PyTorch

    def _torch(self, module, example, batch, warmup, runs, max_seconds, precision) -> Measurement:
        torch = _torch_cuda()
        if torch is None:
            raise DeviceError(f"device {self.profile.name}: PyTorch has no CUDA here")
        dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}.get(precision)
        if dtype is None:
            raise DeviceError(f"device {self.profile.name}: the PyTorch path runs fp32/fp16/bf16, not "
                              f"{precision}; int8 runs through TensorRT with a QDQ ONNX")
        # fp32 means fp32: TF32 tensor cores would silently round matmuls/convs to 10-bit mantissas.
        tf32 = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
        try:
            module = module.eval().to("cuda", dtype)
            x = example[:1] if example.dim() > 0 else example
            x = x.expand(batch, *x.shape[1:]).contiguous().to("cuda", dtype)
            torch.cuda.reset_peak_memory_stats()
            notes, graphed = [], False
            with torch.inference_mode():
                fn = lambda: module(x)  # noqa: E731
                if batch <= CUDA_GRAPH_MAX_BATCH:
                    try:
                        side = torch.cuda.Stream()
                        side.wait_stream(torch.cuda.current_stream())
                        with torch.cuda.stream(side):
                            for _ in range(3):
                                module(x)
                        torch.cuda.current_stream().wait_stream(side)
                        graph = torch.cuda.CUDAGraph()
                        with torch.cuda.graph(graph):
                            module(x)
                        fn, graphed = graph.replay, True
                    except Exception as e:  # data-dependent control flow, CPU syncs, ...
                        notes.append(f"CUDA graph capture failed ({type(e).__name__}); timed eagerly")
                lat = time_cuda(fn, torch.cuda.current_stream(), warmup=warmup, runs=runs, max_seconds=max_seconds)
        finally:
            torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32
        return Measurement(device=self.profile.name, runtime="torch-cuda", runtime_version=torch.__version__,
                           precision=precision, batch=batch, threads=0, input_shapes={"input": list(x.shape)},
                           warmup=warmup, provider="CUDA graph" if graphed else "eager", host=gpu_host(),
                           estimated=False, peak_rss_mb=torch.cuda.max_memory_allocated() / 2**20, notes=notes,
                           extra={"timer": "cuda events", "cuda_graph": graphed, "tf32": False}, **_summary(lat))
