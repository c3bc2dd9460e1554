#!/usr/bin/env python3
"""Epoch time of distillation against plain training, same student, same data, one run: the quickstart's
student trained with cross-entropy alone, with KD + CE running the teacher on every batch, and with KD + CE
reading the teacher's outputs computed once (compressor.distill.cache).

    python benchmarks/distill_speed.py [--epochs 3] [--recipe quickstart]

Writes benchmarks/results/distill_speed.json and .md.
"""
from __future__ import annotations

import argparse
import copy
import json
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))
from host import machine  # noqa: E402

KD_CE = [{"name": "kd", "weight": 0.7, "temperature": 4.0}, {"name": "ce", "weight": 0.3}]
# The quickstart-prune recipe's kind of term: the last stage's features, normalised (LAPTOP-Diff).
FEAT = KD_CE + [{"name": "feature_norm", "weight": 1.0, "pairs": [["stages.2", "stages.2"]]}]
SETTINGS = (  # label, losses, cache_teacher, precision
    ("plain CE (no teacher)", [{"name": "ce", "weight": 1.0}], True, "32-true"),
    ("KD + CE, teacher every batch", KD_CE, False, "32-true"),
    ("KD + CE, teacher outputs cached", KD_CE, True, "32-true"),
    ("KD + CE, teacher outputs cached, bf16 autocast", KD_CE, True, "bf16-mixed"),
    ("KD + CE + feature_norm, teacher every batch", FEAT, False, "32-true"),
    ("KD + CE + feature_norm, teacher outputs and features cached", FEAT, True, "32-true"),
)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--recipe", default="quickstart")
    ap.add_argument("--epochs", type=int, default=15, help="the quickstart's own (quality is compared too)")
    ap.add_argument("--results", type=Path, default=ROOT / "benchmarks" / "results")
    args = ap.parse_args()

    import torch

    from compressor.context import build_student, load_inputs
    from compressor.distill.train import fit
    from compressor.recipe import load_recipe

    recipe = load_recipe(args.recipe)
    data, teacher, _ = load_inputs(recipe)
    torch.manual_seed(recipe.seed)
    student, _ = build_student(recipe, data)
    rows = []
    with tempfile.TemporaryDirectory(prefix="distill-speed-") as tmp:
        for label, losses, cached, prec in SETTINGS:
            trainer = recipe.distill.trainer.model_copy(update={"precision": prec})
            spec = recipe.distill.model_copy(update={"epochs": args.epochs, "cache_teacher": cached, "trainer": trainer,
                                                     "losses": [type(recipe.distill.losses[0])(**l) for l in losses]})
            s = copy.deepcopy(student)
            out = fit(s, teacher, data, spec, recipe.data, Path(tmp) / label.replace(" ", "_") / "ckpt",
                      seed=recipe.seed, log=lambda line: None)
            from compressor.tasks import get_task

            test = get_task(recipe.task).score(s, data, recipe.data.batch_size)
            rows.append({"setting": label, "precision": prec, "epochs": args.epochs, "seconds": out["train_seconds"],
                         "test_accuracy": test["accuracy"],
                         "epoch_seconds": out["train_seconds"] / args.epochs, "teacher_outputs": out["teacher_outputs"],
                         "best_val_acc": out["best_val_acc"]})
            print(label, rows[-1])
    base = rows[0]["epoch_seconds"]
    for r in rows:
        r["ratio_to_plain"] = r["epoch_seconds"] / base
    res = {"benchmark": "distill_speed", "recipe": args.recipe, "machine": machine(), "rows": rows,
           "train_samples": len(data.train), "batch_size": recipe.data.batch_size}
    args.results.mkdir(parents=True, exist_ok=True)
    (args.results / "distill_speed.json").write_text(json.dumps(res, indent=2) + "\n")
    (args.results / "distill_speed.md").write_text(markdown(res))
    print(markdown(res))


def markdown(res: dict) -> str:
    m = res["machine"]
    lines = ["# Distillation epoch time against plain training", "",
             f"{m['date']}, {m['cpu']}, {m['cores']} cores, CPU flags: "
             f"{', '.join(f for f, on in m['cpu_flags'].items() if on) or 'none of note'}; recipe {res['recipe']} "
             f"({res['train_samples']} training samples, batch {res['batch_size']}). The same student and data in "
             "each row, trained one after the other in one process; epoch time includes validation.", "",
             "| setting | teacher | precision | s per epoch | vs plain CE | best val accuracy | held-out accuracy |",
             "|---|---|---|---|---|---|---|"]
    for r in res["rows"]:
        lines.append(f"| {r['setting']} | {r['teacher_outputs']} | {r['precision']} | {r['epoch_seconds']:.2f} | "
                     f"{r['ratio_to_plain']:.2f}x | {r['best_val_acc']:.4f} | {r['test_accuracy']:.4f} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
