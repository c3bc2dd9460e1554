"""Does the search's ladder rank the teacher's sub-networks the way full distillation does?

The candidates are the sub-networks of a recipe's teacher (compressor.search.subnets, `search.family: teacher`)
that meet its FLOPs budget (a looser one with --max-flops). Each gets every ranking the search could use:
#params, FLOPs, DisWOT (on the candidate with the teacher's weights) and each rung's short distillation
(all candidates at every rung, no halving, so each rung has a Kendall tau of its own) scored three ways on
the validation split (accuracy, minus the cross-entropy to the labels, minus the KL to the teacher) and by
accuracy on every held-out sample (the validation split and the training samples the rung does not train on:
what the search ranks by). The
ground truth is the held-out accuracy after the recipe's own distillation (compressor.distill.train.fit, the
distill stage's trainer), for two training seeds: Kendall tau between the seeds says how much of the ground
truth is noise. Run through benchmarks/search_rank.py (the default space there).
"""
from __future__ import annotations

import argparse
import copy
import json
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from host import machine

# the rung's score on the validation split: accuracy, -CE to labels, -KL to the teacher; held: accuracy on the
# validation split and the training samples the rung does not train on (compressor.data.DataSplits.held_out)
SCORES = ("acc", "nll", "kl", "held")


def kendall(a, b) -> float:
    from scipy.stats import kendalltau

    return float(kendalltau(a, b, variant="b").statistic)


@torch.no_grad()
def logits_of(model, x) -> torch.Tensor:
    from compressor.tasks import output, rows, size

    model.eval()
    return torch.cat([output(model, rows(x, i, i + 256)) for i in range(0, size(x), 256)]).float()


def rung_scores(logits: torch.Tensor, labels: torch.Tensor, teacher_logits: torch.Tensor, T: float = 4.0,
                held: tuple[torch.Tensor, torch.Tensor] | None = None) -> dict:
    kl = F.kl_div(F.log_softmax(logits / T, -1), F.log_softmax(teacher_logits / T, -1), reduction="batchmean",
                  log_target=True) * T * T
    out = {"acc": float((logits.argmax(-1) == labels).float().mean()),
           "nll": -float(F.cross_entropy(logits, labels)), "kl": -float(kl)}
    if held is not None:
        out["held"] = float((held[0].argmax(-1) == held[1]).float().mean())
    return out


def main(argv=None, out_dir: Path | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--recipe", default="quickstart-search")
    ap.add_argument("--max-flops", type=float, default=None,
                    help="FLOPs budget, a fraction of the teacher's (default: the recipe's search.max_flops)")
    ap.add_argument("--candidates", type=int, default=24, help="at most this many (a seeded sample of the feasible)")
    ap.add_argument("--train-seeds", type=int, default=2)
    ap.add_argument("--rung-samples", type=int, default=None, help="default: the recipe's search.rung_samples")
    ap.add_argument("--rungs", default=None, help="comma-separated epochs of each rung (default: the recipe's "
                    "search.rungs); 0 is the cut candidate with its batch-norm statistics re-estimated, untrained")
    ap.add_argument("--truth", type=Path, default=None, help="a previous result of the same recipe: its distilled "
                    "accuracies are reused (the ground truth does not depend on the rungs), only the rungs run")
    ap.add_argument("--channels", default=None, help="comma-separated channel cuts (default: the recipe's "
                    "search.channels); heavier cuts spread the distilled accuracies beyond the noise")
    ap.add_argument("--tag", default="")
    ap.add_argument("--resummarize", type=Path, default=None, help="recompute the taus and the page of a result "
                    "file from its rows (nothing runs)")
    ap.add_argument("--out", type=Path, default=out_dir)
    args = ap.parse_args(argv)
    t_all = time.time()
    if args.resummarize:
        res = json.loads(args.resummarize.read_text())
        res.update(summarize(res["rows"], res["setup"]["rungs"], res["setup"]["train_seeds"]))
        res["setup"].pop("ranked_by", None)
        args.resummarize.write_text(json.dumps(res, indent=2) + "\n")
        args.resummarize.with_suffix(".md").write_text(markdown(res))
        return print(markdown(res))

    from compressor.context import load_inputs
    from compressor.distill.train import fit
    from compressor.errors import UserError
    from compressor.flops import count_flops
    from compressor.prune import calibration_batches
    from compressor.recipe import load_recipe
    from compressor.search import subnets as S
    from compressor.search.proxies import TeacherView, diswot
    from compressor.tasks import get_task, size

    recipe = load_recipe(args.recipe)
    spec = recipe.search
    if args.rungs:
        spec = spec.model_copy(update={"rungs": [float(e) for e in args.rungs.split(",")]})
    if args.channels:
        spec = spec.model_copy(update={"channels": [float(c) for c in args.channels.split(",")]})
    data, teacher, _ = load_inputs(recipe)
    teacher.eval()
    batches, labels = calibration_batches(data, recipe.data.batch_size, 4, labels=True)
    space = S.teacher_space(teacher, batches[0], spec.channels)
    example = data.tensors("train", limit=1)[0]
    t_flops = count_flops(teacher, example)
    frac = args.max_flops or spec.max_flops
    build = S.Builder(space, teacher, batches, labels=labels)
    genomes = [g for g in space.genomes() if build.flops_estimate(g) <= frac * t_flops * 1.03]
    g = torch.Generator().manual_seed(recipe.seed)
    if len(genomes) > args.candidates:
        genomes = [genomes[i] for i in sorted(torch.randperm(len(genomes), generator=g)[:args.candidates].tolist())]
    print(f"{len(space.genomes())} genomes in the space, {len(genomes)} candidates under {frac:.0%} of the teacher's "
          f"{t_flops / 1e6:.1f} MFLOPs")

    xs, _ = data.tensors("train", limit=args.rung_samples or spec.rung_samples)
    vx, vy = data.tensors("val", limit=1024)
    hx, hy = data.held_out(size(xs))
    rung = S.Rung.of(teacher, xs, vx, vy, recipe.task, batch_size=min(64, size(xs)), lr=recipe.distill.lr)
    v_teacher = logits_of(teacher, vx)
    view = TeacherView.of(teacher, (batches[0], labels[0]))
    task = get_task(recipe.task)
    truth = {json.dumps(r["genome"], sort_keys=True): r for r in json.loads(args.truth.read_text())["rows"]} \
        if args.truth else {}
    rows = []
    with tempfile.TemporaryDirectory(prefix="rank-subnets-") as tmp:
        for i, gnm in enumerate(genomes):
            try:
                model, _ = build(gnm)
            except UserError as e:  # a cut the structure cannot give
                print(f"{i + 1}/{len(genomes)} {gnm}: not built ({e})")
                continue
            cost = S.costs(model, example)
            row = {"genome": gnm, "removed": space.removed(gnm), "params": cost["params"], "flops": cost["flops"],
                   "diswot": float(diswot(copy.deepcopy(model), (batches[0], labels[0]), view))}
            for k, ep in enumerate(spec.rungs):
                t0 = time.time()
                trained = rung.train(model, ep, seed=recipe.seed) if ep else copy.deepcopy(model)
                rung.recalibrate(trained)
                row[f"rung_{k + 1}"] = {**rung_scores(logits_of(trained, vx), vy, v_teacher,
                                                      held=(logits_of(trained, hx), hy)),
                                        "seconds": round(time.time() - t0, 2)}
            accs, nlls, secs = [], [], []
            known = truth.get(json.dumps(gnm, sort_keys=True))
            if known:
                accs, nlls, secs = known["accuracies"], known["nlls"], [known["distill_seconds"]]
            for seed in range(0 if known else args.train_seeds):
                s = copy.deepcopy(model)
                t0 = time.time()
                fit(s, teacher, data, recipe.distill, recipe.data, Path(tmp) / f"{i}-{seed}" / "ckpt",
                    seed=recipe.seed + seed, log=lambda line: None)
                secs.append(time.time() - t0)
                accs.append(task.score(s, data, recipe.data.batch_size)["accuracy"])
                tx, ty = data.tensors("test")
                nlls.append(float(F.cross_entropy(logits_of(s, tx), ty)))
            row.update(accuracies=accs, accuracy=sum(accs) / len(accs), nlls=nlls, nll=sum(nlls) / len(nlls),
                       distill_seconds=round(sum(secs) / len(secs), 1))
            rows.append(row)
            print(f"{i + 1}/{len(genomes)} without {row['removed']}, cut {gnm['channels']:g}: {row['params']:,} params, "
                  f"{row['flops'] / 1e6:.1f} MFLOPs; rungs " +
                  " ".join(f"{row[f'rung_{k + 1}']['acc']:.4f}" for k in range(len(spec.rungs))) +
                  f"; distilled {accs}")

    setup = {"max_flops": frac, "teacher_flops": t_flops, "space_genomes": len(space.genomes()),
             "candidates": len(rows), "units": space.units, "channels": space.channels,
             "rungs": list(spec.rungs), "rung_samples": size(xs), "val_samples": size(vx), "held_samples": size(hx),
             "train_seeds": args.train_seeds, "distill_epochs": recipe.distill.epochs, "test_samples": len(data.test)}
    res = {"benchmark": "search_rank", "space": "teacher", "machine": machine(), "recipe": args.recipe, "setup": setup,
           **summarize(rows, setup["rungs"], args.train_seeds), "rows": rows, "seconds": round(time.time() - t_all, 1)}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"search_rank{args.tag}.json").write_text(json.dumps(res, indent=2) + "\n")
    (args.out / f"search_rank{args.tag}.md").write_text(markdown(res))
    print(markdown(res))


def rung_name(epochs: float, score: str = "acc") -> str:
    return f"rung_{epochs:g}ep" + ("" if score == "acc" else f"_{score}")


def summarize(rows: list[dict], rungs: list[float], train_seeds: int) -> dict:
    """Kendall tau of every ranking against the distilled accuracy and against minus the distilled held-out
    cross-entropy (a ground truth finer than 1/359), and each ground truth's tau between two training seeds."""
    truths = {"accuracy": [r["accuracy"] for r in rows], "nll": [-r["nll"] for r in rows]}
    out = {}
    for name, truth in truths.items():
        taus = {k: kendall([r[k] for r in rows], truth) for k in ("params", "flops", "diswot")}
        for k, ep in enumerate(rungs):
            for s in SCORES:
                if all(s in r[f"rung_{k + 1}"] for r in rows):  # results from before "held" lack it
                    taus[rung_name(ep, s)] = kendall([r[f"rung_{k + 1}"][s] for r in rows], truth)
        out[name] = taus
    per_seed = {"accuracy": "accuracies", "nll": "nlls"}
    seed_tau = {n: kendall([r[k][0] for r in rows], [r[k][1] for r in rows]) if train_seeds > 1 else None
                for n, k in per_seed.items()}
    taus = out["accuracy"]
    decides = rung_name(rungs[-1], "held") if rung_name(rungs[-1], "held") in taus else rung_name(rungs[-1])
    return {"kendall_tau": taus, "accuracy_tau_between_training_seeds": seed_tau["accuracy"],
            "kendall_tau_vs_heldout_nll": out["nll"], "nll_tau_between_training_seeds": seed_tau["nll"],
            "summary": {"deciding_rung": decides, "tau": taus[decides], "seed_tau": seed_tau["accuracy"],
                        "tau_vs_nll": out["nll"][decides], "seed_tau_nll": seed_tau["nll"],
                        "beats_params_flops_diswot": taus[decides] > max(taus["params"], taus["flops"], taus["diswot"])
                        and out["nll"][decides] > max(out["nll"][k] for k in ("params", "flops", "diswot"))}}


def markdown(res: dict) -> str:
    m, st, taus = res["machine"], res["setup"], res["kendall_tau"]
    acc = [r["accuracy"] for r in res["rows"]]
    rungs = st["rungs"]
    lines = [f"# Ranking the teacher's sub-networks against their distilled accuracy ({res['recipe']})", "",
             f"{m['date']}, {m['cpu']}, {m['cores']} cores, CPU flags: "
             f"{', '.join(f for f, on in m['cpu_flags'].items() if on) or 'none of note'}. "
             f"{st['candidates']} sub-networks of the teacher under {st['max_flops']:.0%} of its "
             f"{st['teacher_flops'] / 1e6:.1f} MFLOPs (of {st['space_genomes']} in the space: units "
             f"{', '.join(st['units'])} kept or dropped, channel cuts {', '.join(f'{c:g}' for c in st['channels'])}). "
             f"Ground truth: held-out accuracy ({st['test_samples']} samples) after the recipe's distillation "
             f"({st['distill_epochs']} epochs, the distill stage's trainer), mean of {st['train_seeds']} training seeds; "
             f"it spans {min(acc):.4f}..{max(acc):.4f}. Rungs: {', '.join(f'{e:g}' for e in rungs)} epochs of KD over "
             f"{st['rung_samples']} training samples from the teacher's weights, scored on {st['val_samples']} "
             "validation samples" + (f" (`_held`: on {st['held_samples']} held-out samples, the validation split and "
             "the training samples the rung does not train on)" if st.get("held_samples") else "") +
             " (0 epochs: the cut candidate untrained); before scoring, each rung re-estimates the "
             "batch-norm statistics on its training samples. The search decides by its last short rung "
             f"({res['summary']['deciding_rung']} here).", "",
             "| ranking | Kendall tau vs distilled accuracy | vs minus distilled held-out cross-entropy |", "|---|---|---|"]
    for k, v in taus.items():
        lines.append(f"| {k} | {v:+.3f} | {res['kendall_tau_vs_heldout_nll'][k]:+.3f} |")
    if res["accuracy_tau_between_training_seeds"] is not None:
        lines.append(f"| (two training seeds against each other) | {res['accuracy_tau_between_training_seeds']:+.3f} | "
                     f"{res['nll_tau_between_training_seeds']:+.3f} |")
    lines += ["", "`rung_<E>ep` scores the rung of E epochs by validation accuracy, `_held` by accuracy on every held-out "
              "sample (what the search ranks by), `_nll` by "
              "minus the cross-entropy to the labels, `_kl` by minus the KL divergence to the teacher (T=4). A tau "
              "between two training seeds near zero means the distilled accuracies differ by noise alone.", "",
              "| removed | channels cut | params | MFLOPs | " + " | ".join(f"{e:g} ep" for e in rungs)
              + " | distilled (seeds) |", "|---|---|---|---|" + "---|" * len(rungs) + "---|"]
    for r in sorted(res["rows"], key=lambda r: -r["accuracy"]):
        lines.append(f"| {', '.join(r['removed']) or '-'} | {r['genome']['channels']:g} | {r['params']:,} | "
                     f"{r['flops'] / 1e6:.1f} | " + " | ".join(f"{r[f'rung_{k + 1}']['acc']:.4f}" for k in range(len(rungs)))
                     + f" | {r['accuracy']:.4f} ({', '.join(f'{a:.4f}' for a in r['accuracies'])}) |")
    return "\n".join(lines) + "\n"
