#!/usr/bin/env python3
"""Measure the latency of an OpenVINO IR (.xml + .bin) or ONNX model with OpenVINO: a standalone script.

It needs only openvino and numpy on the board, plus bench_onnxruntime.py beside it (the shared timing
loop, statistics and host description; it imports onnxruntime only to measure with it). devices/remote.py
copies both to a board over SSH; the JSON it prints is the same contract as bench_onnxruntime.py.

    python bench.py model.xml --batch 1 --threads 4 --precision fp32 --shape input_ids=1,128

Shapes: OpenVINO keeps no axis names (an IR, and an ONNX read by OpenVINO, show '?'), so an input
with a dynamic axis besides the batch needs its full shape (``--shape NAME=D0,D1,..``); axis 0 that
is dynamic takes ``--batch``; a single ``--dim NAME=N`` fills the one dynamic axis besides the batch
(the caller resolves named ONNX axes into full shapes where it can). The inference precision is always
set (INFERENCE_PRECISION_HINT): on CPUs with AMX OpenVINO otherwise runs bf16 for an fp32 model.
"""
from __future__ import annotations

import argparse
import json
import sys

if __package__:  # imported as devices.bench_openvino
    from .bench_onnxruntime import host_info, shape_arg, stability, summarize, synthetic_failed, time_runs
else:  # run as a script, bench_onnxruntime.py beside it
    from bench_onnxruntime import host_info, shape_arg, stability, summarize, synthetic_failed, time_runs

# profile precision -> INFERENCE_PRECISION_HINT per device family (devices/openvino.py uses this table too).
# int8 models carry their own quantization (FakeQuantize from QDQ): what is not quantized runs at the
# hint, so f32 on CPUs (bf16 would change the numbers twice) and f16 on NPUs (which have no f32).
HINTS = {"CPU": {"fp32": "f32", "fp16": "f16", "bf16": "bf16", "int8": "f32"},
         "NPU": {"fp16": "f16", "int8": "f16"},
         "GPU": {"fp32": "f32", "fp16": "f16", "int8": "f16"}}
_OV_DTYPES = {"f32": "float32", "f16": "float16", "f64": "float64", "i64": "int64", "i32": "int32",
              "i8": "int8", "u8": "uint8", "boolean": "bool"}


def resolve_shapes(inputs, batch: int, shapes: dict | None = None, dims: dict | None = None) -> dict:
    """Static shapes for ``inputs``: (name, [size or None for dynamic]) pairs. A full shape from
    ``shapes`` wins; else a dynamic axis 0 is the batch; else one ``dims`` value fills the one dynamic
    axis besides the batch. Anything left is a SystemExit naming the input and what to pass."""
    shapes, dims = shapes or {}, dims or {}
    out = {}
    for name, partial in inputs:
        if name in shapes:
            full = [int(d) for d in shapes[name]]
            if len(full) != len(partial) or any(p is not None and p != f for p, f in zip(partial, full)):
                raise SystemExit(f"--shape {name}={','.join(map(str, full))} does not fit the model's "
                                 f"{['?' if p is None else p for p in partial]}")
            out[name] = full
            continue
        shape = []
        for k, d in enumerate(partial):
            if d is not None:
                shape.append(int(d))
            elif k == 0:
                shape.append(int(batch))
            elif len(dims) == 1:  # one size given, one unnamed axis besides the batch: that one
                shape.append(int(next(iter(dims.values()))))
            else:
                raise SystemExit(f"input {name!r} has a dynamic axis {k} besides the batch (OpenVINO keeps no "
                                 f"axis names): pass --shape {name}=<full shape>")
        out[name] = shape
    return out


def measure(model: str, batch: int = 1, threads: int = 0, warmup: int = 10, runs: int = 100,
            max_seconds: float = 30.0, shapes: dict | None = None, dims: dict | None = None,
            precision: str = "fp32", device: str = "CPU", target_cv: float = 0.0, window: int = 20) -> dict:
    """Compile ``model`` for ``device`` at static shapes, warm up, then time single synchronous
    inferences as bench_onnxruntime.measure does (runs, max_seconds, target_cv)."""
    import numpy as np
    import openvino as ov

    device = device.upper()
    family = device.split(".")[0]
    try:
        hint = HINTS[family][precision]
    except KeyError:
        raise SystemExit(f"OpenVINO {family} cannot run precision {precision!r}") from None
    core = ov.Core()
    try:
        net = core.read_model(model)  # an IR's .bin is found beside its .xml
    except Exception as e:
        raise SystemExit(f"OpenVINO cannot read {model}: {str(e).strip().splitlines()[-1][:200]}") from None
    partial = [(p.get_any_name(), [d.get_length() if d.is_static else None for d in p.get_partial_shape()])
               for p in net.inputs]
    static = resolve_shapes(partial, batch, shapes, dims)
    net.reshape(static)  # static shapes: the plugins compile faster kernels for them

    config = {"PERFORMANCE_HINT": "LATENCY"}
    supported = set(core.get_property(device, "SUPPORTED_PROPERTIES"))
    notes = []
    if "INFERENCE_PRECISION_HINT" in supported:
        config["INFERENCE_PRECISION_HINT"] = hint
    else:
        notes.append(f"{device} does not take INFERENCE_PRECISION_HINT; it runs its own precision")
    if threads and "INFERENCE_NUM_THREADS" in supported:
        config["INFERENCE_NUM_THREADS"] = int(threads)
    if "NUM_STREAMS" in supported:
        config["NUM_STREAMS"] = 1
    try:
        compiled = core.compile_model(net, device, config)
    except Exception as e:
        raise SystemExit(f"OpenVINO {device} cannot compile {model}: {str(e).strip().splitlines()[-1][:200]}") from None
    ran = {}
    for key in ("INFERENCE_PRECISION_HINT", "EXECUTION_DEVICES", "INFERENCE_NUM_THREADS", "NUM_STREAMS"):
        try:
            v = compiled.get_property(key)
            ran[key] = v.get_type_name() if hasattr(v, "get_type_name") else (
                [str(x) for x in v] if isinstance(v, (list, tuple)) else str(v))
        except Exception:  # not every plugin reports every property
            pass
    layer_precisions: dict = {}
    try:
        for op in compiled.get_runtime_model().get_ordered_ops():
            rt = op.get_rt_info()
            if "runtimePrecision" in rt:
                v = rt["runtimePrecision"]
                prec = str(v.astype(str) if hasattr(v, "astype") else v)
                layer_precisions[prec] = layer_precisions.get(prec, 0) + 1
    except Exception:
        pass

    rng = np.random.default_rng(0)
    feeds = {}
    for p in compiled.inputs:
        name = p.get_any_name()
        dt = np.dtype(_OV_DTYPES.get(p.get_element_type().get_type_name(), "float32"))
        shape = static[name]
        if np.issubdtype(dt, np.floating):
            feeds[name] = rng.standard_normal(shape).astype(dt)
        elif "mask" in name:
            feeds[name] = np.ones(shape, dtype=dt)
        else:
            feeds[name] = np.zeros(shape, dtype=dt)
    req = compiled.create_infer_request()
    try:
        req.infer(feeds)
    except Exception as e:
        raise SystemExit(synthetic_failed(model, e)) from None
    for _ in range(max(warmup, 1) - 1):
        req.infer(feeds)
    lat, stop = time_runs(lambda: req.infer(feeds), runs, max_seconds, target_cv, window)
    peak_rss_mb = None
    try:
        import resource

        peak_rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # KiB on Linux
    except (ImportError, OSError):
        pass
    try:
        full_name = str(core.get_property(device, "FULL_DEVICE_NAME"))
    except Exception:
        full_name = device
    return {
        "runtime": "openvino", "runtime_version": ov.get_version().split("-")[0], "provider": device,
        "batch": batch, "threads": int(threads), "warmup": warmup,
        "input_shapes": {k: list(v.shape) for k, v in feeds.items()}, "peak_rss_mb": peak_rss_mb,
        "host": {**host_info(), "device": full_name}, "estimated": False, "notes": notes,
        **summarize(lat),
        "extra": {**stability(lat, stop, target_cv, window), "build": ov.get_version(),
                  "inference_precision_hint": config.get("INFERENCE_PRECISION_HINT"), "compiled": ran,
                  "layer_precisions": layer_precisions},
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("model", help="an IR .xml (its .bin beside it) or an .onnx file")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--threads", type=int, default=0, help="INFERENCE_NUM_THREADS (0: runtime default)")
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--runs", type=int, default=100)
    p.add_argument("--max-seconds", type=float, default=30.0)
    p.add_argument("--precision", default="fp32", help="fp32, bf16, fp16 or int8: sets INFERENCE_PRECISION_HINT")
    p.add_argument("--device", default="CPU", help="OpenVINO device: CPU, GPU, NPU")
    p.add_argument("--shape", action="append", default=[], type=shape_arg, metavar="NAME=D0,D1,..",
                   help="full static shape of an input with dynamic axes")
    p.add_argument("--dim", action="append", default=[], metavar="NAME=N",
                   help="size of the one dynamic axis besides the batch (OpenVINO keeps no axis names)")
    p.add_argument("--target-cv", type=float, default=0.0,
                   help="stop before --runs once the last --window runs have this coefficient of variation "
                        "or less (0: always time --runs)")
    p.add_argument("--window", type=int, default=20, help="runs in the stability window (at least 5)")
    a = p.parse_args(argv)
    dims = dict(d.split("=", 1) for d in a.dim)
    r = measure(a.model, a.batch, a.threads, a.warmup, a.runs, a.max_seconds, dict(a.shape), dims,
                a.precision, a.device, a.target_cv, a.window)
    json.dump(r, sys.stdout, indent=2)
    print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
