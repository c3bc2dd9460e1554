"""report.md: the report as Markdown tables."""
from __future__ import annotations

from .manifest import (
    LABELS,
    _analyze,
    _bench_command,
    _fmt,
    _metric,
    _p50,
    _pct,
    _ran,
    _stage,
    models,
)


def markdown(manifest: dict) -> str:
    a, q = _analyze(manifest), manifest.get("quality", {})
    rows = models(manifest)
    meas = manifest.get("measurements", [])
    devices = sorted({m["device"] for m in meas})
    batches = sorted({m["batch"] for m in meas})
    lines = [f"# {manifest['name']}: compression report", "",
             f"Made {manifest['created']} with torch {manifest['toolchain'].get('torch')}, "
             f"onnxruntime {manifest['toolchain'].get('onnxruntime')}; seed {manifest['seed']}.", ""]

    metric = _metric(manifest)
    label = LABELS.get(metric, metric)
    head = ["model", "params", "MFLOPs", "ONNX MB", f"held-out {label}"]
    for d in devices:
        head += [f"{d} p50 b{b} (ms)" for b in batches]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        row = [r["key"], f"{r['params'] or 0:,}", _fmt((r["flops"] or 0) / 1e6, ".1f"),
               _fmt((r["bytes"] or 0) / 1e6), _fmt(r["quality"], ".4f")]
        row += [_fmt(_p50(manifest, r["path"], d, b)) for d in devices for b in batches]
        lines.append("| " + " | ".join(row) + " |")
    lines.append("")
    by = {r["key"]: r for r in rows}
    t, s = a.get("teacher", {}), a.get("student", {})
    if t and s:
        tp = by.get("teacher", {}).get("params") or t["params"]
        sp = by.get("student", {}).get("params") or s["params"]
        tf = by.get("teacher", {}).get("flops") or t["flops"]
        sf = by.get("student", {}).get("flops") or s["flops"]
        ratio = [f"{tp / max(sp, 1):.1f}x fewer parameters", f"{tf / max(sf, 1):.1f}x fewer FLOPs"]
        for d in devices:
            for b in batches:
                ts = _p50(manifest, by.get("teacher", {}).get("path"), d, b)
                ss = _p50(manifest, by.get("student", {}).get("path"), d, b)
                if ts and ss:
                    ratio.append(f"{ts / ss:.1f}x faster on {d} at batch {b}")
        if "retained" in q and metric == "accuracy":
            ratio.append(f"{100 * q['retained']:.1f}% of the teacher's accuracy kept")
        if "probe_retained" in q.get("student", {}):
            ratio.append(f"{100 * q['student']['probe_retained']:.1f}% of the teacher's linear-probe accuracy kept")
        if f"onnx_{metric}" in q.get("student", {}):
            ratio.append(f"ONNX Runtime {label} of the shipped file {q['student'][f'onnx_{metric}']:.4f}")
        lines += ["Student against teacher: " + "; ".join(ratio) + ".", ""]

    if manifest.get("budgets"):
        lines += ["## Budgets", "", "| budget | limit | value | met |", "|---|---|---|---|"]
        for b in manifest["budgets"]:
            met = {True: "yes", False: "**no**", None: "not measured"}[b["met"]]
            lines.append(f"| {b['budget']} | {b['limit']} | {_fmt(b['value'], '.4g')} | {met} |")
        lines.append("")

    if meas:
        lines += ["## Measurements", "",
                  "| device | file | batch | p50 | p90 | p99 | mean | std | cv | GFLOP/s | of peak | runs | threads | "
                  "runtime | kind |", "|" + "---|" * 15]
        for m in meas:
            lines.append(f"| {m['device']} | {m['artifact']} | {m['batch']} | {m['p50_ms']:.3f} | {m['p90_ms']:.3f} | "
                         f"{m['p99_ms']:.3f} | {m['mean_ms']:.3f} | {m['std_ms']:.3f} | {m['cv']:.2f} | "
                         f"{_fmt(m.get('gflops'), '.2f')} | {_pct(m.get('roofline'))} | {m['runs']} | "
                         f"{m['threads']} | {m['runtime']} {m['runtime_version']} | "
                         f"{'estimated' if m['estimated'] else 'measured'} |")
        host = meas[0].get("host", {})
        lines += ["", f"Latencies in milliseconds. Host: {host.get('cpu_model', 'unknown CPU')}, "
                      f"governor {host.get('governor', 'unknown')}.", ""]
        peaks = _stage(manifest, "profile").get("metrics", {}).get("peak_gflops") or {}
        if peaks:
            lines += ["GFLOP/s: the model's FLOPs per sample x batch / p50. Peak: " + "; ".join(
                f"{d} {p['gflops']:.1f} GFLOP/s ({p['source']})" for d, p in peaks.items()) + ".", ""]
    skipped = _stage(manifest, "profile").get("metrics", {}).get("unavailable")
    if skipped:
        lines += ["Not measured: " + "; ".join(f"{k} ({v})" for k, v in skipped.items()) + ".", ""]

    lines += ["## Stages", "", "| stage | seconds | parent |", "|---|---|---|"]
    for s in _ran(manifest):
        lines.append(f"| {s['name']} | {s['seconds']:.1f} | {s['parent'] or ''} |")
    lines += ["", f"Re-measure on a device with only onnxruntime and numpy: `{_bench_command(manifest)}`.", ""]
    return "\n".join(lines)
