"""Tables and plots for humans, from the manifest alone (so a report can be rebuilt from any bundle).

``markdown(manifest)`` -> report.md; ``html(manifest, bundle_dir)`` -> report.html, one self-contained
page (plots embedded as PNG data URIs, drawn with matplotlib's Agg backend: no display needed).
"""
from __future__ import annotations

import base64
import io
import json
from html import escape
from pathlib import Path


def _fmt(v, spec=".3f"):
    return "n/a" if v is None else format(v, spec)


def _stage(manifest: dict, name: str) -> dict:
    return next((s for s in manifest.get("stages", []) if s["name"] == name), {})


def _analyze(manifest: dict) -> dict:
    return _stage(manifest, "analyze").get("metrics", {})


def _metric(manifest: dict) -> str:
    """The task's quality metric (manifests before tasks existed were classification)."""
    return manifest.get("task", {}).get("metric", "accuracy")


# How a metric reads in a column header and a sentence.
LABELS = {"accuracy": "accuracy", "agreement": "agreement with the teacher"}


def _ran(manifest: dict) -> list[dict]:
    """The stages that did something (search, prune, quantize without a recipe section are left out)."""
    return [s for s in manifest.get("stages", []) if not s.get("metrics", {}).get("skipped")]


def _bench_command(manifest: dict) -> str:
    dims = manifest.get("data", {}).get("dims") or {}
    dims = {**dims, **manifest.get("recipe", {}).get("profile", {}).get("dims", {})}
    extra = "".join(f" --dim {k}={v}" for k, v in dims.items())
    return f"python bench.py model/student.onnx --batch 1 --threads 2{extra}"


def models(manifest: dict) -> list[dict]:
    """One row per measured file (teacher first): key (student, student_int8, ...), role, precision, path,
    bytes, params, flops, quality (the task metric). Params/FLOPs come from the profile stage (counted after search and
    prune changed the student) and fall back to analyze."""
    a, q = _analyze(manifest), manifest.get("quality", {})
    prof = _stage(manifest, "profile").get("metrics", {})
    rows = []
    for art in [*manifest.get("reference", []), *manifest.get("artifacts", [])]:
        role, prec = art.get("role", "model"), art.get("precision", "fp32")
        key = role if prec == "fp32" else f"{role}_{prec}"
        qual = q.get(key, {})
        metric = _metric(manifest)
        acc = qual.get(f"onnx_{metric}", qual.get(metric))  # the shipped file's own quality first
        rows.append({"key": key, "role": role, "precision": prec, "path": art.get("path"),
                     "bytes": art.get("bytes"), "quality": acc,
                     "params": prof.get("params", {}).get(role, a.get(role, {}).get("params")),
                     "flops": prof.get("flops", {}).get(role, a.get(role, {}).get("flops"))})
    order = {"teacher": 0}
    return sorted(rows, key=lambda r: (order.get(r["role"], 1), r["precision"] != "fp32", r["key"]))


def _measurement(manifest: dict, path: str, device: str, batch: int) -> dict | None:
    return next((m for m in manifest.get("measurements", [])
                 if m["device"] == device and m["batch"] == batch and m["artifact"] == path), None)


def _p50(manifest, path, device, batch):
    m = _measurement(manifest, path, device, batch)
    return m["p50_ms"] if m else None


def _pct(v):
    return "n/a" if v is None else f"{100 * v:.1f}%"


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
    skipped = _stage(manifest, "profile").get("metrics", {}).get("skipped")
    if skipped:
        lines += ["Not measured: " + "; ".join(f"{k} ({v})" for k, v in skipped.items()) + ".", ""]

    lines += ["## Stages", "", "| stage | seconds | parent |", "|---|---|---|"]
    for s in _ran(manifest):
        lines.append(f"| {s['name']} | {s['seconds']:.1f} | {s['parent'] or ''} |")
    lines += ["", f"Re-measure on a device with only onnxruntime and numpy: `{_bench_command(manifest)}`.", ""]
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------- HTML

COLORS = {"teacher": "#444444", "student": "#1f77b4", "student_int8": "#d62728"}
CSS = """
body { font: 15px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; color: #222;
       max-width: 1100px; margin: 24px auto; padding: 0 16px; }
h1 { font-size: 26px; margin-bottom: 4px; } h2 { font-size: 20px; margin-top: 28px;
     border-bottom: 1px solid #ddd; padding-bottom: 4px; }
.meta { color: #666; font-size: 13px; }
.cards { display: flex; gap: 12px; flex-wrap: wrap; margin: 16px 0; }
.card { border: 1px solid #ddd; border-radius: 6px; padding: 10px 14px; min-width: 150px; }
.card b { display: block; font-size: 22px; } .card span { color: #666; font-size: 12px; }
table { border-collapse: collapse; margin: 8px 0 12px; font-size: 14px; }
th, td { border: 1px solid #ddd; padding: 4px 9px; text-align: right; }
th { background: #f3f5f7; } td:first-child, th:first-child, td.t { text-align: left; }
tr:nth-child(even) td { background: #fafafa; }
.no { color: #b00020; font-weight: 600; } .yes { color: #0a7a2f; }
img { max-width: 100%; border: 1px solid #eee; }
.note { color: #555; font-size: 13px; }
"""


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _png(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    _plt().close(fig)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _candidates(manifest: dict, bundle_dir: Path | None) -> tuple[list[dict], list[dict], dict | None]:
    """(all candidates, Pareto front, chosen) of a search stage; empty when there was no search."""
    rec = _stage(manifest, "search")
    m = rec.get("metrics", {}) if rec else {}
    front, best = list(m.get("front") or []), m.get("best")
    everything = []
    rel = (rec.get("outputs") or {}).get("candidates") if rec else None
    if bundle_dir and rel and (Path(bundle_dir) / rel).is_file():
        try:
            everything = json.loads((Path(bundle_dir) / rel).read_text()).get("candidates", [])
        except (ValueError, OSError):
            everything = []
    return everything, front, best


def _quality_latency_plot(manifest: dict, bundle_dir: Path | None) -> str | None:
    rows = models(manifest)
    meas = manifest.get("measurements", [])
    devices = sorted({m["device"] for m in meas})
    if not devices:
        return None
    everything, front, best = _candidates(manifest, bundle_dir)
    with_search = bool(front or everything)
    plt = _plt()
    ncol = 2 if with_search else 1
    fig, axes = plt.subplots(len(devices), ncol, figsize=(5.4 * ncol, 3.9 * len(devices)), dpi=110, squeeze=False)
    for i, dev in enumerate(devices):
        ax = axes[i][0]
        for b in sorted({1, max(m["batch"] for m in meas)}):
            marker = "o" if b == 1 else "s"
            for r in rows:
                m = _measurement(manifest, r["path"], dev, b)
                if m is None or r["quality"] is None:
                    continue
                per = m["p50_ms"] / b
                ax.scatter([per], [100 * r["quality"]], s=70, marker=marker, color=COLORS.get(r["key"], "#2ca02c"),
                           edgecolors="k", linewidths=0.5, zorder=3,
                           label=f"{r['key']} b{b}")
                ax.annotate(r["key"], (per, 100 * r["quality"]), textcoords="offset points", xytext=(6, 4),
                            fontsize=8)
        xs = [x for line in ax.collections for x in line.get_offsets()[:, 0]]
        if xs and max(xs) > 4 * min(xs):  # a log axis only where the spread needs one
            from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

            ax.set_xscale("log")
            ax.xaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
            ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
            ax.xaxis.set_minor_formatter(NullFormatter())
            ax.set_xlabel("p50 latency per sample (ms, log scale)")
        else:
            ax.set_xlabel("p50 latency per sample (ms)")
        ax.set_ylabel(f"held-out {LABELS.get(_metric(manifest), _metric(manifest))} (%)")
        ax.set_title(f"{dev}: quality vs latency", fontsize=11)
        ax.grid(alpha=0.3, which="both")
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7, loc="lower right")
        if with_search:
            ax = axes[i][1]
            lat = lambda c: (c.get("metrics", {}).get("latency_ms") or {}).get(dev)  # noqa: E731
            pts = [c for c in everything if lat(c) is not None]
            if pts:
                ax.scatter([lat(c) for c in pts], [c["metrics"]["score"] for c in pts], s=12,
                           c=["tab:blue" if c.get("feasible", True) else "0.75" for c in pts], label="candidates")
            f = sorted([c for c in front if lat(c) is not None], key=lat)
            if f:
                ax.plot([lat(c) for c in f], [c["metrics"]["score"] for c in f], "o-", c="tab:red", ms=4,
                        label="Pareto front")
            if best and lat(best) is not None:
                ax.scatter([lat(best)], [best["metrics"]["score"]], marker="*", s=200, c="gold", edgecolors="k",
                           zorder=5, label="chosen student")
            label = (best or (f[0] if f else {})).get("metrics", {}).get("latency_label", "")
            ax.set_xlabel(f"latency at batch 1 (ms{', ' + label if label else ''})")
            ax.set_ylabel("proxy score (higher is better)")
            ax.set_title(f"{dev}: search candidates", fontsize=11)
            ax.grid(alpha=0.3)
            if not (pts or f):
                ax.text(0.5, 0.5, "no latency for this device in the search", ha="center", transform=ax.transAxes)
            else:
                ax.legend(fontsize=7)
    fig.tight_layout()
    return _png(fig)


def _timeline_plot(manifest: dict) -> str | None:
    stages = _ran(manifest)
    if not stages:
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(9, 0.45 * len(stages) + 1.0), dpi=110)
    start = 0.0
    for i, s in enumerate(stages):
        ax.barh(i, max(s["seconds"], 0.01), left=start, color="tab:blue" if s["seconds"] >= 0.05 else "0.7")
        ax.text(start + s["seconds"], i, f" {s['seconds']:.1f} s", va="center", fontsize=8)
        start += s["seconds"]
    ax.set_yticks(range(len(stages)), [s["name"] for s in stages])
    ax.invert_yaxis()
    ax.set_xlabel("seconds since the run started (stages one after another)")
    ax.set_xlim(0, start * 1.12 + 0.1)
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    return _png(fig)


def _table(head: list[str], rows: list[list]) -> str:
    out = ["<table><tr>" + "".join(f"<th>{escape(str(h))}</th>" for h in head) + "</tr>"]
    for r in rows:
        out.append("<tr>" + "".join(f"<td>{c}</td>" for c in r) + "</tr>")
    return "\n".join(out) + "</table>"


def html(manifest: dict, bundle_dir: str | Path | None = None) -> str:
    """The report as one HTML page. With ``bundle_dir`` it is also written there as report.html
    (atomically) and the search's full candidate list is read from the bundle when present."""
    e = lambda v: escape(str(v))  # noqa: E731
    rows = models(manifest)
    by = {r["key"]: r for r in rows}
    q = manifest.get("quality", {})
    meas = manifest.get("measurements", [])
    devices = sorted({m["device"] for m in meas})
    batches = sorted({m["batch"] for m in meas})
    tc = manifest.get("toolchain", {})
    host = meas[0].get("host", {}) if meas else {}
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>{e(manifest['name'])}: compression report"
             f"</title><style>{CSS}</style></head><body>",
             f"<h1>{e(manifest['name'])}: compression report</h1>",
             f"<p class='meta'>Made {e(manifest.get('created', ''))}; torch {e(tc.get('torch'))}, onnxruntime "
             f"{e(tc.get('onnxruntime'))}, python {e(tc.get('python'))}; seed {e(manifest.get('seed'))}; host "
             f"{e(host.get('cpu_model', 'unknown CPU'))}.</p>"]

    # Headline cards: what a reader wants in five seconds.
    t, s = by.get("teacher", {}), by.get("student", {})
    cards = []
    if t.get("params") and s.get("params"):
        cards.append((f"{t['params'] / s['params']:.1f}x", "fewer parameters"))
    if t.get("flops") and s.get("flops"):
        cards.append((f"{t['flops'] / s['flops']:.1f}x", "fewer FLOPs"))
    for d in devices[:2]:
        ts, ss = _p50(manifest, t.get("path"), d, 1), _p50(manifest, s.get("path"), d, 1)
        if ts and ss:
            cards.append((f"{ts / ss:.1f}x", f"faster on {d}, batch 1"))
    if "retained" in q:
        cards.append((f"{100 * q['retained']:.1f}%", f"of the teacher's {_metric(manifest)}"))
    if cards:
        parts.append("<div class='cards'>" + "".join(f"<div class='card'><b>{e(v)}</b><span>{e(k)}</span></div>"
                                                     for v, k in cards) + "</div>")

    parts.append("<h2>Models</h2>")
    parts.append(_table(["model", "file", "params", "MFLOPs", "file MB",
                         f"held-out {LABELS.get(_metric(manifest), _metric(manifest))}"],
                        [[e(r["key"]), f"<code>{e(r['path'])}</code>", f"{r['params'] or 0:,}", _fmt((r["flops"] or 0) / 1e6, ".1f"),
                          _fmt((r["bytes"] or 0) / 1e6), _fmt(r["quality"], ".4f")] for r in rows]))
    parts.append("<p class='note'>Quality of the exported file in ONNX Runtime where measured (students), else "
                 "of the PyTorch model (teacher).</p>")

    img = _quality_latency_plot(manifest, Path(bundle_dir) if bundle_dir else None)
    if img:
        parts += ["<h2>Quality against latency</h2>", f"<img alt='quality against latency' src='{img}'>",
                  "<p class='note'>Per-sample latency is p50 / batch. Search candidates are scored by the zero-cost "
                  "proxy before training, so their axis is the proxy score, not accuracy.</p>"]

    peaks = _stage(manifest, "profile").get("metrics", {}).get("peak_gflops") or {}
    for d in devices:
        parts.append(f"<h2>{e(d)}</h2>")
        body = []
        for r in rows:
            for b in batches:
                m = _measurement(manifest, r["path"], d, b)
                if m is None:
                    continue
                ts = _p50(manifest, t.get("path"), d, b)
                body.append([e(r["key"]), b, f"{m['p50_ms']:.3f}", f"{m['p90_ms']:.3f}", f"{m['p99_ms']:.3f}",
                             f"{m['cv']:.2f}", _fmt(m.get("gflops"), ".2f"), _pct(m.get("roofline")),
                             _fmt(ts / m["p50_ms"] if ts else None, ".2f") + "x",
                             e(f"{m['runtime']} {m['runtime_version']}"), m["threads"],
                             "estimated" if m["estimated"] else "measured"])
        parts.append(_table(["model", "batch", "p50 ms", "p90 ms", "p99 ms", "cv", "GFLOP/s", "of peak",
                             "speed-up vs teacher", "runtime", "threads", "kind"], body))
        if d in peaks:
            parts.append(f"<p class='note'>Peak {peaks[d]['gflops']:.1f} GFLOP/s ({e(peaks[d]['source'])}). "
                         "GFLOP/s = FLOPs per sample x batch / p50; int8 files are charged the same FLOPs, so their "
                         "share can pass 100%. The probe varies by about 10% from run to run.</p>")
    skipped = _stage(manifest, "profile").get("metrics", {}).get("skipped")
    if skipped:
        parts.append("<p class='note'>Not measured: " + "; ".join(f"{e(k)} ({e(v)})" for k, v in skipped.items())
                     + ".</p>")

    if manifest.get("budgets"):
        parts.append("<h2>Budgets</h2>")
        parts.append(_table(["budget", "limit", "value", "met"],
                            [[e(b["budget"]), e(b["limit"]), _fmt(b["value"], ".4g"),
                              {True: "<span class='yes'>yes</span>", False: "<span class='no'>no</span>",
                               None: "not measured"}[b["met"]]] for b in manifest["budgets"]]))

    parts.append("<h2>Stages</h2>")
    img = _timeline_plot(manifest)
    if img:
        parts.append(f"<img alt='stage timeline' src='{img}'>")
    parts.append(_table(["stage", "started", "seconds", "parent"],
                        [[e(s["name"]), e(s.get("started", "")), f"{s['seconds']:.1f}", e(s.get("parent") or "")]
                         for s in _ran(manifest)]))
    parts.append("<p class='note'>Re-measure on a device with only onnxruntime and numpy: "
                 f"<code>{e(_bench_command(manifest))}</code>.</p></body></html>")
    page = "\n".join(parts)
    if bundle_dir is not None:
        from .bundle import atomic_write

        atomic_write(Path(bundle_dir) / "report.html", page)
    return page
