"""Quickstart: the teacher pruned (LAPTOP-Diff) then distilled, against a randomly initialised student
of exactly the same architecture distilled the same way, held-out accuracy side by side.

    python benchmarks/quickstart_prune.py --remove 0.5 --epochs 4 --out benchmarks/results/quickstart_prune.json

A ResNet block replaced by identity is a ResNet with one block fewer in that stage, so the random-init
student is the built-in `resnet` with the pruned depths (same parameter count, checked).
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import compressor
from compressor.bundle import read_manifest
from compressor.recipe import load_recipe


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--remove", type=float, default=0.5, help="fraction of the teacher's parameters to remove")
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    log = lambda s: print(s, file=sys.stderr, flush=True)  # noqa: E731
    base = load_recipe("quickstart").model_dump(mode="json")
    base["targets"], base["budgets"] = [], {}
    base["distill"]["epochs"] = args.epochs
    base["distill"]["losses"] = [
        {"name": "kd", "weight": 0.7, "temperature": 4.0}, {"name": "ce", "weight": 0.3},
        {"name": "feature_norm", "weight": 1.0, "pairs": ["stages.0", "stages.1", "stages.2"]}]
    result = {"remove": args.remove, "epochs": args.epochs, "losses": "kd 0.7 + ce 0.3 + feature_norm (stage outputs)"}
    with tempfile.TemporaryDirectory() as tmp:
        pruned = dict(base, prune={"by": "params", "remove": args.remove}, name="qs-pruned")
        man = read_manifest(compressor.run(pruned, Path(tmp) / "pruned", log=log))
        rec = next(s for s in man["stages"] if s["name"] == "prune")
        removed = rec["outputs"]["removed"]
        depths = [2, 2, 2]
        for p in removed:
            depths[int(p.split(".")[1])] -= 1
        result["teacher_accuracy"] = man["quality"]["teacher"]["accuracy"]
        result["removed"], result["pruned_params"] = removed, rec["metrics"]["params"]
        result["pruned_before_distill_loss"] = rec["metrics"]["measured_loss"]
        result["pruned_distilled_accuracy"] = man["quality"]["student"]["accuracy"]
        scratch = dict(base, name="qs-random", student={"model": "resnet", "config": {"widths": [32, 64, 128],
                                                                                        "depths": depths}})
        man = read_manifest(compressor.run(scratch, Path(tmp) / "random", log=log))
        a = next(s for s in man["stages"] if s["name"] == "analyze")
        assert a["metrics"]["student"]["params"] == result["pruned_params"], "architectures differ"
        result["random_init_depths"] = depths
        result["random_init_distilled_accuracy"] = man["quality"]["student"]["accuracy"]
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
