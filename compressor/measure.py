"""One measurement service: export a PyTorch model to ONNX once and time it on a device.

The search (compressor/search/latency.py), `compress calibrate` (compressor/calibrate.py) and latency
pruning (compressor/prune.py) all need "this model, on that device, in milliseconds at batch 1". A
``Meter`` does it for all of them:

- exports are made as the export stage makes the file a bundle ships (dynamic batch axis, the recipe's
  opset, checked against PyTorch, torch.export's exporter where a TorchScript trace does not match), so a
  budget is held by the graph that ships, not by a friendlier one (a ViT's batch-1 TorchScript graph timed
  0.079 ms where its shipped torch.export graph took 0.125);
- they go to one cache directory, named by a content hash of the model (its state_dict tensors, its
  architecture's repr and class) and of the example's input names, shapes and dtypes: the same model is
  exported once, and a changed weight is a new file;
- timings are cached by the ONNX file's sha256 (with the batch and the measurement settings): within a
  run, the same file has the same timing. A round robin (``latencies_ms``, or ``measure_file`` with
  ``fresh=True``) measures again on purpose: spreading repeated windows over every model is its point.

Two statistics, the ones their callers have always used: ``latency_ms`` is the p50 of one measurement
window (the search's figure); ``latencies_ms`` measures every model ``rounds`` times in turn and keeps
each one's fastest run (``min_ms``, or ``p50_ms`` for a device that reports no minimum): interference
from other processes only ever adds time, so on a shared machine the fastest run is the figure that
repeats (`compress calibrate`'s default, and latency pruning's).
"""
from __future__ import annotations

import hashlib
import io
import shutil
import tempfile
import weakref
from pathlib import Path

import torch
from torch import nn

# The measurement settings a Meter passes to Device.measure unless told otherwise.
DEFAULTS = {"warmup": 10, "runs": 100, "max_seconds": 2.0}


def model_key(model: nn.Module, example) -> str:
    """A content hash of ``model`` as an export would see it: every state_dict entry (name, dtype, shape,
    bytes), the architecture (class and repr) and the example's input names, shapes and dtypes."""
    h = hashlib.sha256()
    h.update(f"{type(model).__module__}.{type(model).__qualname__}\n{model!r}\n".encode())
    for name, v in model.state_dict().items():
        h.update(name.encode())
        if isinstance(v, torch.Tensor):
            h.update(f"{v.dtype}{tuple(v.shape)}".encode())
            h.update(_tensor_bytes(v))
        else:  # a module's extra state
            h.update(repr(v).encode())
    for name, v in (example.items() if isinstance(example, dict) else [("input", example)]):
        h.update(f"{name}:{tuple(v.shape)}:{v.dtype}".encode())
    return h.hexdigest()


def _tensor_bytes(t: torch.Tensor) -> bytes:
    t = t.detach().cpu()
    try:
        return t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
    except (RuntimeError, TypeError):  # a quantized or sparse tensor: its serialised form
        buf = io.BytesIO()
        torch.save(t, buf)
        return buf.getvalue()


def file_sha256(path: str | Path) -> str:
    """The sha256 of an ONNX file, with its external weights (``<name>.data``) when it has them."""
    from exporters.artifact import sha256

    path = Path(path)
    data = path.with_name(f"{path.name}.data")
    return sha256(path) + (f"+{sha256(data)}" if data.is_file() else "")


def fastest_ms(m) -> float:
    """A Measurement's fastest run (its p50 where the device reports no minimum)."""
    return float(getattr(m, "min_ms", None) or m.p50_ms)


class Meter:
    """Latency of PyTorch models on one ``device`` (a devices Device: ``measure(path, batch=, warmup=,
    runs=, max_seconds=)``) at batch 1, through ONNX. ``cache_dir``: where exports are kept (default: a
    temporary directory, removed by ``close()``, at the end of a ``with`` block, or when the Meter is
    garbage collected). ``warmup``, ``runs``, ``max_seconds``: the measurement settings."""

    def __init__(self, device, *, warmup: int = DEFAULTS["warmup"], runs: int = DEFAULTS["runs"],
                 max_seconds: float = DEFAULTS["max_seconds"], cache_dir: str | Path | None = None,
                 opset: int = 17, dynamic_batch: bool = True):
        self.device = device
        self.settings = {"warmup": warmup, "runs": runs, "max_seconds": max_seconds}
        self.opset, self.dynamic_batch = opset, dynamic_batch
        if cache_dir is None:
            self.cache_dir = Path(tempfile.mkdtemp(prefix="compressor-measure-"))
            self._cleanup = weakref.finalize(self, shutil.rmtree, str(self.cache_dir), True)
        else:
            self.cache_dir = Path(cache_dir)
            self.cache_dir.mkdir(parents=True, exist_ok=True)
            self._cleanup = None
        self._files: dict[str, Path] = {}  # model key -> its ONNX file in cache_dir
        self._digests: dict[Path, str] = {}  # a file of cache_dir -> its sha256 (content-addressed: fixed)
        self._dims: dict[Path, dict] = {}  # a file of cache_dir -> the sizes of its symbolic axes besides the batch
        self._shapes: dict[Path, dict] = {}  # a file of cache_dir -> each input's shape without the batch
        self.exporter: dict[Path, str] = {}  # a file exported by this Meter -> the exporter that made it
        self._timings: dict[tuple, object] = {}  # (sha256, batch, settings) -> Measurement
        self.exports = 0  # models exported (not found in the cache)
        self.measurements = 0  # device.measure calls

    def __enter__(self) -> Meter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Remove a temporary cache directory (one given to the constructor is kept)."""
        if self._cleanup is not None:
            self._cleanup()

    # ------------------------------------------------------------------------------ export

    def export(self, model: nn.Module, example) -> Path:
        """``model`` as an ONNX file, made as the export stage makes the file a bundle ships (the same
        exporter, opset and dynamic batch axis, checked against PyTorch at another batch size, torch.export
        where a TorchScript trace does not match: exporters.onnx.export_checked), so the latency a search or
        a pruning budget reads is the shipped graph's. Timed at batch 1 with ``example``'s first sample's
        shapes (a text encoder's sequence length). Exported once per content; the cached file otherwise.
        ``dynamic_batch=False``: a file fixed to that one sample, unchecked."""
        from exporters.onnx import export_checked, export_onnx

        from .tasks import as_tuple, onnx_io, take

        x = take(example, 1)
        key = model_key(model, x)
        if key in self._files:
            return self._files[key]
        path = self.cache_dir / f"{key[:32]}-{'batch' if self.dynamic_batch else 'b1'}-{self.opset}.onnx"
        if not path.is_file():  # else a cache directory given again: an earlier Meter exported it
            io = onnx_io(x, "output", dynamic_batch=self.dynamic_batch)
            if self.dynamic_batch:
                art = export_checked(model, as_tuple(_repeat(x, 2)), path, _repeat(x, 3), opset=self.opset,
                                     dynamic_batch=True, **io)
            else:
                art = export_onnx(model, as_tuple(x), path, opset=self.opset, dynamic_batch=False, **io)
            self.exporter[path] = art.extra["exporter"]
            self.exports += 1
        self._files[key], self._digests[path] = path, file_sha256(path)
        if self.dynamic_batch and isinstance(x, dict):
            # ONNX Runtime's scripts size the axis by its name; OpenVINO (its IR keeps no axis names) wants each
            # input's whole shape, the batch first.
            self._dims[path] = {"sequence": int(v.shape[1]) for v in x.values() if v.dim() == 2}
            self._shapes[path] = {k: list(v.shape[1:]) for k, v in x.items()}
        return path

    # ------------------------------------------------------------------------------ timing

    def measure_file(self, path: str | Path, batch: int = 1, *, fresh: bool = False, **kw):
        """The device's Measurement of an existing ONNX file. ``kw`` overrides the Meter's settings (and
        passes device options such as ``precision``). The same file (sha256), batch and settings give the
        same Measurement within this Meter, unless ``fresh`` asks for a new measurement window."""
        settings = {**self.settings, **kw}
        digest = self._digests.get(Path(path)) or file_sha256(path)
        key = (digest, batch, tuple(sorted((k, repr(v)) for k, v in settings.items())))
        if not fresh and key in self._timings:
            return self._timings[key]
        dims = self._dims.get(Path(path))
        if dims and getattr(getattr(self.device, "profile", None), "runtime", None) == "openvino":
            dims = {name: [batch, *shape] for name, shape in self._shapes[Path(path)].items()}
        m = self.device.measure(path, batch=batch, **({"dims": dims} if dims else {}), **settings)
        self.measurements += 1
        self._timings.setdefault(key, m)
        return m

    def latency_ms(self, model: nn.Module, example) -> float:
        """p50 milliseconds of one measurement window of ``model`` at batch 1 (exported and timed once per
        content within this Meter)."""
        return float(self.measure_file(self.export(model, example), 1).p50_ms)

    def latencies_ms(self, models, example, rounds: int = 3) -> list[float]:
        """Milliseconds at batch 1 for each of ``models``: each exported once, then all measured ``rounds``
        times in turn (round robin spreads a shared machine's slow spells over every model), keeping each
        one's fastest run. Models with the same content share one file and one figure."""
        paths = [self.export(m, example) for m in models]
        best = dict.fromkeys(paths, float("inf"))
        for _ in range(rounds):
            for path in best:
                best[path] = min(best[path], fastest_ms(self.measure_file(path, 1, fresh=True)))
        return [best[p] for p in paths]


def _repeat(x, n: int):
    """``x`` (one sample: a tensor, or a dict of tensors) as a batch of ``n`` copies."""
    if isinstance(x, dict):
        return {k: v.repeat(n, *[1] * (v.dim() - 1)) for k, v in x.items()}
    return x.repeat(n, *[1] * (x.dim() - 1))


def round_robin_ms(models, example, device, *, rounds: int = 3, warmup: int = 10, runs: int = 50,
                   max_seconds: float = 2.0, **export) -> list[float]:
    """Milliseconds at batch 1 for each model on ``device``, measured ``rounds`` times in turn, each one's
    fastest run kept (Meter.latencies_ms): round robin spreads a shared machine's slow
    spells over every model, and the fastest run is the figure that repeats. ``export``: the Meter's
    ``opset`` and ``dynamic_batch`` (the recipe's export section). Latency pruning's and prune.width.cost's."""
    with Meter(device, warmup=warmup, runs=runs, max_seconds=max_seconds, **export) as meter:
        return meter.latencies_ms(models, example, rounds=rounds)
