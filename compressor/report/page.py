"""report.html: the report as one self-contained page (tables, headline figures, embedded plots)."""
from __future__ import annotations

from html import escape
from pathlib import Path

from .manifest import (
    LABELS,
    _bench_command,
    _fmt,
    _measurement,
    _metric,
    _p50,
    _pct,
    _ran,
    _stage,
    models,
)
from .plots import _quality_latency_plot, _timeline_plot

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
    skipped = _stage(manifest, "profile").get("metrics", {}).get("unavailable")
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
        from ..bundle import atomic_write

        atomic_write(Path(bundle_dir) / "report.html", page)
    return page
