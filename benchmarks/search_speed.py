"""Search speed on this machine's cores: one `compress search` process against several workers on one
shared SQLite study (issue 3: candidates scored per minute on 2 cores, goal 300 or more).

The recipe is the quickstart's (the digits ResNet teacher at 32x32, trained on first use and cached)
with a DisWOT search under its 1 MB size budget and no latency target, so every second goes to
building candidates, scoring them and storing the study. Each process runs at one torch thread (the
search stage's setting). Reported per setting: trials stored, candidates each process scored, the
search's own seconds (from best.json), and the wall time of the whole command (teacher load and
interpreter start-up included).

    python benchmarks/search_speed.py [--trials 300] [--workers 1 2]

Writes benchmarks/results/search_speed.json and .md.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from compressor.bundle import toolchain_versions  # noqa: E402
from devices.bench_onnxruntime import host_info  # noqa: E402


def recipe(trials: int, population: int) -> dict:
    r = yaml.safe_load((ROOT / "profiles" / "recipes" / "quickstart.yaml").read_text())
    r["search"] = {"proxy": "diswot", "trials": trials, "population": population}
    r["targets"] = []
    r["budgets"] = {"size_mb": 1.0}
    r.pop("student", None)
    return r


def cache_teacher(path: Path) -> None:
    """Train (or find) the teacher once, before any timed setting: workers starting together would
    each train it."""
    from compressor.data import load_data
    from compressor.recipe import load_recipe
    from compressor.teacher import load_teacher

    r = load_recipe(path)
    load_teacher(r, load_data(r.data, r.seed), log=print)


def run(path: Path, workers: int, tmp: Path) -> dict:
    """`workers` processes on one study (one process: a plain `compress search`); wall time and best.json."""
    storage = f"sqlite:///{tmp}/study-{workers}.db"
    cmd = [sys.executable, "-m", "compressor.cli", "search", str(path), "--storage", storage, "--study", "speed"]
    t0 = time.time()
    procs = [subprocess.Popen(cmd + (["--worker"] if workers > 1 else []) + ["--out", str(tmp / f"w{workers}-{i}")],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(workers)]
    for p in procs:
        _, err = p.communicate(timeout=1800)
        if p.returncode != 0:
            raise SystemExit(f"a search process failed: {err.strip().splitlines()[-1] if err.strip() else p.returncode}")
    wall = time.time() - t0
    bests = [json.loads((tmp / f"w{workers}-{i}" / "best.json").read_text()) for i in range(workers)]
    scored = sum(b["scored_here"] for b in bests)
    search_s = max(b["seconds"] for b in bests)  # the workers run side by side: the slowest one's search
    return {"workers": workers, "trials": max(b["trials"] for b in bests), "scored": scored,
            "scored_per_process": [b["scored_here"] for b in bests],
            "search_seconds": round(search_s, 2), "wall_seconds": round(wall, 2),
            "per_minute_search": round(60 * scored / search_s, 1),
            "per_minute_wall": round(60 * scored / wall, 1)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trials", type=int, default=300)
    ap.add_argument("--population", type=int, default=30)
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--note", default="", help="what else ran on the machine")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = ap.parse_args(argv)

    load = [round(x, 2) for x in os.getloadavg()]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        path = tmp / "recipe.yaml"
        path.write_text(yaml.safe_dump(recipe(args.trials, args.population)))
        cache_teacher(path)
        for w in args.workers:
            rows.append(run(path, w, tmp))
            print(json.dumps(rows[-1]))
    out = {"benchmark": "search_speed", "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
           "host": host_info(), "cpus": os.cpu_count(), "load_average_start": load,
           "load_average_end": [round(x, 2) for x in os.getloadavg()], "note": args.note,
           "versions": toolchain_versions(), "setup": {"trials": args.trials, "population": args.population,
                                                     "proxy": "diswot", "recipe": "quickstart + search",
                                                     "size_mb": 1.0}, "rows": rows}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "search_speed.json").write_text(json.dumps(out, indent=2) + "\n")
    md = ["# Search speed: one process against workers on a shared study", "",
          f"{out['created']}; {out['host'].get('cpu_model', 'CPU')}, {out['cpus']} cores; load average "
          f"{load} at the start, {out['load_average_end']} at the end. {args.note}".rstrip(), "",
          f"The quickstart teacher (digits ResNet, 32x32), DisWOT, NSGA-II, {args.trials} trials, population "
          f"{args.population}, size budget 1 MB, no latency target; SQLite study; one torch thread per process.",
          "", "| processes | trials | candidates scored | search s | candidates/min (search) | wall s | "
          "candidates/min (wall) |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        md.append(f"| {r['workers']} | {r['trials']} | {r['scored']} ({' + '.join(map(str, r['scored_per_process']))}) | "
                  f"{r['search_seconds']} | **{r['per_minute_search']}** | {r['wall_seconds']} | {r['per_minute_wall']} |")
    md += ["", "Candidates scored are distinct genomes (a repeated genome is looked up, not scored again). Wall "
           "time includes each process's start-up and loading the cached teacher."]
    (args.out / "search_speed.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    sys.exit(main())
