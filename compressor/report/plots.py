"""The HTML report's plots (quality against latency, the stage timeline), drawn with matplotlib's Agg
backend and returned as PNG data URIs."""
from __future__ import annotations

import base64
import io
import json
from pathlib import Path

from .manifest import LABELS, _measurement, _metric, _ran, _stage, models

COLORS = {"teacher": "#444444", "student": "#1f77b4", "student_int8": "#d62728"}


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
