#!/usr/bin/env python3
"""Wall time of the quickstart as a new user meets it: `compress run` in a fresh directory with an empty
teacher cache, so the first run's teacher training is included. With ``--against REV`` the same runs of that
commit (a detached git worktree) alternate with this checkout's, back to back on one machine, and the
summary gives the ratio.

    python benchmarks/quickstart_time.py [--runs 2] [--against HEAD~1] [--recipe quickstart]
    python benchmarks/quickstart_time.py --avx2 --name quickstart_time.avx2
    python benchmarks/quickstart_time.py --recipe minilm-l6 --runs 1 --against 88e2e89 --timeout 3600 --name minilm_time

``--timeout S`` stops a run after S seconds and records it as stopped: its wall time is then a lower bound (a
run at least 3x as long as the other is shown so without waiting for it to end).

``--avx2`` runs it as an AVX2-only host would, as far as one CPU can pretend to be another: torch's own kernels,
oneDNN and MKL limited to AVX2 (ATEN_CPU_CAPABILITY, ONEDNN_MAX_CPU_ISA, MKL_ENABLE_INSTRUCTIONS) and fp32
training (the precision an AVX2 host resolves to). ONNX Runtime has no such switch, so export's parity check and
the profile stage keep AVX-512; clock and caches stay this CPU's. A proxy, labelled so, not a measurement of an
AVX2 host.

Writes benchmarks/results/quickstart_time.json and .md (``--name`` for another pair).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))
from host import machine  # noqa: E402


def git(*args, cwd=ROOT) -> str:
    return subprocess.run(["git", *args], cwd=cwd, check=True, capture_output=True, text=True).stdout.strip()


# What --avx2 sets: the ISA limits of torch's kernels, oneDNN and MKL, and the recipe's fp32 training
AVX2_ENV = {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2", "MKL_ENABLE_INSTRUCTIONS": "AVX2"}
AVX2_SET = ("teacher.train.precision=32-true", "distill.trainer.precision=32-true")


def one_run(source: Path, recipe: str, label: str, commit: str, env_extra: dict | None = None,
            overrides=(), timeout: float | None = None) -> dict:
    """`compress run recipe` from ``source`` (a checkout: its packages first on the path) in a new directory
    with an empty COMPRESSOR_CACHE; the wall time, the pipeline's own seconds and the manifest's figures."""
    with tempfile.TemporaryDirectory(prefix="quickstart-time-") as tmp:
        tmp = Path(tmp)
        env = {**os.environ, "COMPRESSOR_CACHE": str(tmp / "cache"),
               "PYTHONPATH": os.pathsep.join([str(source), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep),
               **(env_extra or {})}
        t0 = time.perf_counter()
        sets = [a for o in overrides for a in ("--set", o)]
        try:
            p = subprocess.run([sys.executable, "-m", "compressor.cli", "run", recipe, "--out", str(tmp / "run"), *sets],
                               cwd=tmp, env=env, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            return {"setting": label, "commit": commit, "wall_s": round(time.perf_counter() - t0, 1), "stopped": True,
                    "pipeline_s": None, "stages_s": {}, "quality": {}}
        wall = time.perf_counter() - t0
        if p.returncode:
            raise SystemExit(f"{label} ({commit}) failed:\n{p.stdout[-2000:]}\n{p.stderr[-2000:]}")
        log = p.stdout + p.stderr
        m = re.search(r"bundle written to .* in (\d+) s", log)
        man = json.loads((tmp / "run" / "manifest.json").read_text())
    quality = man.get("quality", {})
    prof = next((s.get("metrics", {}) for s in man["stages"] if s["name"] == "profile"), {})
    return {"setting": label, "commit": commit, "wall_s": round(wall, 1),
            "pipeline_s": int(m.group(1)) if m else None,
            "teacher_train_s": (man.get("teacher") or {}).get("train_seconds"),
            "teacher_precision": (man.get("teacher") or {}).get("precision"),
            "stages_s": {s["name"]: s["seconds"] for s in man["stages"] if s.get("seconds", 0) >= 0.05},
            "teacher_accuracy": (quality.get("teacher") or {}).get("accuracy"),
            "student_accuracy": (quality.get("student") or {}).get("accuracy"),
            "quality": {k: round(v, 4) for k, v in (quality.get("student") or {}).items() if isinstance(v, float)},
            "teacher_outputs": next((s.get("metrics", {}).get("teacher_outputs") for s in man["stages"]
                                     if s["name"] == "distill"), None),
            "p50_ms": {d: {k.removesuffix("_p50_ms"): round(v, 3) for k, v in ms.items() if k.endswith("_p50_ms")}
                       for d, ms in prof.items() if isinstance(ms, dict) and any(k.endswith("_p50_ms") for k in ms)}}


def summarise(rows: list[dict]) -> dict:
    out = {}
    for label in dict.fromkeys(r["setting"] for r in rows):
        rs = [r for r in rows if r["setting"] == label]
        out[label] = {"runs": len(rs), "commit": rs[0]["commit"], "stopped": sum(bool(r.get("stopped")) for r in rs),
                      "wall_s_median": round(statistics.median(r["wall_s"] for r in rs), 1),
                      "pipeline_s_median": statistics.median(r["pipeline_s"] for r in rs if r["pipeline_s"] is not None)
                      if any(r["pipeline_s"] is not None for r in rs) else None}
    if "this checkout" in out and "against" in out:
        # a stopped run's wall time is a lower bound, so the ratio is then an upper bound
        out["wall_ratio"] = round(out["this checkout"]["wall_s_median"] / out["against"]["wall_s_median"], 3)
        out["wall_ratio_bound"] = "at most" if out["against"]["stopped"] and not out["this checkout"]["stopped"] else (
            "at least" if out["this checkout"]["stopped"] and not out["against"]["stopped"] else "")
    return out


def markdown(res: dict) -> str:
    h, s = res["host"], res["summary"]
    flags = ", ".join(f for f, on in h["cpu_flags"].items() if on) or "none of note"
    lines = [f"# `compress run {res['recipe']}` from a fresh directory, teacher training included", "",
             f"{h['date']}, {h['cpu']}, {h['cores']} cores, CPU flags: {flags}. Each run is `compress run "
             f"{res['recipe']}` in a new directory with an empty teacher cache (COMPRESSOR_CACHE), one after the other "
             "in one process tree; wall time includes Python's start and imports, pipeline is the run's own "
             "`bundle written ... in N s`.", "",
             *([f"**AVX2 proxy**: {', '.join(f'{k}={v}' for k, v in res['avx2_proxy']['env'].items())} and "
                f"`--set {'` `--set '.join(res['avx2_proxy']['set'])}`: torch, oneDNN and MKL limited to AVX2 and fp32 "
                "training on this AVX-512 CPU; ONNX Runtime keeps AVX-512 and the clock and caches are this CPU's, so "
                "this approximates, and does not measure, an AVX2-only host.", ""] if res.get("avx2_proxy") else []),
             "| setting | commit | wall (s) | pipeline (s) | teacher training (s) | teacher precision | stages (s) | "
             "student quality | p50 ms (teacher / student) |", "|---|---|---|---|---|---|---|---|---|"]
    for r in res["rows"]:
        if r.get("stopped"):
            lines.append(f"| {r['setting']} | {r['commit']} | > {r['wall_s']:.1f} (stopped) | - | - | - | - | - | - |")
            continue
        st = ", ".join(f"{k} {v:.1f}" for k, v in r["stages_s"].items())
        lat = "; ".join(f"{d} " + ", ".join(f"b{b} {ms.get(f'teacher_b{b}', float('nan')):.3f} / {ms[f'student_b{b}']:.3f}"
                                            for b in (1, 32) if f"student_b{b}" in ms)
                        for d, ms in r.get("p50_ms", {}).items())
        q = r.get("quality") or {"accuracy": r["student_accuracy"]}  # rows from before quality was kept whole
        q = ", ".join(f"{k} {v:.4f}" for k, v in q.items() if k in ("accuracy", "agreement", "probe_accuracy"))
        lines.append(f"| {r['setting']} | {r['commit']} | {r['wall_s']:.1f} | {r['pipeline_s']} | {r['teacher_train_s']} | "
                     f"{r.get('teacher_precision')} | {st} | {q} | {lat} |")
    lines.append("")
    for label, v in s.items():
        if isinstance(v, dict):
            stopped = f" ({v['stopped']} stopped at the timeout: a lower bound)" if v.get("stopped") else ""
            lines.append(f"- {label} ({v['commit']}): median wall {v['wall_s_median']} s, pipeline {v['pipeline_s_median']} s "
                         f"over {v['runs']} run(s){stopped}.")
    if "wall_ratio" in s:
        bound = f"{s['wall_ratio_bound']} " if s.get("wall_ratio_bound") else ""
        lines.append(f"- this checkout / against: {bound}{s['wall_ratio']:.2f}x the wall time.")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--recipe", default="quickstart")
    ap.add_argument("--runs", type=int, default=2, help="runs of each setting, alternating")
    ap.add_argument("--against", help="a git revision to time back to back with this checkout")
    ap.add_argument("--name", default="quickstart_time")
    ap.add_argument("--results", type=Path, default=ROOT / "benchmarks" / "results")
    ap.add_argument("--avx2", action="store_true", help="limit torch, oneDNN and MKL to AVX2 and train in fp32: an "
                    "AVX2-only host as far as this CPU can pretend (a proxy; ONNX Runtime keeps its ISA)")
    ap.add_argument("--timeout", type=float, help="stop a run after this many seconds; it is recorded as stopped, "
                    "its wall time a lower bound")
    args = ap.parse_args()
    env_extra, overrides = (AVX2_ENV, AVX2_SET) if args.avx2 else ({}, ())
    here = git("rev-parse", "--short", "HEAD") + ("+changes" if git("status", "--porcelain", "--untracked-files=no") else "")
    settings = [("this checkout", ROOT, here)]
    worktree = None
    if args.against:
        worktree = Path(tempfile.mkdtemp(prefix="quickstart-against-")) / "src"  # the folder goes with it below
        git("worktree", "add", "--detach", str(worktree), args.against)
        settings.append(("against", worktree, git("rev-parse", "--short", args.against)))
    rows = []
    try:
        for k in range(args.runs):
            for label, source, commit in (settings if k % 2 == 0 else settings[::-1]):
                r = one_run(source, args.recipe, label, commit, env_extra, overrides, args.timeout)
                print(f"{label} {commit}: wall {r['wall_s']} s{' (stopped)' if r.get('stopped') else ''}, pipeline "
                      f"{r['pipeline_s']} s, stages {r['stages_s']}",
                      flush=True)
                rows.append(r)
    finally:
        if worktree is not None:
            git("worktree", "remove", "--force", str(worktree))
            shutil.rmtree(worktree.parent, ignore_errors=True)
    res = {"recipe": args.recipe, "host": machine(), "rows": rows, "summary": summarise(rows),
           **({"avx2_proxy": {"env": AVX2_ENV, "set": list(AVX2_SET)}} if args.avx2 else {})}
    args.results.mkdir(parents=True, exist_ok=True)
    (args.results / f"{args.name}.json").write_text(json.dumps(res, indent=1) + "\n")
    (args.results / f"{args.name}.md").write_text(markdown(res))
    print(markdown(res))


if __name__ == "__main__":
    main()
