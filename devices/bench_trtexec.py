#!/usr/bin/env python3
"""Measure the latency of an ONNX model (or a prebuilt engine) with TensorRT's ``trtexec`` on the board.

It needs trtexec (JetPack: /usr/src/tensorrt/bin/trtexec), Python with numpy, and bench_onnxruntime.py
beside it (the shared statistics and host description). devices/remote.py copies both to a board over
SSH; the JSON it prints is the same contract as bench_onnxruntime.py. trtexec builds the engine on the
board itself (an engine runs only on the GPU and TensorRT version that built it), then times it:

    trtexec --onnx=model.onnx --shapes=input:1x3x224x224 [--fp16 | --int8 --fp16 | --noTF32]
            --warmUp=MS --iterations=N --duration=0 --exportTimes=times.json

Latencies are trtexec's per-query GPU compute times from ``--exportTimes`` (warm-up queries dropped,
as trtexec's own summary does); H2D + compute + D2H ("Latency") goes into ``extra``. Without a trace
the "GPU Compute Time: min = .., max = .., mean = .., median = .., percentile(..%) = .." summary line is
used instead, and the JSON says so.

    python bench.py model.onnx --batch 1 --precision int8 --shape input=1,3,224,224
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys

if __package__:  # imported as devices.bench_trtexec
    from .bench_onnxruntime import host_info, shape_arg, summarize
else:  # run as a script, bench_onnxruntime.py beside it
    from bench_onnxruntime import host_info, shape_arg, summarize

JETPACK_TRTEXEC = "/usr/src/tensorrt/bin/trtexec"
NOT_FOUND = ("trtexec not found on the board (looked for {where}): install TensorRT (JetPack ships "
             f"{JETPACK_TRTEXEC}) or set options.trtexec in the profile")


def find_trtexec(given: str | None = None) -> str:
    """The trtexec to run: ``given``, else the one on PATH, else JetPack's; SystemExit (one line) if none."""
    candidates = [given] if given else ["trtexec", JETPACK_TRTEXEC]
    for c in candidates:
        found = shutil.which(c)
        if found:
            return found
    raise SystemExit(NOT_FOUND.format(where=", ".join(candidates)))


def trtexec_args(model: str, *, precision: str = "fp32", shapes: dict | None = None, warmup_ms: int = 500,
                 runs: int = 100, times: str = "times.json") -> list[str]:
    """The trtexec arguments (without the program) that build ``model`` (.onnx) or load it (.engine or
    .plan) and time ``runs`` queries at ``shapes`` ({input: [dims]}, the inputs with dynamic axes)."""
    if model.endswith((".engine", ".plan")):
        args = [f"--loadEngine={model}"]
    else:
        args = [f"--onnx={model}"]
        if precision == "fp16":
            args.append("--fp16")
        elif precision == "int8":  # explicit quantization: int8 where the Q/DQ nodes say, fp16 elsewhere
            args += ["--int8", "--fp16"]
        elif precision == "fp32":
            args.append("--noTF32")  # fp32 means fp32: TensorRT would otherwise use TF32 on Ampere+
        else:
            raise SystemExit(f"trtexec: precision {precision!r}: expected fp32, fp16 or int8")
    if shapes:
        args.append("--shapes=" + ",".join(f"{n}:{'x'.join(str(int(d)) for d in s)}" for n, s in shapes.items()))
    # --duration is a minimum in trtexec: 0 makes --iterations the number of timed queries
    args += [f"--warmUp={int(warmup_ms)}", f"--iterations={int(runs)}", "--duration=0", f"--exportTimes={times}"]
    return args


_NUM = r"([-+0-9.eE]+|inf|nan)"
_PERF = re.compile(rf"^(?:\[[^\]]*\]\s*)*(?:\[I\]\s*)?(?P<what>[A-Za-z0-9 -]+?): min = {_NUM} ms, max = {_NUM} ms, "
                   rf"mean = {_NUM} ms, median = {_NUM} ms(?P<pct>(?:, percentile\([0-9.]+%\) = {_NUM} ms)*)")


def parse_summary(text: str) -> dict:
    """What trtexec's log says: the performance summary lines (min/max/mean/median/percentiles per metric,
    in ms), throughput, warm-up and trace counts, TensorRT version, the selected GPU and its compute
    capability. Missing lines are missing keys."""
    out: dict = {"metrics": {}}
    for line in text.splitlines():
        m = _PERF.search(line)
        if m:
            d = {"min": float(m.group(2)), "max": float(m.group(3)), "mean": float(m.group(4)),
                 "median": float(m.group(5))}
            for pct, v in re.findall(r"percentile\(([0-9.]+)%\) = ([-+0-9.eE]+|inf|nan) ms", m.group("pct")):
                d[f"p{float(pct):g}"] = float(v)
            out["metrics"][m.group("what").strip()] = d
            continue
        if (m := re.search(r"Throughput: ([0-9.eE+-]+) qps", line)):
            out["throughput_qps"] = float(m.group(1))
        elif (m := re.search(r"Warmup completed (\d+) queries over ([0-9.eE+-]+) ms", line)):
            out["warmup_queries"], out["warmup_ms"] = int(m.group(1)), float(m.group(2))
        elif (m := re.search(r"Timing trace has (\d+) queries over ([0-9.eE+-]+) s", line)):
            out["queries"], out["timed_s"] = int(m.group(1)), float(m.group(2))
        elif (m := re.search(r"TensorRT version: ([0-9][0-9.]*)", line)):
            out["tensorrt_version"] = m.group(1)
        elif "tensorrt_version" not in out and (m := re.search(r"\[TensorRT v(\d+)\]", line)):
            v = m.group(1)  # 100300 -> 10.3.0, 8602 -> 8.6.2
            out["tensorrt_version"] = (f"{int(v[:-4])}.{int(v[-4:-2])}.{int(v[-2:])}" if len(v) >= 6
                                       else f"{int(v[:-3])}.{int(v[-3:-2])}.{int(v[-2:])}" if len(v) >= 4 else v)
        elif (m := re.search(r"Selected Device: (.+?)\s*$", line)):
            out["gpu"] = m.group(1)
        elif (m := re.search(r"Compute Capability: ([0-9.]+)", line)):
            out["compute_capability"] = m.group(1)
    return out


def parse_times(trace: list, warmup_ms: float) -> tuple[list[float], list[float]]:
    """(GPU compute ms, H2D + compute + D2H ms) per timed query of an ``--exportTimes`` trace: a list of
    {"startComputeMs", "computeMs", "latencyMs", ...}; queries that started computing before ``warmup_ms``
    are warm-up and dropped (trtexec's own rule; some versions export them, some do not)."""
    rows = [t for t in trace if isinstance(t, dict) and "computeMs" in t]
    timed = [t for t in rows if float(t.get("startComputeMs", warmup_ms)) >= warmup_ms] or rows
    return [float(t["computeMs"]) for t in timed], [float(t.get("latencyMs", t["computeMs"])) for t in timed]


def _last_error(text: str) -> str:
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    errors = [ln for ln in lines if "[E]" in ln or "Error" in ln or "error" in ln]
    last = (errors or lines or ["no output"])[-1]
    return re.sub(r"^(\[[^\]]*\]\s*)+", "", last)[:300]


def result(compute_ms: list, latency_ms: list, summary: dict, *, batch: int, threads: int, shapes: dict,
           precision: str, warmup_ms: int, command: list[str]) -> dict:
    """The measurement JSON (bench_onnxruntime's contract) from a parsed trace and log."""
    notes = []
    gpu = summary["metrics"].get("GPU Compute Time", {})
    if compute_ms:
        stats = summarize(compute_ms)
    elif gpu:  # no trace: trtexec's own summary (no spread beyond min/max)
        stats = {"p50_ms": gpu["median"], "p90_ms": gpu.get("p90", gpu.get("p95", gpu["max"])),
                 "p99_ms": gpu.get("p99", gpu["max"]), "mean_ms": gpu["mean"], "std_ms": 0.0, "min_ms": gpu["min"],
                 "cv": 0.0, "runs": int(summary.get("queries", 0))}
        notes.append("latencies from trtexec's GPU Compute Time summary (no --exportTimes trace): std and cv unknown")
    else:
        raise SystemExit("trtexec printed no timing (no --exportTimes trace and no GPU Compute Time line)")
    extra = {"stop": "runs", "statistic": "GPU compute time per query (trtexec computeMs)",
             "precision_flags": [a for a in command if a in ("--fp16", "--int8", "--noTF32")],
             "warmup_ms": warmup_ms, "trtexec": " ".join(command), "trtexec_summary": summary["metrics"]}
    if latency_ms:
        extra["latency_with_transfers"] = summarize(latency_ms)
    for k in ("throughput_qps", "warmup_queries", "queries", "timed_s"):
        if k in summary:
            extra[k] = summary[k]
    host = host_info()
    for k in ("gpu", "compute_capability"):
        if k in summary:
            host[k] = summary[k]
    return {"runtime": "tensorrt", "runtime_version": summary.get("tensorrt_version", "unknown"),
            "provider": "trtexec", "batch": batch, "threads": int(threads),
            "warmup": int(summary.get("warmup_queries", 0)), "input_shapes": {k: list(v) for k, v in shapes.items()},
            "peak_rss_mb": None, "host": host, "estimated": False, "notes": notes, **stats, "extra": extra}


def measure(model: str, batch: int = 1, threads: int = 0, runs: int = 100, warmup_ms: int = 500,
            shapes: dict | None = None, precision: str = "fp32", trtexec: str | None = None,
            timeout: float | None = None) -> dict:
    exe = find_trtexec(trtexec)
    shapes = shapes or {}
    times = "trtexec_times.json"
    args = trtexec_args(model, precision=precision, shapes=shapes, warmup_ms=warmup_ms, runs=runs, times=times)
    if os.path.exists(times):
        os.remove(times)
    try:
        r = subprocess.run([exe, *args], capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise SystemExit(f"trtexec did not finish within {timeout:.0f} s") from None
    log = (r.stdout or "") + (r.stderr or "")
    if r.returncode != 0:
        raise SystemExit(f"trtexec failed (exit status {r.returncode}): {_last_error(log)}")
    trace = []
    if os.path.exists(times):
        with open(times) as f:
            trace = json.load(f)
    compute, latency = parse_times(trace, warmup_ms)
    return result(compute, latency, parse_summary(log), batch=batch, threads=threads, shapes=shapes,
                  precision=precision, warmup_ms=warmup_ms, command=[os.path.basename(exe), *args])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("model", help="an .onnx file (built on the board) or an .engine/.plan built on it")
    p.add_argument("--batch", type=int, default=1, help="recorded; the batch is in --shape")
    p.add_argument("--threads", type=int, default=0, help="recorded only (TensorRT runs on the GPU)")
    p.add_argument("--warmup", type=int, default=10, help="accepted for the common CLI; trtexec warms up by time")
    p.add_argument("--warmup-ms", type=int, default=500, help="trtexec --warmUp (milliseconds)")
    p.add_argument("--runs", type=int, default=100, help="timed queries (trtexec --iterations, --duration=0)")
    p.add_argument("--max-seconds", type=float, default=30.0, help="accepted for the common CLI; trtexec runs --runs")
    p.add_argument("--precision", default="fp32", help="fp32 (--noTF32), fp16 (--fp16), int8 (a QDQ ONNX: --int8 --fp16)")
    p.add_argument("--shape", action="append", default=[], type=shape_arg, metavar="NAME=D0,D1,..",
                   help="shape of an input with dynamic axes (trtexec --shapes)")
    p.add_argument("--trtexec", default=None, help=f"the trtexec binary (default: PATH, then {JETPACK_TRTEXEC})")
    p.add_argument("--timeout", type=float, default=None, help="seconds for trtexec (build and timing)")
    p.add_argument("--target-cv", type=float, default=0.0, help="not supported by trtexec: --runs are timed")
    p.add_argument("--window", type=int, default=20, help="accepted for the common CLI")
    a = p.parse_args(argv)
    r = measure(a.model, a.batch, a.threads, a.runs, a.warmup_ms, dict(a.shape), a.precision, a.trtexec, a.timeout)
    if a.target_cv > 0:
        r["notes"].append(f"--target-cv {a.target_cv} ignored: trtexec times a fixed number of queries")
    json.dump(r, sys.stdout, indent=2)
    print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
