#!/usr/bin/env python3
"""ORT CPU latency of a MiniLM-sized Linear stack: fp32 vs Polino 4-bit as MatMulNBits vs 4-bit folded at load.

    python benchmarks/w4_matmulnbits.py [--out runs/w4-matmulnbits] [--rounds 3]

Six blocks of hidden 384, FFN 1536 (q, k, v, o: 384 -> 384; up 384 -> 1536; down 1536 -> 384), 128 tokens,
random weights put on Polino's 4-bit bucketed grid (no training: latency and parity only). Files, all from
the same weights: the fp32 export, ``pack_bucketed`` (every weight as UINT4 codes folded to fp32 at session
start) and ``pack_w4`` (MatMulNBits where in_features is a multiple of the bucket, folded elsewhere), at
bucket 256 (the default: only ``down``, in 1536, fits; 384 is not a multiple of 256) and bucket 128 (every
layer fits). Measured with devices/bench_onnxruntime.measure (2 threads) side by side in one process, in
interleaved rounds, keeping each file's best p50 (the machine is shared). Ratios are reported, not asserted.
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


def build(bucket: int, x):
    from compressor.quantize import BucketQuant

    torch.manual_seed(0)
    model = nn.Sequential(*(Block() for _ in range(BLOCKS))).eval()
    lin = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    for m in lin.values():
        parametrize.register_parametrization(m, "weight", BucketQuant(4, bucket))
    with torch.no_grad():
        ref = model(x).numpy()
    for m in lin.values():
        parametrize.remove_parametrizations(m, "weight", leave_parametrized=True)
    return model, ref, {n: {"weight": m.weight.detach().numpy(), "bits": 4, "bucket": bucket, "kind": "Linear"}
                        for n, m in lin.items()}


def main():
    from devices import bench_onnxruntime
    from exporters.onnx import export_onnx
    import onnx

    from exporters.qdq import _weight_source, pack_bucketed, pack_w4, run_onnxruntime

    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="runs/w4-matmulnbits")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    x = torch.randn(4, TOKENS, HIDDEN, generator=torch.Generator().manual_seed(1))
    files, info = {}, {}
    for bucket in (256, 128):
        model, ref, layers = build(bucket, x)
        grid = out / f"fp32.b{bucket}.onnx"
        export_onnx(model, (x[:2],), grid)
        if bucket == 256:
            files["fp32"] = grid
        folded = out / f"folded.b{bucket}.onnx"
        rec = pack_w4(grid, out / f"w4.b{bucket}.onnx", layers)
        files[f"w4 MatMulNBits, bucket {bucket}"] = out / f"w4.b{bucket}.onnx"
        # pack_bucketed takes initializer names (MatMul holds a transposed copy): pack_w4's own lookup
        g = onnx.load(str(grid)).graph
        inits = {t.name: t for t in g.initializer}
        consumers, names = {}, {}
        for n in g.node:
            for i in n.input:
                consumers.setdefault(i, []).append(n)
        for p, s in layers.items():
            init, tr = _weight_source(f"{p}.weight", s["weight"], inits, consumers)
            names[init] = (4, bucket, tr)
        pack_bucketed(grid, folded, names)
        files[f"folded, bucket {bucket}"] = folded
        for key in (f"w4 MatMulNBits, bucket {bucket}", f"folded, bucket {bucket}") + (("fp32",) if bucket == 256 else ()):
            diff = float(np.abs(run_onnxruntime(files[key], x.numpy()) - ref).max())
            info[key] = {"bytes": files[key].stat().st_size, "max_abs_vs_fake_quant": diff,
                         "matmulnbits_layers": len(rec["matmulnbits"]) if key.startswith("w4") else 0,
                         "layers": len(layers)}
    best = {k: {} for k in files}
    for r in range(a.rounds):
        for batch, runs in ((1, 30), (32, 5)):
            for key, path in files.items():
                m = bench_onnxruntime.measure(str(path), batch=batch, threads=a.threads, warmup=3 if batch == 1 else 1,
                                              runs=runs, max_seconds=60)
                best[key][batch] = min(best[key].get(batch, float("inf")), m["p50_ms"])
    load = os.getloadavg()
    res = {"date": time.strftime("%Y-%m-%d"), "loadavg": load, "threads": a.threads, "rounds": a.rounds,
           "shape": [TOKENS, HIDDEN], "files": {k: {**info[k], "p50_ms": best[k]} for k in files}}
    (out / "results.json").write_text(json.dumps(res, indent=2))
    base = best["fp32"]
    print(f"{res['date']}, load average {load[0]:.1f}/{load[1]:.1f}/{load[2]:.1f}, {a.threads} threads, "
          f"best p50 of {a.rounds} interleaved rounds\n")
    print("| file | MatMulNBits layers | size (MB) | max abs vs fake-quant | p50 b1 (ms) | vs fp32 | p50 b32 (ms) | vs fp32 |")
    print("|---|---|---|---|---|---|---|---|")
    for k in files:
        i, p = info[k], best[k]
        print(f"| {k} | {i['matmulnbits_layers']}/{i['layers']} | {i['bytes'] / 1e6:.2f} | {i['max_abs_vs_fake_quant']:.1e} | "
              f"{p[1]:.2f} | {p[1] / base[1]:.2f}x | {p[32]:.1f} | {p[32] / base[32]:.2f}x |")


if __name__ == "__main__":
    main()
