#!/usr/bin/env python3
"""fp32 student vs PTQ int8 vs QAT-with-teacher int8 on the quickstart: accuracy, size, ORT CPU latency.

    python benchmarks/quantize_quickstart.py [--out runs/quantize-quickstart] [--rounds 3] [--reuse]

Distils the quickstart student once (or reuses <out>/student.pt), then runs the quantize stage in each mode
from that same student, and measures every file with the local-cpu device (ONNX Runtime, 2 threads) in
interleaved rounds, keeping each file's best p50 (the machine is shared: the best round is the least
disturbed one). Writes <out>/results.json, benchmarks/results/quantize_quickstart.json (--results) and its
markdown table (``markdown``).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))
from host import machine, repo_path  # noqa: E402  (results hold no absolute paths)

MODES = [  # (label, quantize section)
    ("PTQ ORT int8 (uint8 act.)", {"mode": "ptq-ort"}),
    ("PTQ ORT int8 (int8 act.)", {"mode": "ptq-ort", "activations": "int8"}),
    ("PTQ NNCF int8", {"mode": "ptq-nncf"}),
    # Full 8-bit weights whatever the host: on an x86 CPU without VNNI the int8 kernels saturate on them
    # (the rows above then get 7-bit weights, quantize.reduce_range: auto).
    ("PTQ ORT int8 (uint8 act., 8-bit weights)", {"mode": "ptq-ort", "reduce_range": False}),
    ("PTQ NNCF int8 (8-bit weights)", {"mode": "ptq-nncf", "reduce_range": False}),
    ("QAT-KD NNCF int8", {"mode": "qat-kd", "epochs": 3}),
    ("QAT-KD Polino 4-bit weights", {"mode": "qat-kd", "bits": 4, "epochs": 3}),
    ("QAT-KD Polino 2-bit weights", {"mode": "qat-kd", "bits": 2, "epochs": 3}),
]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="runs/quantize-quickstart")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--only", nargs="*", help="labels of modes to run")
    ap.add_argument("--reuse", action="store_true", help="reuse modes already quantized under --out (row.json)")
    ap.add_argument("--teacher-checkpoint", help="a teacher state_dict to use instead of the cached/trained one")
    ap.add_argument("--results", type=Path, default=ROOT / "benchmarks" / "results",
                    help="where quantize_quickstart.json and .md go")
    args = ap.parse_args()

    from compressor.context import Context, build_student
    from compressor.data import load_data
    from compressor.recipe import load_recipe
    from compressor.stages.quantize import run as stage
    from compressor.tasks import get_task
    from compressor.teacher import evaluate, load_teacher
    from devices import get_device, load_profile
    from exporters.onnx import export_onnx
    from exporters.qdq import run_onnxruntime

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    log = lambda s: print(s, file=sys.stderr, flush=True)  # noqa: E731
    base = load_recipe("quickstart", [f"teacher.checkpoint={args.teacher_checkpoint}"] if args.teacher_checkpoint else [])
    torch.manual_seed(base.seed)
    data = load_data(base.data, base.seed)
    teacher, _ = load_teacher(base, data, log=log)
    student, genome = build_student(base, data)
    weights = out / "student.pt"
    if weights.is_file():
        student.load_state_dict(torch.load(weights, weights_only=True))
    else:
        from compressor.distill.train import fit

        fit(student, teacher, data, base.distill, base.data, out / "ckpt", seed=base.seed, log=log)
        torch.save(student.state_dict(), weights)
    student.eval()
    test = data.loader("test", 256)

    def onnx_acc(path):
        correct = total = 0
        for xb, yb in test:
            correct += int((run_onnxruntime(path, xb.numpy()).argmax(-1) == yb.numpy()).sum())
            total += len(yb)
        return correct / total

    fp32 = out / "student.onnx"
    export_onnx(student, (data.tensors("test", limit=2)[0],), fp32, opset=base.export.opset)
    rows = [{"label": "fp32 student", "path": str(fp32), "precision": "fp32", "bytes": fp32.stat().st_size,
             "accuracy": onnx_acc(fp32), "torch_accuracy": evaluate(student, test), "seconds": 0.0}]
    rows[0]["teacher_accuracy"] = evaluate(teacher, test)
    for label, q in MODES:
        if args.only and label not in args.only:
            continue
        recipe = load_recipe(base.model_dump(mode="json") | {"quantize": q})
        work = out / "".join(c if c.isalnum() else "-" for c in label.lower()).strip("-")
        if args.reuse and (work / "row.json").is_file():
            rows.append(json.loads((work / "row.json").read_text()))
            continue
        ctx = Context(recipe, work, data, teacher, {}, student, genome, task=get_task(recipe.task), log=log)
        t0 = time.time()
        torch.manual_seed(recipe.seed)
        rec = stage(ctx)
        m = rec.metrics
        path = work / rec.outputs["student"]["path"]
        row = {"label": label, "path": str(path), "precision": rec.outputs["student"]["precision"],
               "bytes": m["bytes"], "accuracy": m["onnx_accuracy"], "seconds": round(time.time() - t0, 1),
               "fake_quant_accuracy": m.get("fake_quant_accuracy"),
               "before_qat_accuracy": m.get("before_finetune_accuracy", m.get("ptq_fake_quant_accuracy")), "parity": m.get("parity"),
               "checks": m.get("checks"), "size": m.get("size"), "qat": m.get("qat"),
               "reduce_range": m.get("reduce_range"), "weights": m.get("weights")}
        rows.append(row)
        (work / "row.json").write_text(json.dumps(row, indent=1, default=str))
        log(f"{label}: accuracy {row['accuracy']:.4f}, {row['bytes'] / 1e3:.1f} kB, {row['seconds']} s")

    device = get_device(load_profile("local-cpu"))
    for r in rows:
        r["p50_ms"] = {}
    for _ in range(args.rounds):  # interleaved, so a noisy minute hits every file alike
        for r in rows:
            for batch in (1, 32):
                meas = device.measure(r["path"], batch=batch, warmup=20, runs=200, max_seconds=20,
                                      precision="int8" if r["precision"] == "int8" else "fp32")
                key = f"b{batch}"
                r["p50_ms"][key] = min(r["p50_ms"].get(key, float("inf")), meas.p50_ms)
    (out / "results.json").write_text(json.dumps(rows, indent=1, default=str))
    res = {"benchmark": "quantize_quickstart", "machine": machine(), "rounds": args.rounds,
           "rows": [{**r, "path": repo_path(r["path"])} for r in rows]}
    args.results.mkdir(parents=True, exist_ok=True)
    (args.results / "quantize_quickstart.json").write_text(json.dumps(res, indent=2, default=str) + "\n")
    (args.results / "quantize_quickstart.md").write_text(markdown(res))
    print(markdown(res))


def markdown(res: dict) -> str:
    """The results table, from the dict main() writes (or its JSON read back)."""
    m = res["machine"]
    lines = ["# Quantize modes on the quickstart student", "",
             (f"{m['date']}, {m['cpu']}, ONNX Runtime {m['versions']['onnxruntime']}, load average "
              f"{m['load_average'][0]} at the end. The same distilled student quantized in each mode; accuracy of "
              "each file through ONNX Runtime on the held-out split; latency by the local-cpu device, best p50 of "
              f"{res['rounds']} interleaved rounds."), "",
             "| model | ORT accuracy | ORT off by (of the output range) | size (kB) | p50 b1 (ms) | p50 b32 (ms) |",
             "|---|---|---|---|---|---|"]
    for r in res["rows"]:
        ort = (r.get("parity") or {}).get("onnxruntime")
        off = f"{ort['max_rel_to_range']:.1%} vs {r['parity']['against']}" if isinstance(ort, dict) else ""
        lines.append(f"| {r['label']} | {r['accuracy']:.4f} | {off} | {r['bytes'] / 1e3:.1f} | "
                     f"{r['p50_ms']['b1']:.3f} | {r['p50_ms']['b32']:.3f} |")
    return "\n".join(lines) + "\n"

if __name__ == "__main__":
    main()
