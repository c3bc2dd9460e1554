"""What both reports read from a manifest: the model rows, stages, measurements, the task's metric, and
number formatting."""
from __future__ import annotations


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
    return [s for s in manifest.get("stages", []) if not s.get("skipped")]


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
