"""Tables for humans, from the manifest alone (so a report can be rebuilt from any bundle)."""
from __future__ import annotations


def _fmt(v, spec=".3f"):
    return "n/a" if v is None else format(v, spec)


def _analyze(manifest: dict) -> dict:
    return next((s["metrics"] for s in manifest["stages"] if s["name"] == "analyze"), {})


def markdown(manifest: dict) -> str:
    a, q = _analyze(manifest), manifest.get("quality", {})
    arts = {x["role"]: x for x in [*manifest.get("artifacts", []), *manifest.get("reference", [])]}
    meas = manifest.get("measurements", [])
    devices = sorted({m["device"] for m in meas})
    batches = sorted({m["batch"] for m in meas})
    lines = [f"# {manifest['name']}: compression report", "",
             f"Made {manifest['created']} with torch {manifest['toolchain'].get('torch')}, "
             f"onnxruntime {manifest['toolchain'].get('onnxruntime')}; seed {manifest['seed']}.", ""]

    def p50(role, device, batch):
        path = arts.get(role, {}).get("path")
        m = next((m for m in meas if m["device"] == device and m["batch"] == batch and m["artifact"] == path), None)
        return m["p50_ms"] if m else None

    head = ["model", "params", "MFLOPs", "ONNX MB", "held-out accuracy"]
    for d in devices:
        head += [f"{d} p50 b{b} (ms)" for b in batches]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for role in ("teacher", "student"):
        info = a.get(role, {})
        acc = q.get(role, {}).get("accuracy")
        row = [role, f"{info.get('params', 0):,}", _fmt(info.get("flops", 0) / 1e6, ".1f"),
               _fmt(arts.get(role, {}).get("bytes", 0) / 1e6), _fmt(acc, ".4f")]
        for d in devices:
            row += [_fmt(p50(role, d, b)) for b in batches]
        lines.append("| " + " | ".join(row) + " |")
    lines.append("")
    t, s = a.get("teacher", {}), a.get("student", {})
    if t and s:
        ratio = [f"{t['params'] / max(s['params'], 1):.1f}x fewer parameters",
                 f"{t['flops'] / max(s['flops'], 1):.1f}x fewer FLOPs"]
        for d in devices:
            for b in batches:
                ts, ss = p50("teacher", d, b), p50("student", d, b)
                if ts and ss:
                    ratio.append(f"{ts / ss:.1f}x faster on {d} at batch {b}")
        if "retained" in q:
            ratio.append(f"{100 * q['retained']:.1f}% of the teacher's accuracy kept")
        if "onnx_accuracy" in q.get("student", {}):
            ratio.append(f"ONNX Runtime accuracy of the shipped file {q['student']['onnx_accuracy']:.4f}")
        lines += ["Student against teacher: " + "; ".join(ratio) + ".", ""]

    if manifest.get("budgets"):
        lines += ["## Budgets", "", "| budget | limit | value | met |", "|---|---|---|---|"]
        for b in manifest["budgets"]:
            met = {True: "yes", False: "**no**", None: "not measured"}[b["met"]]
            lines.append(f"| {b['budget']} | {b['limit']} | {_fmt(b['value'], '.4g')} | {met} |")
        lines.append("")

    if meas:
        lines += ["## Measurements", "",
                  "| device | file | batch | p50 | p90 | p99 | mean | std | cv | runs | threads | runtime | kind |",
                  "|" + "---|" * 13]
        for m in meas:
            lines.append(f"| {m['device']} | {m['artifact']} | {m['batch']} | {m['p50_ms']:.3f} | {m['p90_ms']:.3f} | "
                         f"{m['p99_ms']:.3f} | {m['mean_ms']:.3f} | {m['std_ms']:.3f} | {m['cv']:.2f} | {m['runs']} | "
                         f"{m['threads']} | {m['runtime']} {m['runtime_version']} | "
                         f"{'estimated' if m['estimated'] else 'measured'} |")
        host = meas[0].get("host", {})
        lines += ["", f"Latencies in milliseconds. Host: {host.get('cpu_model', 'unknown CPU')}, "
                      f"governor {host.get('governor', 'unknown')}.", ""]
    skipped = next((s["metrics"].get("skipped") for s in manifest["stages"] if s["name"] == "profile"), None)
    if skipped:
        lines += ["Not measured: " + "; ".join(f"{k} ({v})" for k, v in skipped.items()) + ".", ""]

    lines += ["## Stages", "", "| stage | seconds | parent |", "|---|---|---|"]
    for s in manifest["stages"]:
        lines.append(f"| {s['name']} | {s['seconds']:.1f} | {s['parent'] or ''} |")
    lines += ["", "Re-measure on a device with only onnxruntime and numpy: "
              "`python bench.py model/student.onnx --batch 1 --threads 2`.", ""]
    return "\n".join(lines)
