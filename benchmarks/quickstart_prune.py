"""Quickstart: three students of about the same size, distilled the same way, held-out accuracy side by side:

1. pruned: the teacher pruned (LAPTOP-Diff, remove half its parameters), keeping the teacher's weights;
2. searched: the NSGA-II search's choice (zero-cost proxy, size budget = the pruned student's size), random init,
   one row per proxy (DisWOT; params, which fills the budget: a student of about the same size);
3. random-init: exactly the pruned architecture, randomly initialised.

Then the same search seeded with the pruned teacher (search.seed_pruned): where its architecture ranks.

    python benchmarks/quickstart_prune.py --epochs 3 --trials 60 --proxies diswot,params \
        --out benchmarks/results/quickstart_prune.json

A ResNet block replaced by identity is a ResNet with one block fewer in that stage, so the random-init
student is the built-in `resnet` with the pruned depths (same parameter count, checked).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

import compressor
from compressor.bundle import read_manifest
from compressor.models import build_model, count_flops, count_params
from compressor.recipe import load_recipe


def _stage(man, name):
    return next(s for s in man["stages"] if s["name"] == name)


def _student(man) -> torch.nn.Module:
    g = man["student"]
    if "removed" in g:
        from compressor.prune import rebuild

        return rebuild(g)
    return build_model(g["model"], g["config"], g["defaults"])


def _row(man, seconds) -> dict:
    m = _student(man)
    x = torch.zeros(1, 1, 32, 32)
    return {"accuracy": man["quality"]["student"]["accuracy"], "params": count_params(m),
            "mflops": round(count_flops(m, x) / 1e6, 2), "distill_seconds": round(_stage(man, "distill")["seconds"], 1),
            "run_seconds": round(seconds, 1)}


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--remove", type=float, default=0.5, help="fraction of the teacher's parameters to remove")
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--trials", type=int, default=60, help="search trials")
    ap.add_argument("--proxies", default="diswot,params", help="one searched student per proxy")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    log = lambda s: print(s, file=sys.stderr, flush=True)  # noqa: E731
    base = load_recipe("quickstart").model_dump(mode="json")
    base["targets"], base["budgets"] = [], {}
    base["distill"]["epochs"] = args.epochs
    # Stage outputs: the pruned student and the random-init one share the teacher's stage widths; a searched
    # student may not, so it gets KD + CE only (a FitNets regressor would add parameters it does not ship).
    feature = {"name": "feature_norm", "weight": 1.0, "pairs": ["stages.0", "stages.1", "stages.2"]}
    kd = [{"name": "kd", "weight": 0.7, "temperature": 4.0}, {"name": "ce", "weight": 0.3}]
    base["distill"]["losses"] = kd + [feature]
    proxies = args.proxies.split(",")
    result = {"remove": args.remove, "epochs": args.epochs, "trials": args.trials, "proxies": proxies,
              "losses": "kd 0.7 + ce 0.3 + feature_norm (stage outputs; searched student: kd + ce only)",
              "threads": torch.get_num_threads(), "load_before": [round(v, 2) for v in os.getloadavg()]}
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.time()
        pruned = dict(base, prune={"by": "params", "remove": args.remove}, name="qs-pruned")
        man = read_manifest(compressor.run(pruned, Path(tmp) / "pruned", log=log))
        rows["pruned"] = _row(man, time.time() - t0)
        rec = _stage(man, "prune")
        removed = rec["outputs"]["removed"]
        depths = [2, 2, 2]
        for p in removed:
            depths[int(p.split(".")[1])] -= 1
        result["teacher"] = {"accuracy": man["quality"]["teacher"]["accuracy"],
                             **{k: _stage(man, "analyze")["metrics"]["teacher"][k] for k in ("params", "flops")}}
        result["removed"] = removed
        result["pruned_output_loss_before_distill"] = rec["metrics"]["measured_loss"]
        size_mb = 4 * rows["pruned"]["params"] / 1e6

        result["search"] = {"size_mb_budget": round(size_mb, 4)}
        for proxy in proxies:
            t0 = time.time()
            searched = dict(base, name=f"qs-searched-{proxy}", budgets={"size_mb": size_mb},
                            search={"proxy": proxy, "trials": args.trials, "population": 20, "seed_pruned": False})
            searched["distill"] = dict(base["distill"], losses=kd)
            man = read_manifest(compressor.run(searched, Path(tmp) / f"searched-{proxy}", log=log))
            row = rows[f"searched_{proxy}"] = _row(man, time.time() - t0)
            s = _stage(man, "search")
            row["config"] = man["student"]["config"]
            row["proxy_score"] = s["metrics"]["best"]["metrics"]["score"]
            result["search"][proxy] = {k: s["metrics"][k] for k in ("trials", "unique", "feasible", "seconds",
                                                                     "candidates_per_minute")}

        t0 = time.time()
        scratch = dict(base, name="qs-random", student={"model": "resnet", "config": {"widths": [32, 64, 128],
                                                                                        "depths": depths}})
        man = read_manifest(compressor.run(scratch, Path(tmp) / "random", log=log))
        rows["random_init"] = _row(man, time.time() - t0)
        assert rows["random_init"]["params"] == rows["pruned"]["params"], "architectures differ"
        rows["random_init"]["config"] = {"widths": [32, 64, 128], "depths": depths}

        # The same search, seeded with the pruned teacher: does the proxy rank its architecture first?
        from compressor.stages.search import search_command

        searched["search"]["proxy"] = proxies[0]
        seeded = load_recipe(dict(searched, name="qs-seeded", search=dict(searched["search"], seed_pruned={
            "by": "params", "remove": args.remove})))
        best = search_command(seeded, Path(tmp) / "seeded", log=log)
        ps = best["pruned_seed"]
        result["seeded_search"] = {"proxy": proxies[0], "pruned_teacher_chosen": ps["chosen"], "on_pareto_front": ps["on_front"],
                                   "rank_by_proxy_among_feasible": ps["feasible_rank"], "feasible": ps["feasible"],
                                   "chosen_config": best["student"]["config"]}
    result["students"] = rows
    result["load_after"] = [round(v, 2) for v in os.getloadavg()]
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text + "\n")
        out.with_suffix(".md").write_text(markdown(result))


def markdown(r: dict) -> str:
    t = r["teacher"]
    lines = [
        "# Quickstart: pruned teacher vs searched student vs random init (digits 32x32)",
        "",
        f"Teacher: digits-resnet, {t['params']:,} params, {t['flops'] / 1e6:.1f} MFLOPs, held-out accuracy "
        f"{t['accuracy']:.4f}. Each student distilled {r['epochs']} epochs ({r['losses']}). "
        f"Pruning removed {', '.join(r['removed'])} (LAPTOP-Diff, {r['remove']:.0%} of the parameters). "
        f"Search: NSGA-II, {r['trials']} trials, size budget {r['search']['size_mb_budget']} MB (the pruned "
        "student's); " + ", ".join(f"{p} {r['search'][p]['candidates_per_minute']} candidates/min" for p in r["proxies"])
        + ". A searched student's widths differ from the teacher's, so it gets kd + ce without the feature term.",
        "",
        "| student | held-out accuracy | params | MFLOPs | architecture | distill s |",
        "|---|---|---|---|---|---|",
    ]
    names = {"pruned": "pruned teacher, distilled", "random_init": "pruned architecture, random init, distilled",
             **{f"searched_{p}": f"searched ({p} proxy), random init, distilled" for p in r["proxies"]}}
    for k, row in r["students"].items():
        arch = f"depths {row['config']['depths']}" if k == "random_init" else \
            f"removed {', '.join(r['removed'])}" if k == "pruned" else json.dumps(row["config"])
        lines.append(f"| {names[k]} | {row['accuracy']:.4f} | {row['params']:,} | {row['mflops']} | {arch} | "
                     f"{row['distill_seconds']} |")
    s = r["seeded_search"]
    lines += ["", f"Seeded with the pruned teacher (search.seed_pruned), the {s['proxy']} search "
              f"{'chose it' if s['pruned_teacher_chosen'] else 'did not choose it'}: its architecture ranks "
              f"{s['rank_by_proxy_among_feasible']} of {s['feasible']} feasible candidates by the proxy "
              f"({'on' if s['on_pareto_front'] else 'off'} the Pareto front); the proxy scores architectures at "
              "random init, so it cannot see the teacher's weights that the pruned student keeps.",
              "", f"Machine: shared 2-core CPU, torch threads {r['threads']}, load average "
              f"{r['load_before'][0]} before, {r['load_after'][0]} after.", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
