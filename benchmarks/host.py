"""What a benchmark records about the machine it ran on: the CPU and its flags (bf16 and int8 paths depend
on them), cores, threads, load, and the versions that matter, read the way the device scripts read them."""
from __future__ import annotations

import os
import platform
import time
from importlib import metadata
from pathlib import Path

FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile", "amx_bf16")
ROOT = Path(__file__).resolve().parent.parent  # the repository


def repo_path(path) -> str:
    """``path`` as a results file records it: relative to the repository root; ``~/...`` under the home
    directory (the teacher cache); else only its name. Never an absolute path of the machine that ran."""
    p = Path(path).expanduser().resolve()
    for base, prefix in ((ROOT, ""), (Path.home().resolve(), "~/")):
        if p.is_relative_to(base):
            rel = p.relative_to(base).as_posix()
            return prefix + rel if rel != "." else (prefix.rstrip("/") or ".")
    return f"<outside the repository>/{p.name}"


def machine(dists=("compressor", "pytorch-lightning", "onnx"), **extra) -> dict:
    """The machine record; ``dists`` are the distributions whose versions to add (None where missing)."""
    import onnxruntime
    import torch

    from devices.bench_onnxruntime import cpu_flags, host_info

    flags = cpu_flags()
    versions = {"python": platform.python_version(), "torch": torch.__version__, "onnxruntime": onnxruntime.__version__}
    for dist in dists:
        try:
            versions[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            versions[dist] = None
    return {"cpu": host_info().get("cpu_model", "unknown"), "cpu_flags": {f: f in flags for f in FLAGS},
            "cores": os.cpu_count(), "platform": platform.platform(), "torch_threads": torch.get_num_threads(),
            **extra, "load_average": [round(v, 2) for v in os.getloadavg()], "versions": versions,
            "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}


def interleaved_p50(files: list, rounds: int, max_seconds: float, batches=(1, 32), log=None) -> dict:
    """Each of ``files`` ((path, precision) pairs) timed on local-cpu at each batch size in ``rounds`` round-robin
    rounds, 20 warm-up and up to 200 runs each: {(index, batch): the best p50 in ms}. A slow spell of the shared
    machine hits every file alike, where files timed in separate runs each meet their own moment of load."""
    from devices import get_device, load_profile

    dev = get_device(load_profile("local-cpu"))
    best = {}
    for k in range(rounds):
        for i, (path, precision) in enumerate(files):
            for b in batches:
                m = dev.measure(path, batch=b, warmup=20, runs=200, max_seconds=max_seconds, precision=precision)
                best[i, b] = min(best.get((i, b), float("inf")), m.p50_ms)
        if log:
            log(f"[timing] round {k + 1}/{rounds}")
    return best
