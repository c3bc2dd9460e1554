#!/usr/bin/env python3
"""Epoch time of distillation against plain training, same student, same data, one run: the quickstart's
student trained with cross-entropy alone, with KD + CE running the teacher on every batch, and with KD + CE
reading the teacher's outputs computed once (compressor.distill.cache).

    python benchmarks/distill_speed.py [--epochs 3] [--recipe quickstart]
    python benchmarks/distill_speed.py --recipe minilm-l6 --epochs 1 --out distill_speed.minilm

A recipe without labels to train on (task: embedding) has no plain CE epoch: there the baseline is the student
alone against fixed targets (cosine to the cached teacher embeddings: the teacher does not run), beside the
recipe's own losses with the teacher run on every batch and with its outputs and features cached, all at the
precision the recipe resolves to on this host, and the cached row again with batches of random sentences instead
of sentences of similar length (data.group_by_length). A recipe whose student comes from its prune or search stage
runs those stages first (the same student for every row).

Writes benchmarks/results/distill_speed.json and .md (``--out`` for another name).
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
SETTINGS = (  # label, losses, cache_teacher, precision[, data section overrides]
    ("plain CE (no teacher)", [{"name": "ce", "weight": 1.0}], True, "32-true"),
    ("KD + CE, teacher every batch", KD_CE, False, "32-true"),
    ("KD + CE, teacher outputs cached", KD_CE, True, "32-true"),
    ("KD + CE, teacher outputs cached, bf16 autocast", KD_CE, True, "bf16-mixed"),
    ("KD + CE + feature_norm, teacher every batch", FEAT, False, "32-true"),
    ("KD + CE + feature_norm, teacher outputs and features cached", FEAT, True, "32-true"),
)


def settings_for(recipe) -> tuple:
    """The rows to time: the quickstart's SETTINGS for a classification recipe; for any other task the student
    alone, then the recipe's losses with the teacher live and cached, at the precision auto resolves to."""
    if recipe.task == "classification":
        return SETTINGS
    from compressor.distill.train import precision

    prec = precision(recipe.distill.trainer)[0]
    own = [l.model_dump() for l in recipe.distill.losses]
    names = " + ".join(l["name"] for l in own)
    rows = (("student alone (cosine to the cached teacher embeddings)", [{"name": "cosine", "weight": 1.0}], True, prec),
            (f"{names}, teacher every batch", own, False, prec),
            (f"{names}, teacher outputs and features cached", own, True, prec))
    if recipe.data.group_by_length is not False:  # token inputs: the same with shuffled batches of any lengths
        rows += ((f"{names}, teacher outputs and features cached, batches of random lengths (group_by_length: false)",
                  own, True, prec, {"group_by_length": False}),)
    return rows


def student_of(recipe, work: Path, log):
    """(context, student): the recipe's student, after its search and prune stages where it has them."""
    from compressor.context import make_context
    from compressor.pipeline import run_stages

    ctx = make_context(recipe, work, log)
    run_stages(ctx, until="distill")
    return ctx, ctx.student


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--recipe", default="quickstart")
    ap.add_argument("--epochs", type=int, default=15, help="the quickstart's own (quality is compared too)")
    ap.add_argument("--results", type=Path, default=ROOT / "benchmarks" / "results")
    ap.add_argument("--out", default="distill_speed", help="the results' file name, without .json/.md")
    args = ap.parse_args()

    from compressor.distill.train import fit
    from compressor.recipe import load_recipe

    recipe = load_recipe(args.recipe)
    rows = []
    with tempfile.TemporaryDirectory(prefix="distill-speed-") as tmp:
        ctx, student = student_of(recipe, Path(tmp) / "work", log=lambda line: print(line, file=sys.stderr))
        data, teacher = ctx.data, ctx.teacher
        for label, losses, cached, prec, *data_set in settings_for(recipe):
            data_spec = recipe.data.model_copy(update=data_set[0] if data_set else {})
            trainer = recipe.distill.trainer.model_copy(update={"precision": prec})
            spec = recipe.distill.model_copy(update={"epochs": args.epochs, "cache_teacher": cached, "trainer": trainer,
                                                     "losses": [type(recipe.distill.losses[0])(**l) for l in losses]})
            s = copy.deepcopy(student)
            out = fit(s, teacher, data, spec, data_spec, Path(tmp) / f"row{len(rows)}" / "ckpt",
                      seed=recipe.seed, log=lambda line: None, val_metric=ctx.task.val_metric)
            test = ctx.score(s)
            metric = "accuracy" if "accuracy" in test else "agreement"
            rows.append({"setting": label, "precision": prec, "epochs": args.epochs, "seconds": out["train_seconds"],
                         "test_metric": metric, f"test_{metric}": test[metric], "test": test,
                         "epoch_seconds": out["train_seconds"] / args.epochs, "teacher_outputs": out["teacher_outputs"],
                         "val_metric": ctx.task.val_metric, "best_val": out[f"best_val_{ctx.task.val_metric}"],
                         "group_by_length": data_spec.group_by_length})
            print(label, rows[-1])
    base = rows[0]["epoch_seconds"]
    for r in rows:
        r["ratio_to_plain"] = r["epoch_seconds"] / base
    res = {"benchmark": "distill_speed", "recipe": args.recipe, "machine": machine(), "rows": rows,
           "train_samples": len(data.train), "batch_size": recipe.data.batch_size,
           "student_params": sum(p.numel() for p in student.parameters())}
    args.results.mkdir(parents=True, exist_ok=True)
    (args.results / f"{args.out}.json").write_text(json.dumps(res, indent=2) + "\n")
    (args.results / f"{args.out}.md").write_text(markdown(res))
    print(markdown(res))


def markdown(res: dict) -> str:
    m = res["machine"]
    lines = ["# Distillation epoch time against plain training", "",
             f"{m['date']}, {m['cpu']}, {m['cores']} cores, CPU flags: "
             f"{', '.join(f for f, on in m['cpu_flags'].items() if on) or 'none of note'}; recipe {res['recipe']} "
             f"({res['train_samples']} training samples, batch {res['batch_size']}). The same student and data in "
             "each row, trained one after the other in one process; epoch time includes validation, not the "
             "teacher's one pass over the training split that fills a cache (once per run).", "",
             f"| setting | teacher | precision | s per epoch | vs {res['rows'][0]['setting'].split(' (')[0]} | "
             f"best val {res['rows'][0].get('val_metric', 'acc')} | held-out {res['rows'][0].get('test_metric', 'accuracy')} |",
             "|---|---|---|---|---|---|---|"]
    for r in res["rows"]:
        metric = r.get("test_metric", "accuracy")
        lines.append(f"| {r['setting']} | {r['teacher_outputs']} | {r['precision']} | {r['epoch_seconds']:.2f} | "
                     f"{r['ratio_to_plain']:.2f}x | {r.get('best_val', r.get('best_val_acc')):.4f} | {r[f'test_{metric}']:.4f} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
