"""ONNX -> TensorRT engine (Python API), the equivalent `trtexec` script, and ONNX-side checks.

An engine runs only on the GPU architecture and TensorRT version it was built with, so the build records
both (in the Artifact and in a ``<engine>.json`` sidecar the GPU device checks before loading), and the
bundle always carries a ``trtexec`` script that rebuilds and times the engine on the user's own GPU (a
Jetson, say). Where TensorRT is absent (as on CPU-only machines) the script is still written and the
build raises ExportError saying so.

The ONNX-side checks run anywhere: ``polygraphy surgeon sanitize --fold-constants`` and ``polygraphy
inspect model``, plus TensorRT's Q/DQ rules (int8 with zero point 0: TensorRT supports only symmetric
quantization).
"""
from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

from .artifact import Artifact, ExportError, sha256

PRECISIONS = ("fp32", "fp16", "int8")


# ------------------------------------------------------------------------------------- ONNX checks

def _polygraphy() -> str | None:
    here = Path(sys.executable).parent / "polygraphy"
    return str(here) if here.is_file() else shutil.which("polygraphy")


def _run_polygraphy(args: list[str]) -> str:
    exe = _polygraphy()
    if exe is None:
        raise ExportError("polygraphy is not installed: pip install 'compressor[tensorrt-check]'")
    p = subprocess.run([exe, *args], capture_output=True, text=True)
    if p.returncode != 0:
        err = [ln for ln in (p.stdout + p.stderr).splitlines() if ln.strip() and "colored" not in ln]
        raise ExportError(f"polygraphy {args[0]} {args[1]} failed: {err[-1][:300] if err else p.returncode}")
    return p.stdout


def sanitize(onnx_path: str | Path, out_path: str | Path) -> Path:
    """``polygraphy surgeon sanitize --fold-constants``: constant subgraphs folded (TensorRT parses
    fewer nodes, and Q/DQ on weights becomes plain initializers where it can)."""
    out_path = Path(out_path)
    tmp = out_path.with_name(f".{out_path.name}.tmp")
    try:
        _run_polygraphy(["surgeon", "sanitize", str(onnx_path), "--fold-constants", "-o", str(tmp)])
        os.replace(tmp, out_path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return out_path


def check_onnx(onnx_path: str | Path, *, inspect: bool = True) -> dict:
    """TensorRT's rules on an ONNX file; returns {"ok", "problems", "ops", "inspect"}.

    Problems: Q/DQ with a non-zero zero point or a uint8 type (TensorRT takes symmetric int8 only),
    dynamic axes other than the batch (the optimisation profile varies only the batch), float64
    tensors (TensorRT has no fp64). ``inspect`` adds ``polygraphy inspect model``'s summary.
    """
    import numpy as np
    import onnx
    from onnx import numpy_helper

    m = onnx.load(str(onnx_path))
    inits = {t.name: t for t in m.graph.initializer}
    consts = {n.output[0]: n.attribute[0].t for n in m.graph.node
              if n.op_type == "Constant" and n.attribute and n.attribute[0].type == onnx.AttributeProto.TENSOR}
    problems, ops = [], {}
    for n in m.graph.node:
        ops[n.op_type] = ops.get(n.op_type, 0) + 1
        if n.op_type in ("QuantizeLinear", "DequantizeLinear"):
            if len(n.input) < 3 or not n.input[2]:
                continue  # no zero point: 0 and uint8 by default for QuantizeLinear
            zp = inits.get(n.input[2]) or consts.get(n.input[2])
            if zp is None:
                problems.append(f"{n.op_type} {n.name or n.output[0]}: zero point is computed, not a constant")
                continue
            arr = numpy_helper.to_array(zp)
            if arr.dtype == np.uint8:
                problems.append(f"{n.op_type} {n.name or n.output[0]}: uint8 quantization (TensorRT takes int8)")
            elif np.any(arr != 0):
                problems.append(f"{n.op_type} {n.name or n.output[0]}: zero point {arr.ravel()[:4].tolist()} "
                                "is not 0 (TensorRT takes symmetric int8 only)")
    for v in m.graph.input:
        if v.name in inits:
            continue
        t = v.type.tensor_type
        if t.elem_type == onnx.TensorProto.DOUBLE:
            problems.append(f"input {v.name} is float64 (TensorRT has no fp64)")
        for k, d in enumerate(t.shape.dim):
            if k > 0 and (d.dim_param or d.dim_value <= 0):
                problems.append(f"input {v.name} has a dynamic axis {k} ({d.dim_param or '?'}); "
                                "the optimisation profile varies only the batch")
    for t in m.graph.initializer:
        if t.data_type == onnx.TensorProto.DOUBLE:
            problems.append(f"initializer {t.name} is float64 (TensorRT has no fp64)")
    qdq = ops.get("QuantizeLinear", 0) + ops.get("DequantizeLinear", 0)
    result = {"ok": not problems, "problems": problems, "ops": ops, "qdq_nodes": qdq,
              "opset": next((o.version for o in m.opset_import if o.domain in ("", "ai.onnx")), None)}
    if inspect:
        text = _run_polygraphy(["inspect", "model", str(onnx_path)])
        result["inspect"] = "\n".join(ln for ln in text.splitlines() if "colored" not in ln)
        import polygraphy

        result["polygraphy"] = polygraphy.__version__
    return result


# ---------------------------------------------------------------------------------- trtexec script

def _io_shapes(onnx_path: Path) -> list[tuple[str, list]]:
    import onnx

    m = onnx.load(str(onnx_path), load_external_data=False)
    inits = {t.name for t in m.graph.initializer}
    out = []
    for v in m.graph.input:
        if v.name not in inits:
            out.append((v.name, [d.dim_param or d.dim_value or -1 for d in v.type.tensor_type.shape.dim]))
    return out


def _shape_at(shape: list, batch: int) -> list[int]:
    dims = []
    for k, d in enumerate(shape):
        if isinstance(d, int) and d > 0:
            dims.append(d)
        elif k == 0:
            dims.append(batch)
        else:
            raise ExportError(f"dynamic axis {k} ({d}) besides the batch: TensorRT needs its range")
    return dims


def trtexec_command(onnx_path: str | Path, engine_path: str | Path, *, precision: str = "fp16",
                    batch: tuple[int, int, int] = (1, 1, 8), workspace_mb: int = 1024,
                    timing_cache: str | None = "timing.cache", base: str | Path | None = None) -> list[str]:
    """The ``trtexec`` argument list that builds (and times) the same engine as export_tensorrt.

    Paths in it are relative to ``base`` (the script's folder) when given, else bare file names.
    """
    onnx_path = Path(onnx_path)

    def rel(p) -> str:
        return os.path.relpath(Path(p).resolve(), Path(base).resolve()) if base else Path(p).name

    cmd = ["trtexec", f"--onnx={rel(onnx_path)}", f"--saveEngine={rel(engine_path)}"]
    if precision == "fp16":
        cmd.append("--fp16")
    elif precision == "int8":
        cmd += ["--int8", "--fp16"]  # int8 where the Q/DQ says so, fp16 (not fp32) elsewhere
    io = _io_shapes(onnx_path)
    if any(not (isinstance(d, int) and d > 0) for _, s in io for d in s[:1]):
        for flag, b in zip(("--minShapes", "--optShapes", "--maxShapes"), batch):
            cmd.append(f"{flag}=" + ",".join(f"{n}:{'x'.join(map(str, _shape_at(s, b)))}" for n, s in io))
    cmd.append(f"--memPoolSize=workspace:{int(workspace_mb)}M")
    if timing_cache:
        cmd.append(f"--timingCacheFile={timing_cache}")
    # Timing: CUDA graphs, a separate profiling run, per-run times exported for percentiles.
    cmd += ["--warmUp=500", "--iterations=200", "--useCudaGraph", "--separateProfileRun",
            f"--exportTimes={rel(Path(engine_path).with_suffix('.times.json'))}"]
    return cmd


def write_trtexec_script(onnx_path: str | Path, engine_path: str | Path, script_path: str | Path, **kw) -> Path:
    """A bash script beside the ONNX that rebuilds and times the engine with trtexec on the target."""
    script_path = Path(script_path)
    cmd = trtexec_command(onnx_path, engine_path, base=script_path.parent, **kw)
    text = "\n".join([
        "#!/usr/bin/env bash",
        f"# Build and time the TensorRT engine for {Path(onnx_path).name} ON THE TARGET GPU: an engine runs",
        "# only on the GPU architecture and TensorRT version that built it. trtexec ships with TensorRT",
        "# (JetPack on Jetson: /usr/src/tensorrt/bin/trtexec).",
        "set -euo pipefail",
        'cd "$(dirname "$0")"',
        'TRTEXEC="${TRTEXEC:-$(command -v trtexec || echo /usr/src/tensorrt/bin/trtexec)}"',
        '"$TRTEXEC" ' + " \\\n    ".join(shlex.quote(c) for c in cmd[1:]),
        "",
    ])
    tmp = script_path.with_name(f".{script_path.name}.tmp")
    tmp.write_text(text)
    tmp.chmod(0o755)
    os.replace(tmp, script_path)
    return script_path


# ---------------------------------------------------------------------------------- engine build

def gpu_info() -> dict:
    """Name and compute capability of GPU 0 (torch if it has CUDA, else nvidia-smi); {} without one."""
    try:
        import torch

        if torch.cuda.is_available():
            major, minor = torch.cuda.get_device_capability(0)
            return {"gpu": torch.cuda.get_device_name(0), "compute_capability": f"{major}.{minor}"}
    except ImportError:
        pass
    smi = shutil.which("nvidia-smi")
    if smi:
        p = subprocess.run([smi, "--query-gpu=name,compute_cap", "--format=csv,noheader"],
                           capture_output=True, text=True)
        if p.returncode == 0 and p.stdout.strip():
            name, cc = (s.strip() for s in p.stdout.splitlines()[0].rsplit(",", 1))
            return {"gpu": name, "compute_capability": cc}
    return {}


def export_tensorrt(onnx_path: str | Path, engine_path: str | Path, *, precision: str = "fp16",
                    batch: tuple[int, int, int] = (1, 1, 8), workspace_mb: int = 1024,
                    timing_cache: str | Path | None = None, script: bool = True, check: bool = True,
                    role: str = "student", parent: str = "export") -> Artifact:
    """Build a serialized engine at ``engine_path`` from ``onnx_path``.

    ``batch`` is the optimisation profile's (min, opt, max) batch. ``precision`` int8 expects a QDQ ONNX
    (explicit quantization: no calibrator). ``timing_cache`` is read if present and written back, so a
    rebuild on the same GPU is fast. The trtexec script is written first, whatever happens next.
    """
    onnx_path, engine_path = Path(onnx_path), Path(engine_path)
    if precision not in PRECISIONS:
        raise ExportError(f"TensorRT: precision {precision!r} is not one of {', '.join(PRECISIONS)}")
    if not (1 <= batch[0] <= batch[1] <= batch[2]):
        raise ExportError(f"TensorRT: batch (min, opt, max) = {tuple(batch)} must satisfy 1 <= min <= opt <= max")
    if not onnx_path.is_file():
        raise ExportError(f"TensorRT: {onnx_path} does not exist")
    engine_path.parent.mkdir(parents=True, exist_ok=True)
    script_path = None
    if script:
        script_path = write_trtexec_script(onnx_path, engine_path,
                                           engine_path.with_name(f"build_{engine_path.stem}.sh"),
                                           precision=precision, batch=batch, workspace_mb=workspace_mb)
    checks = check_onnx(onnx_path, inspect=False) if check else None
    if checks and not checks["ok"]:
        more = len(checks["problems"]) - 1
        raise ExportError(f"{onnx_path.name} breaks TensorRT's rules: {checks['problems'][0]}"
                          + (f" (and {more} more)" if more else ""))
    if precision == "int8" and checks and checks["qdq_nodes"] == 0:
        raise ExportError(f"TensorRT int8 needs a QDQ ONNX (explicit quantization); {onnx_path.name} has no "
                          "QuantizeLinear/DequantizeLinear nodes")
    where = f" (the trtexec script is in {script_path})" if script_path else ""
    try:
        import tensorrt as trt
    except ImportError:
        raise ExportError(f"TensorRT is not installed here, so no engine was built{where}") from None
    info = gpu_info()
    if not info:
        raise ExportError(f"TensorRT needs a CUDA GPU to build an engine and none was found{where}")

    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    flags = 0
    if int(trt.__version__.split(".")[0]) < 10:  # explicit batch is the only mode from TensorRT 10
        flags = 1 << int(trt.NetworkDefinitionCreationFlag.EXPLICIT_BATCH)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errs = [str(parser.get_error(i)) for i in range(parser.num_errors)]
        raise ExportError(f"TensorRT cannot parse {onnx_path.name}: {errs[0].splitlines()[0][:300] if errs else '?'}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_mb) << 20)
    if precision in ("fp16", "int8"):
        config.set_flag(trt.BuilderFlag.FP16)
    if precision == "int8":
        config.set_flag(trt.BuilderFlag.INT8)
    profile = builder.create_optimization_profile()
    shapes = {}
    for i in range(network.num_inputs):
        t = network.get_input(i)
        dims = list(t.shape)
        if any(d < 0 for d in dims):
            mn, op, mx = ([b if (k == 0 and d < 0) else d for k, d in enumerate(dims)] for b in batch)
            if any(d < 0 for d in mn):
                raise ExportError(f"input {t.name} has dynamic axes besides the batch: {dims}")
            profile.set_shape(t.name, mn, op, mx)
            shapes[t.name] = {"min": mn, "opt": op, "max": mx}
        else:
            shapes[t.name] = {"min": dims, "opt": dims, "max": dims}
    if shapes and any(v["min"] != v["max"] for v in shapes.values()):
        config.add_optimization_profile(profile)
    cache_path = Path(timing_cache) if timing_cache else None
    cache = config.create_timing_cache(cache_path.read_bytes() if cache_path and cache_path.is_file() else b"")
    cache_note = None
    if not config.set_timing_cache(cache, ignore_mismatch=False):
        # A cache from another GPU (a bundle carried to a Jetson): timings from there would mislead the
        # tactic choice here, so start an empty one; it is written back for this GPU.
        config.set_timing_cache(config.create_timing_cache(b""), ignore_mismatch=False)
        cache_note = f"timing cache {cache_path.name} came from another GPU and was not used"
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise ExportError(f"TensorRT could not build an engine from {onnx_path.name} (see the log above){where}")
    tmp = engine_path.with_name(f".{engine_path.name}.tmp")
    with open(tmp, "wb") as f:
        f.write(serialized)
    os.replace(tmp, engine_path)
    if cache_path:
        ctmp = cache_path.with_name(f".{cache_path.name}.tmp")
        ctmp.write_bytes(memoryview(config.get_timing_cache().serialize()))
        os.replace(ctmp, cache_path)
    meta = {"tensorrt": trt.__version__, **info, "precision": precision, "shapes": shapes,
            "workspace_mb": workspace_mb, "source": onnx_path.name, "source_sha256": sha256(onnx_path)}
    side = engine_path.with_name(engine_path.name + ".json")
    stmp = side.with_name(f".{side.name}.tmp")
    stmp.write_text(json.dumps(meta, indent=2))
    os.replace(stmp, side)
    return Artifact(path=str(engine_path), format="tensorrt", precision=precision, sha256=sha256(engine_path),
                    bytes=engine_path.stat().st_size,
                    inputs=[{"name": n, "shape": s["opt"], "min": s["min"], "max": s["max"]} for n, s in shapes.items()],
                    toolchain={"tensorrt": trt.__version__}, role=role, parent=parent,
                    extra={**info, "sidecar": side.name,
                           "trtexec_script": script_path.name if script_path else None,
                           "timing_cache": cache_path.name if cache_path else None,
                           **({"note": cache_note} if cache_note else {})})
