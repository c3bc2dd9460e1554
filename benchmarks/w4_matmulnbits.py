#!/usr/bin/env python3
"""ORT CPU latency of a MiniLM-sized Linear stack: fp32 vs Polino 4-bit MatMulNBits with float zero points vs
with integer (uint8) zero points, side by side in one run.

    python benchmarks/w4_matmulnbits.py [--out runs/w4-matmulnbits] [--rounds 3] [--bucket 128]
                                        [--json benchmarks/results/w4_matmulnbits.json]   # and its .md

Six blocks of hidden 384, FFN 1536 (q, k, v, o: 384 -> 384; up 384 -> 1536; down 1536 -> 384), 128 tokens,
random weights put on the 4-bit bucketed grid by ``BucketQuant`` (no training: latency and parity only), once
per zero-point mode from the same shadow weights: ``float`` (Polino's offset beta = the bucket's minimum, so
MatMulNBits needs float zero points) and ``integer`` (a whole number of steps, uint8 zero points). Bucket 128
(the default here): every layer's in_features (384, 1536) is a multiple of it, so all 36 Linears become
MatMulNBits. Files: the fp32 export, and ``pack_w4`` of each grid. Each file's parity is its ORT output
against its own fake-quantized PyTorch model on a real batch. Latency by devices/bench_onnxruntime.measure
(ORT CPU, 2 threads), side by side in one process, in interleaved rounds, keeping each file's best p50 (the
machine is shared). Ratios are reported, not asserted.
"""
from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn.utils import parametrize

HIDDEN, FFN, TOKENS, BLOCKS = 384, 1536, 128, 6


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.q, self.k, self.v, self.o = (nn.Linear(HIDDEN, HIDDEN) for _ in range(4))
        self.up, self.down = nn.Linear(HIDDEN, FFN), nn.Linear(FFN, HIDDEN)

    def forward(self, x):
        x = x + self.o(self.q(x) + self.k(x) + self.v(x))  # the projections' work, without attention
        return x + self.down(torch.relu(self.up(x)))


def build(bucket: int, zero_point: str, x):
    """The stack (seed 0) with every Linear on the b-bit grid: (model with the grid baked in, fake-quant
    output on ``x``, the layers dict pack_w4 takes)."""
    from compressor.polino import BucketQuant

    torch.manual_seed(0)
    model = nn.Sequential(*(Block() for _ in range(BLOCKS))).eval()
    lin = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    for m in lin.values():
        parametrize.register_parametrization(m, "weight", BucketQuant(4, bucket, zero_point))
    with torch.no_grad():
        ref = model(x).numpy()
    grids = {n: m.parametrizations.weight[0].grid(m.parametrizations.weight.original) for n, m in lin.items()}
    for m in lin.values():
        parametrize.remove_parametrizations(m, "weight", leave_parametrized=True)
    return model, ref, {n: {"weight": m.weight.detach().numpy(), "bits": 4, "bucket": bucket, "kind": "Linear",
                            **({"grid": grids[n]} if grids[n] else {})} for n, m in lin.items()}


def main():
    from devices import bench_onnxruntime
    from exporters.onnx import export_onnx
    from exporters.qdq import pack_w4, run_onnxruntime

    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="runs/w4-matmulnbits")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--bucket", type=int, default=128)
    ap.add_argument("--json", default=None, help="also write the results here (benchmarks/results/...)")
    a = ap.parse_args()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    x = torch.randn(4, TOKENS, HIDDEN, generator=torch.Generator().manual_seed(1))
    files, info = {}, {}
    for zp in ("float", "integer"):
        model, ref, layers = build(a.bucket, zp, x)
        grid = out / f"grid-{zp}.b{a.bucket}.onnx"
        export_onnx(model, (x[:2],), grid)
        if zp == "float":  # fp32 runs the same graph whatever the weights: one fp32 file
            files["fp32"] = grid
            info["fp32"] = {"ref": ref, "matmulnbits_layers": 0}
        key = f"w4 MatMulNBits, {zp} zero points"
        files[key] = out / f"w4-{zp}zp.b{a.bucket}.onnx"
        rec = pack_w4(grid, files[key], layers)
        info[key] = {"ref": ref, "matmulnbits_layers": len(rec["matmulnbits"]),
                     "zero_points": next(iter(rec["matmulnbits"].values()))["zero_points"]}
    for key, path in files.items():
        i = info[key]
        i.update(bytes=path.stat().st_size, layers=BLOCKS * 6,
                 max_abs_vs_fake_quant=float(np.abs(run_onnxruntime(path, x.numpy()) - i.pop("ref")).max()))
    best = {k: {} for k in files}
    for r in range(a.rounds):
        for batch, runs in ((1, 30), (32, 10)):
            for key, path in files.items():
                m = bench_onnxruntime.measure(str(path), batch=batch, threads=a.threads, warmup=3 if batch == 1 else 1,
                                              runs=runs, max_seconds=60)
                best[key][batch] = min(best[key].get(batch, float("inf")), m["p50_ms"])
    import onnxruntime as ort

    load = os.getloadavg()
    base = best["fp32"]
    res = {"date": time.strftime("%Y-%m-%d"), "onnxruntime": ort.__version__, "cpus": os.cpu_count(),
           "loadavg": load, "threads": a.threads, "rounds": a.rounds, "bucket": a.bucket,
           "shape": [TOKENS, HIDDEN],
           "files": {k: {**info[k], "p50_ms": best[k],
                         "vs_fp32": {b: best[k][b] / base[b] for b in best[k]},
                         "size_vs_fp32": info["fp32"]["bytes"] / info[k]["bytes"]} for k in files}}
    (out / "results.json").write_text(json.dumps(res, indent=2))
    if a.json:
        Path(a.json).write_text(json.dumps(res, indent=2) + "\n")
        Path(a.json).with_suffix(".md").write_text(markdown(res))
    print(markdown(res))


def markdown(res: dict) -> str:
    """The results table, from the dict main() writes (or the JSON read back: its batch keys are strings)."""
    lo = res["loadavg"]
    lines = [
        "# 4-bit weights in ONNX Runtime: MatMulNBits with float and integer zero points", "",
        (f"{res['date']}, ONNX Runtime {res['onnxruntime']} CPU, {res['threads']} threads, {res['cpus']} CPUs, load "
         f"average {lo[0]:.1f} / {lo[1]:.1f} / {lo[2]:.1f}; best p50 of {res['rounds']} interleaved rounds. A stack of "
         f"{BLOCKS} blocks (q, k, v, o {HIDDEN}->{HIDDEN}, up {HIDDEN}->{FFN}, down {FFN}->{HIDDEN}), input "
         f"{res['shape'][0]} tokens x {res['shape'][1]}, random weights put on the 4-bit grid (bucket {res['bucket']}) "
         "by BucketQuant from the same shadow weights; max abs is each file's ONNX Runtime output against its own "
         "fake-quantized PyTorch model."), "",
        ("| file | MatMulNBits layers | size (MB) | fp32 size / size | max abs vs fake-quant | p50 b1 (ms) | vs fp32 "
         "| p50 b32 (ms) | vs fp32 |"),
        "|---|---|---|---|---|---|---|---|---|",
    ]
    base = {int(b): v for b, v in res["files"]["fp32"]["p50_ms"].items()}
    for k, f in res["files"].items():
        p = {int(b): v for b, v in f["p50_ms"].items()}
        lines.append(f"| {k} | {f['matmulnbits_layers']}/{f['layers']} | {f['bytes'] / 1e6:.2f} | "
                     f"{f['size_vs_fp32']:.1f}x | {f['max_abs_vs_fake_quant']:.1e} | {p[1]:.2f} | {p[1] / base[1]:.2f}x | "
                     f"{p[32]:.1f} | {p[32] / base[32]:.2f}x |")
    lines += ["", "Ratios are what to compare: the machine may have been shared, and the JSON records its load."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
