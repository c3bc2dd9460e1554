#!/usr/bin/env python3
"""Exercise the GPU device on the quickstart student and write a log with its figures.

    python scripts/gpu_check.py --out gpu_check [--device h100] [--runs 200]

Runs every GPU path that this machine has, each on its own (one failing does not stop the rest):
PyTorch on CUDA (fp32 with TF32 off, fp16; CUDA graphs), ONNX Runtime's CUDA provider, and TensorRT
(fp16 engine with a dynamic-batch profile and a timing cache; int8 from a symmetric QDQ ONNX), plus the
refusal of an engine whose sidecar says it was built for another GPU. Writes ``gpu_check.json`` and
``gpu_check.log`` under --out. Exit code 0 when at least one GPU measurement was made, 1 otherwise.
Latency does not depend on the weights, so the student is built untrained (no teacher, no data).

Then (``--quickstart``, the default) the whole `compress run quickstart`, twice: distilled on the CPU, then on
the GPU (``distill.trainer.accelerator=gpu``) with the --device profile as a second target. Each bundle is
verified; its report.md and manifest.json come back under --out as quickstart-cpu.* and quickstart-gpu.*, and
the log gives the distill stage's seconds on each and where the student trained.

A bare GPU machine needs the package's pure-Python dependencies that its image lacks (the quickstart
imports pydantic; the search, optuna). Where it cannot download, carry them as wheels: here,
``scripts/gpu_wheels.sh .whl`` (Python 3.12 wheels, about 8 MB); there,
``pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl && PYTHONPATH=/tmp/site:. python
scripts/gpu_check.py --out $OUT/gpu``.
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="gpu_check")
    ap.add_argument("--device", default="h100", help="device profile (peak figures for the roofline)")
    ap.add_argument("--batches", default="1,32")
    ap.add_argument("--warmup", type=int, default=20)
    ap.add_argument("--runs", type=int, default=200)
    ap.add_argument("--quickstart", action=argparse.BooleanOptionalAction, default=True,
                    help="also run the whole quickstart, distilled on the CPU and on the GPU")
    a = ap.parse_args(argv)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    lines: list[str] = []
    report: dict = {"started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "steps": {}, "measurements": []}

    def log(s: str) -> None:
        print(s, flush=True)
        lines.append(s)

    def step(name: str, fn):
        t0 = time.time()
        try:
            r = fn()
            report["steps"][name] = {"ok": True, "seconds": round(time.time() - t0, 2), **(r or {})}
            log(f"[ok]   {name} ({time.time() - t0:.1f} s)")
        except Exception as e:
            msg = f"{type(e).__name__}: {str(e).strip().splitlines()[0][:400] if str(e).strip() else ''}"
            report["steps"][name] = {"ok": False, "error": msg, "traceback": traceback.format_exc(limit=4)}
            log(f"[fail] {name}: {msg}")

    import torch

    from compressor.models import build_model, count_flops
    from devices import DeviceError, get_device, load_profile
    from devices.gpu import gpu_host
    from exporters.onnx import export_onnx

    env = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
           "cuda_available": torch.cuda.is_available(), **gpu_host()}
    try:
        import onnxruntime as ort

        env["onnxruntime"], env["ort_providers"] = ort.__version__, ort.get_available_providers()
    except ImportError:
        pass
    try:
        import tensorrt as trt

        env["tensorrt"] = trt.__version__
    except (ImportError, OSError) as e:
        env["tensorrt"] = f"absent ({type(e).__name__})"
    report["env"] = env
    log("environment: " + json.dumps(env))

    profile = load_profile(a.device)
    device = get_device(profile)
    why = device.why_unavailable()
    report["runtimes"] = device.runtimes() if not why else []
    log(f"device {profile.name}: {'runtimes ' + ', '.join(report['runtimes']) if not why else 'unavailable: ' + why}")

    torch.manual_seed(0)
    student = build_model("resnet", {"widths": [16, 32, 64], "depths": [1, 1, 1]},
                          {"in_channels": 1, "num_classes": 10}).eval()
    x = torch.randn(1, 1, 32, 32)
    flops = count_flops(student, x)
    onnx_path = out / "student.onnx"
    export_onnx(student, (torch.randn(2, 1, 32, 32),), onnx_path)
    report["model"] = {"name": "quickstart student (resnet 16/32/64, 1 block per stage), 1x32x32",
                       "params": sum(p.numel() for p in student.parameters()), "flops": flops}
    log(f"student: {report['model']['params']:,} params, {flops / 1e6:.2f} MFLOPs per sample")
    batches = [int(b) for b in a.batches.split(",")]

    def record(m, label):
        m.add_roofline(flops, profile)
        d = m.to_dict()
        d["label"] = label
        report["measurements"].append(d)
        roof = f", {m.gflops:.1f} GFLOP/s = {100 * m.roofline:.3f}% of peak" if m.roofline is not None else ""
        log(f"  {label:28s} batch {m.batch:3d}: p50 {m.p50_ms:.4f} ms, p90 {m.p90_ms:.4f} ms "
            f"(runtime {m.runtime} {m.runtime_version}, {m.provider}){roof}")

    def polygraphy_checks():
        from exporters.tensorrt import check_onnx, sanitize

        r = check_onnx(onnx_path)
        sanitize(onnx_path, out / "student.sanitized.onnx")
        return {"ok_for_tensorrt": r["ok"], "problems": r["problems"], "ops": r["ops"]}

    step("polygraphy checks on the ONNX", polygraphy_checks)

    if why:
        log("no GPU here: nothing to measure")
    if not why and "torch-cuda" in report["runtimes"]:
        def torch_paths():
            for prec in ("fp32", "fp16"):
                for b in batches:
                    record(device.measure(student, example=x, batch=b, precision=prec, warmup=a.warmup,
                                          runs=a.runs), f"torch-cuda {prec}")
        step("PyTorch on CUDA", torch_paths)

    if not why and "onnxruntime-cuda" in report["runtimes"]:
        def ort_path():
            for b in batches:
                record(device.measure(onnx_path, batch=b, precision="fp32", warmup=a.warmup, runs=a.runs),
                       "onnxruntime-cuda fp32")
        step("ONNX Runtime CUDA provider", ort_path)

    if not why and "tensorrt" in report["runtimes"]:
        from exporters.tensorrt import check_onnx, export_tensorrt

        max_b = max(batches)

        def trt_fp16():
            art = export_tensorrt(onnx_path, out / "student.fp16.engine", precision="fp16", batch=(1, 1, max_b),
                                  timing_cache=out / "timing.cache")
            for b in batches:
                record(device.measure(art.path, batch=b, precision="fp16", warmup=a.warmup, runs=a.runs),
                       "tensorrt fp16")
            t0 = time.time()  # the timing cache makes a rebuild on the same GPU faster
            export_tensorrt(onnx_path, out / "student.fp16b.engine", precision="fp16", batch=(1, 1, max_b),
                            timing_cache=out / "timing.cache", script=False)
            return {"artifact": art.to_dict(), "rebuild_with_cache_s": round(time.time() - t0, 2)}
        step("TensorRT fp16 engine", trt_fp16)

        def trt_fp32():
            art = export_tensorrt(onnx_path, out / "student.fp32.engine", precision="fp32", batch=(1, 1, max_b),
                                  timing_cache=out / "timing.cache")
            for b in batches:
                record(device.measure(art.path, batch=b, precision="fp32", warmup=a.warmup, runs=a.runs),
                       "tensorrt fp32")
        step("TensorRT fp32 engine", trt_fp32)

        def trt_int8():
            import numpy as np
            from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

            class Reader(CalibrationDataReader):
                def __init__(self):
                    rng = np.random.default_rng(0)
                    self.it = iter([{"input": rng.standard_normal((1, 1, 32, 32)).astype(np.float32)}
                                    for _ in range(16)])

                def get_next(self):
                    return next(self.it, None)

            import os
            qdq = (out / "student.int8.onnx").resolve()
            cwd = os.getcwd()
            os.chdir(out)
            try:
                quantize_static(str(onnx_path.resolve()), str(qdq), Reader(), quant_format=QuantFormat.QDQ,
                                per_channel=True, activation_type=QuantType.QInt8, weight_type=QuantType.QInt8,
                                extra_options={"ActivationSymmetric": True, "WeightSymmetric": True})
            finally:
                os.chdir(cwd)
            chk = check_onnx(qdq, inspect=False)
            art = export_tensorrt(qdq, out / "student.int8.engine", precision="int8", batch=(1, 1, max_b),
                                  timing_cache=out / "timing.cache")
            for b in batches:
                record(device.measure(art.path, batch=b, precision="int8", warmup=a.warmup, runs=a.runs),
                       "tensorrt int8 (QDQ)")
            return {"qdq_nodes": chk["qdq_nodes"]}
        if "int8" in profile.precisions:
            step("TensorRT int8 engine", trt_int8)

        def wrong_gpu():
            src = out / "student.fp16.engine"
            fake = out / "other-gpu.engine"
            fake.write_bytes(src.read_bytes())
            meta = json.loads((out / "student.fp16.engine.json").read_text())
            meta.update(compute_capability="8.7", gpu="Jetson Orin (pretend)")
            (out / "other-gpu.engine.json").write_text(json.dumps(meta))
            try:
                device.measure(fake, precision="fp16")
            except DeviceError as e:
                log(f"  refused as expected: {e}")
                return {"message": str(e)}
            raise AssertionError("an engine marked for another GPU was not refused")
        step("engine built for another GPU is refused", wrong_gpu)

    if a.quickstart:
        for accelerator in ("cpu", "gpu"):
            if accelerator == "gpu" and not torch.cuda.is_available():
                log("quickstart on the GPU: skipped (torch sees no CUDA device)")
                continue
            targets = ["local-cpu"] + ([a.device] if accelerator == "gpu" else [])
            step(f"quickstart distilled on the {accelerator.upper()}",
                 lambda acc=accelerator, tg=targets: quickstart(out, acc, tg, log))

    report["finished"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    (out / "gpu_check.json").write_text(json.dumps(report, indent=2, default=str))
    (out / "gpu_check.log").write_text("\n".join(lines) + "\n")
    log(f"wrote {out / 'gpu_check.json'} and {out / 'gpu_check.log'}")
    return 0 if report["measurements"] else 1


def quickstart(out: Path, accelerator: str, targets: list[str], log, recipe="quickstart") -> dict:
    """`compress run quickstart` with the distill stage on ``accelerator`` and ``targets`` profiled; the bundle
    verified, its report.md and manifest.json copied to ``out`` as quickstart-<accelerator>.*. The teacher is
    cached between the two runs (COMPRESSOR_CACHE), so the second trains none."""
    import shutil
    import tempfile

    import compressor
    from compressor.bundle import read_manifest, verify

    with tempfile.TemporaryDirectory() as tmp:
        bundle = compressor.run(recipe, Path(tmp) / "bundle", log=lambda s: log("    " + s),
                                overrides=[f"distill.trainer.accelerator={accelerator}",
                                           f"targets=[{','.join(targets)}]"])
        verify(bundle)
        man = read_manifest(bundle)
        for name in ("report.md", "manifest.json"):
            shutil.copy(bundle / name, out / f"quickstart-{accelerator}.{name}")
    stages = {s["name"]: s for s in man["stages"]}
    distill = stages["distill"]
    got = {"distill_seconds": distill["seconds"], "trained_on": distill["metrics"].get("trained_on"),
           "stage_seconds": {n: s["seconds"] for n, s in stages.items()},
           "measurements": [{k: m.get(k) for k in ("device", "runtime", "precision", "batch", "p50_ms", "estimated",
                                                   "artifact")}
                            for m in stages.get("profile", {}).get("outputs", {}).get("measurements", [])]}
    log(f"  quickstart, distilled on the {accelerator.upper()}: distill stage {distill['seconds']:.1f} s, trained on "
        f"{got['trained_on']}; bundle verified; report at quickstart-{accelerator}.report.md")
    return got


if __name__ == "__main__":
    sys.exit(main())
