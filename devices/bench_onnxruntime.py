#!/usr/bin/env python3
"""Measure the latency of an ONNX model with ONNX Runtime: a self-contained script.

It needs only onnxruntime and numpy, so it runs on a board that has no training stack. The toolchain
imports it for local measurements, copies it into every bundle as ``bench.py``, and ships it to remote
devices over SSH (devices/remote.py): one measurement procedure everywhere.

    python bench.py model.onnx --batch 1 --threads 2 --warmup 20 --runs 200

prints one JSON object (latencies in milliseconds).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time


# x86 CPUs with one of these multiply u8 x s8 with a 32-bit dot product (VNNI). Without them ONNX Runtime's
# and OpenVINO's int8 kernels use vpmaddubsw, which adds each pair of u8 x s8 products in int16 and saturates
# when weights use the full int8 range (measured on an AVX2 AMD EPYC host: a QDQ Linear 8-16-4 off by 8-48% of
# its output range in both runtimes; 7-bit weights, ORT's reduce_range or NNCF's overflow fix, do not saturate).
VNNI_FLAGS = ("avx512_vnni", "avx_vnni", "amx_int8")


def cpu_flags() -> set[str]:
    """The CPU's feature flags from /proc/cpuinfo (x86 'flags', Arm 'Features'); empty where unreadable."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def int8_saturates(machine: str | None = None, flags: set[str] | None = None) -> bool | None:
    """Whether this CPU's u8 x s8 int8 kernels saturate on full-range int8 weights: an x86 CPU without VNNI.
    None where the flags cannot be read (not Linux); False on other architectures."""
    machine = (machine or platform.machine()).lower()
    if machine not in ("x86_64", "amd64", "i386", "i686", "x86"):
        return False
    flags = cpu_flags() if flags is None else flags
    if not flags:
        return None
    return not any(f in flags for f in VNNI_FLAGS)


def host_info() -> dict:
    """CPU model, core count, frequency governor and whether int8 kernels saturate, where the OS says."""
    info = {"machine": platform.machine(), "system": platform.system(), "cpus": os.cpu_count()}
    saturates = int8_saturates()
    if saturates is not None:
        info["int8_saturates"] = saturates
    if hasattr(os, "sched_getaffinity"):
        info["cpus_allowed"] = len(os.sched_getaffinity(0))  # what this process may use (taskset, cgroups)
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("model name", "Model")):
                    info["cpu_model"] = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    try:
        with open("/sys/devices/system/cpu/cpu0/cpufreq/scaling_governor") as f:
            info["governor"] = f.read().strip()
    except OSError:
        pass
    return info


def _dtype(onnx_type: str):
    import numpy as np

    return {
        "tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(double)": np.float64,
        "tensor(int64)": np.int64, "tensor(int32)": np.int32, "tensor(int8)": np.int8,
        "tensor(uint8)": np.uint8, "tensor(bool)": np.bool_,
    }[onnx_type]


def make_inputs(session, batch: int, dims: dict | None = None, seed: int = 0) -> dict:
    """Random inputs that fit the session's declared inputs; symbolic dims: batch first, then ``dims``."""
    import numpy as np

    rng = np.random.default_rng(seed)
    dims = dims or {}
    feeds = {}
    for i in session.get_inputs():
        shape = []
        for k, d in enumerate(i.shape):
            if isinstance(d, int) and d > 0:
                shape.append(d)
            elif isinstance(d, str) and d in dims:
                shape.append(int(dims[d]))
            elif k == 0:
                shape.append(batch)
            else:
                raise SystemExit(f"input {i.name!r} has a symbolic dimension {d!r}: pass --dim {d}=N")
        dt = _dtype(i.type)
        if np.issubdtype(dt, np.floating):
            feeds[i.name] = rng.standard_normal(shape).astype(dt)
        elif "mask" in i.name:
            feeds[i.name] = np.ones(shape, dtype=dt)
        else:
            feeds[i.name] = np.zeros(shape, dtype=dt)
    return feeds


def synthetic_failed(model: str, e: Exception) -> str:
    """The one-line error of a model that does not run on the inputs make_inputs (or the OpenVINO script) feeds."""
    return (f"{os.path.basename(model)} does not run on the synthetic inputs the benchmark feeds (random floats, token "
            f"ids 0, masks 1), which a model that reads its ids (BART pools its <eos> positions) may refuse: "
            f"{type(e).__name__}: {str(e).strip().splitlines()[0][:200] if str(e).strip() else ''}")


def summarize(lat_ms: list[float]) -> dict:
    import numpy as np

    a = np.asarray(lat_ms, dtype=np.float64)
    mean = float(a.mean())
    return {
        "p50_ms": float(np.percentile(a, 50)), "p90_ms": float(np.percentile(a, 90)),
        "p99_ms": float(np.percentile(a, 99)), "mean_ms": mean, "std_ms": float(a.std()),
        "min_ms": float(a.min()), "cv": float(a.std() / mean) if mean > 0 else 0.0, "runs": int(a.size),
    }


def _cv(xs) -> float:
    n = len(xs)
    mean = sum(xs) / n
    return (sum((x - mean) ** 2 for x in xs) / n) ** 0.5 / mean if mean > 0 else 0.0


def time_runs(run, runs: int, max_seconds: float, target_cv: float = 0.0, window: int = 20):
    """Milliseconds per ``run()``: up to ``runs`` calls, at least 5, stopping at ``max_seconds``; with
    ``target_cv`` > 0 also once the last ``window`` calls have a coefficient of variation <= target_cv
    (the spread is stable, more runs would not change the percentiles much). Returns (latencies, why
    it stopped: "stable", "runs" or "time")."""
    window = max(int(window), 5)
    lat = []
    deadline = time.perf_counter() + max_seconds
    while len(lat) < runs:
        if len(lat) >= 5 and time.perf_counter() >= deadline:
            return lat, "time"
        t0 = time.perf_counter()
        run()
        lat.append((time.perf_counter() - t0) * 1e3)
        if target_cv > 0 and len(lat) >= window and _cv(lat[-window:]) <= target_cv:
            return lat, "stable"
    return lat, "runs"


def cpu_snapshot() -> tuple:
    """(wall s, this process's CPU s over all its threads, all CPUs' busy s or None, CPU count). Busy
    time is /proc/stat's (Linux: user, nice, system, irq, softirq, steal), so None elsewhere."""
    wall, own, busy = time.perf_counter(), time.process_time(), None
    try:
        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:]]
        busy = (v[0] + v[1] + v[2] + v[5] + v[6] + (v[7] if len(v) > 7 else 0)) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, AttributeError):
        pass
    return wall, own, busy, os.cpu_count() or 1


def contention(before: tuple, after: tuple) -> dict:
    """Cores other processes kept busy while we timed (busy time of all CPUs minus our own CPU time,
    per second of wall time), and cores we used. A run with N threads on a machine with C cores is
    undisturbed only while the others leave N cores free: on a shared 2-core machine a 2-thread run
    otherwise runs at its 1-thread speed, and the fastest run of the window is no longer repeatable."""
    wall = max(after[0] - before[0], 1e-9)
    own = (after[1] - before[1]) / wall
    d = {"own_cores": round(own, 3), "cpus": after[3]}
    if before[2] is not None and after[2] is not None:
        d["other_cores"] = round(max(0.0, (after[2] - before[2]) / wall - own), 3)
    return d


def stability(lat: list, stop: str, target_cv: float, window: int) -> dict:
    """How the timing loop ended, and the spread of its last window: goes into Measurement.extra."""
    w = lat[-max(int(window), 5):]
    d = {"stop": stop, "window": len(w), "window_cv": _cv(w) if w else 0.0}
    if target_cv > 0:
        d["target_cv"] = target_cv
        d["stable"] = stop == "stable"
    return d


def measure(model: str, batch: int = 1, threads: int = 0, warmup: int = 10, runs: int = 100,
            max_seconds: float = 30.0, dims: dict | None = None, providers: list | None = None,
            target_cv: float = 0.0, window: int = 20) -> dict:
    """Warm up, then time up to ``runs`` single inferences (stopping early at ``max_seconds``, or, with
    ``target_cv`` > 0, once the last ``window`` runs vary by at most that coefficient of variation)."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = int(threads)  # 0 lets ONNX Runtime choose
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    session = ort.InferenceSession(model, so, providers=providers or ["CPUExecutionProvider"])
    feeds = make_inputs(session, batch, dims)
    try:
        session.run(None, feeds)
    except Exception as e:  # a graph that depends on the values (BART pools the positions of its <eos> id)
        raise SystemExit(synthetic_failed(model, e)) from None
    for _ in range(max(warmup, 1) - 1):
        session.run(None, feeds)
    before = cpu_snapshot()
    lat, stop = time_runs(lambda: session.run(None, feeds), runs, max_seconds, target_cv, window)
    busy = contention(before, cpu_snapshot())
    peak_rss_mb = None
    try:
        import resource

        peak_rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # KiB on Linux
    except (ImportError, OSError):
        pass
    return {
        "runtime": "onnxruntime", "runtime_version": ort.__version__,
        "provider": session.get_providers()[0], "batch": batch, "threads": int(threads),
        "warmup": warmup, "input_shapes": {k: list(v.shape) for k, v in feeds.items()},
        "peak_rss_mb": peak_rss_mb, "host": host_info(), "estimated": False,
        **summarize(lat), "extra": {**stability(lat, stop, target_cv, window), **busy},
    }


def shape_arg(text: str) -> tuple[str, list[int]]:
    """argparse type for ``--shape NAME=D0,D1,..`` (the OpenVINO and trtexec scripts' full input shapes)."""
    name, _, dims = text.rpartition("=")
    if not name or not dims:
        raise argparse.ArgumentTypeError(f"{text!r}: expected NAME=D0,D1,...")
    try:
        return name, [int(d) for d in dims.replace("x", ",").split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected NAME=D0,D1,... (whole numbers)") from None


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("model")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--threads", type=int, default=0, help="intra-op threads (0: runtime default)")
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--runs", type=int, default=100)
    p.add_argument("--max-seconds", type=float, default=30.0)
    p.add_argument("--dim", action="append", default=[], help="symbolic dimension, e.g. sequence=128")
    p.add_argument("--target-cv", type=float, default=0.0,
                   help="stop before --runs once the last --window runs have this coefficient of variation "
                        "or less (0: always time --runs)")
    p.add_argument("--window", type=int, default=20, help="runs in the stability window (at least 5)")
    a = p.parse_args(argv)
    dims = dict(d.split("=", 1) for d in a.dim)
    r = measure(a.model, a.batch, a.threads, a.warmup, a.runs, a.max_seconds, dims,
                target_cv=a.target_cv, window=a.window)
    json.dump(r, sys.stdout, indent=2)
    print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
