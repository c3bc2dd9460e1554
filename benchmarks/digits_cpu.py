"""Digits on this CPU: the quickstart teacher against its compressed students, and the few-labels setting.

    python benchmarks/digits_cpu.py                      # every setting, results in benchmarks/results/
    python benchmarks/digits_cpu.py --settings full,fewlabel-kd,fewlabel-ce --work /tmp/digits-bench

Settings (each one `compressor.run` of the quickstart recipe, changed as stated):

    full          the quickstart (student resnet 16-32-64, KD on all labels) + int8 (ONNX Runtime static QDQ)
    searched      profiles/recipes/quickstart-search.yaml: the teacher's own sub-networks (drop residual blocks, cut
                  channels), ranked by short distillations, under 15% of the teacher's FLOPs and no slower at
                  batch 1 than the full setting's student (--tiny: the tiny teacher under 60% of its FLOPs),
                  then distilled as the quickstart's
    pruned        profiles/recipes/quickstart-prune.yaml: LAPTOP-Diff layer pruning of the same teacher until
                  it is 40% faster on this CPU, then distilled with kd + ce + feature_norm (--tiny: half the FLOPs)
    fewlabel-kd   labels for 5% of the training images (stratified, label -1 for the rest), the full-label
                  teacher from `full` as a checkpoint, a resnet 8-16-32 student (1/34 of the teacher's FLOPs),
                  KD on every image + CE on the labelled ones
    fewlabel-ce   the same student and data, CE only: the labelled 5% alone, same steps
    and, outside the pipeline, the same student trained directly on the labelled images only (AdamW,
    best validation epoch, three seeds): the strongest label-only baseline we could make cheaply.

Digits is easy (a student with 1/34 of the teacher's FLOPs reaches ~99.7% on all labels without any
teacher), so the few-labels setting is where distillation shows its worth. Gap closed =
(distilled - label-only) / (teacher - label-only), against the better label-only baseline.

Finished runs are reused when their recipe is unchanged (delete --work to start over). Writes
benchmarks/results/digits_cpu.json and .md with the machine, the versions and the date.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))
from host import interleaved_p50, repo_path  # noqa: E402  (results hold no absolute paths)

SETTINGS = ("full", "fewlabel", "searched", "pruned", "fewlabel-kd", "fewlabel-ce")
EPOCHS = None  # --epochs: distill epochs of the pipeline settings (None: the recipe's)
FEW_STUDENT = {"widths": [8, 16, 32], "depths": [1, 1, 1]}


def base_recipe(tiny: bool) -> dict:
    r = yaml.safe_load((ROOT / "profiles" / "recipes" / "quickstart.yaml").read_text())
    if tiny:  # for the test: minutes become seconds; the figures mean nothing
        r.update(teacher={"model": "resnet", "kwargs": {"widths": [8, 16], "depths": [1, 1]},
                          "train": {"epochs": 2, "lr": 0.01}},
                 student={"model": "resnet", "config": {"widths": [4, 8], "depths": [1, 1]}},
                 profile={"batch_sizes": [1, 32], "warmup": 2, "runs": 10, "max_seconds": 2})
        r["data"]["kwargs"] = {"image_size": 16}
        r["data"]["batch_size"] = 128
        r["distill"]["epochs"] = 2
        r["budgets"] = {}
    return r


def recipe_for(setting: str, tiny: bool, teacher_ckpt: str | None) -> dict:
    r = base_recipe(tiny)
    r["name"] = f"digits-{setting}"
    if setting == "full":
        r["quantize"] = {"mode": "ptq-ort", "calibration": 64 if tiny else 256}
    elif setting == "searched":
        r.pop("student")
        if tiny:
            r["search"] = {"family": "teacher", "max_flops": 0.6, "channels": [0.0, 0.5], "rungs": [0.5, 1],
                           "rung_samples": 128}
        else:  # the shipped recipe, so the same cached teacher as `full`
            r = yaml.safe_load((ROOT / "profiles" / "recipes" / "quickstart-search.yaml").read_text())
            r["name"] = f"digits-{setting}"
    elif setting == "pruned":
        if tiny:  # the tiny teacher: measuring each block's latency would take longer than the rest
            r["prune"] = {"by": "flops", "remove": 0.5}
        else:  # the shipped recipe as a user runs it (the quickstart's teacher, so the same cached weights)
            r = yaml.safe_load((ROOT / "profiles" / "recipes" / "quickstart-prune.yaml").read_text())
            r["name"] = f"digits-{setting}"
    elif setting.startswith("fewlabel"):
        if not teacher_ckpt:
            raise SystemExit(f"{setting} needs the full-label teacher: run the 'full' setting first")
        r["teacher"] = {"model": r["teacher"]["model"], "kwargs": r["teacher"].get("kwargs", {}),
                        "checkpoint": teacher_ckpt}  # trained on all labels, never on the test split
        r["data"]["kwargs"] = {**r["data"]["kwargs"], "label_fraction": 0.05 if not tiny else 0.2}
        if not tiny:
            r["student"] = {"model": "resnet", "config": FEW_STUDENT}
        if setting == "fewlabel-ce":
            r["distill"]["losses"] = [{"name": "ce", "weight": 1.0}]
        r["profile"] = {**r.get("profile", {}), "runs": 50 if not tiny else 10, "max_seconds": 5}
        r["budgets"] = {}
    else:
        raise SystemExit(f"unknown setting {setting!r}: {', '.join(SETTINGS)}")
    return r


def run_setting(setting: str, work: Path, tiny: bool, teacher_ckpt: str | None, log) -> Path:
    """The finished bundle of ``setting``: reused when its recipe is unchanged, else run now."""
    import compressor
    from compressor.recipe import load_recipe

    recipe = recipe_for(setting, tiny, teacher_ckpt)
    if EPOCHS:  # the in-script few-label runs keep the recipe's epochs: they are cheap
        recipe["distill"]["epochs"] = EPOCHS
    out = work / setting
    if (out / "manifest.json").is_file():
        old = json.loads((out / "manifest.json").read_text())
        if old.get("recipe") == load_recipe(copy.deepcopy(recipe)).model_dump(mode="json"):
            log(f"[{setting}] reusing {out}")
            return out
    log(f"[{setting}] running")
    t0 = time.time()
    compressor.run(recipe, out, force=True, log=lambda s: log(f"  {setting}: {s}"))
    log(f"[{setting}] done in {time.time() - t0:.0f} s")
    return out


def teacher_checkpoint(tiny: bool) -> str | None:
    """The full-label teacher's weights: where the pipeline caches the quickstart teacher it trained."""
    from compressor.data import load_data
    from compressor.recipe import load_recipe
    from compressor.teacher import build_teacher, teacher_cache_path

    recipe = load_recipe(recipe_for("full", tiny, None))
    path = teacher_cache_path(recipe, build_teacher(recipe, load_data(recipe.data, recipe.seed)))
    return str(path) if path.is_file() else None


def rows_of(bundle: Path, setting: str) -> list[dict]:
    """One row per model file in a bundle, with accuracy, size and latency at batch 1 and 32."""
    from compressor.report import _measurement, models

    m = json.loads((bundle / "manifest.json").read_text())
    out = []
    for r in models(m):
        if setting != "full" and r["role"] == "teacher":
            continue  # the teacher is the same file in every setting: reported once, from `full`
        row = {"setting": setting, "model": r["key"], "params": r["params"], "flops": r["flops"],
               "bytes": r["bytes"], "accuracy": r.get("quality", r.get("accuracy")),  # report.models calls it quality
               "file": r["path"], "precision": r.get("precision", "fp32")}
        for b in (1, 32):
            meas = _measurement(m, r["path"], "local-cpu", b)
            row[f"b{b}_p50_ms"] = meas["p50_ms"] if meas else None
            row[f"b{b}_gflops"] = meas.get("gflops") if meas else None
            row[f"b{b}_of_peak"] = meas.get("roofline") if meas else None
        out.append(row)
    if setting == "pruned":
        s = next((s for s in m["stages"] if s["name"] == "prune"), {})
        for row in out:
            if row["model"].startswith("student"):
                row["removed"] = (s.get("outputs") or {}).get("removed")
    if setting == "searched":
        s = next((s for s in m["stages"] if s["name"] == "search"), {})
        for row in out:
            if row["model"].startswith("student"):
                g = m["student"]
                row["genome"] = {"removed": g.get("removed", []), "channels_cut": g["search"]["genes"]["channels"]} \
                    if g.get("pruned_from") == "teacher" else g.get("config")
                row["search"] = {k: s.get("metrics", {}).get(k) for k in ("trials", "feasible")}
                row["search"]["seconds"] = s.get("seconds")
    return out


def retime(rows: list[dict], bundles: dict, rounds: int, log=print) -> None:
    """Every model file of ``rows`` timed again on local-cpu, side by side: ``rounds`` round-robin rounds (a slow
    spell of the shared machine hits every file alike), the best p50 of each kept as the row's b1/b32_p50_ms and
    GFLOP/s. Each bundle's own profile measured at another moment of load (the same student swung 0.10-0.19
    ms between two runs): ``b*_p50_ms_bundle`` keeps it."""
    # The files still in their bundles: the teacher's ONNX stays in work/.
    here = [i for i, r in enumerate(rows) if (bundles[r["setting"]] / r["file"]).is_file()]
    timed = interleaved_p50([(bundles[rows[i]["setting"]] / rows[i]["file"], rows[i]["precision"]) for i in here],
                            rounds, max_seconds=2.0, log=log)
    for r in rows:
        r["timing"] = "its bundle's profile"
    for k, i in enumerate(here):
        r = rows[i]
        r["timing"] = "side by side"
        for b in (1, 32):
            r[f"b{b}_p50_ms_bundle"] = r[f"b{b}_p50_ms"]
            r[f"b{b}_p50_ms"] = timed[k, b]
            r[f"b{b}_gflops"] = r["flops"] * b / (timed[k, b] * 1e6) if r.get("flops") else None


def label_only_direct(work: Path, tiny: bool, seeds=(0, 1, 2), log=print) -> dict:
    """The few-label student trained on the labelled images alone, outside the pipeline (no teacher)."""
    import torch
    import torch.nn.functional as F
    from torch.utils.data import DataLoader, Subset

    from compressor.data import load_data
    from compressor.models import build_model, count_flops, count_params
    from compressor.recipe import load_recipe
    from compressor.teacher import evaluate

    recipe = load_recipe(recipe_for("fewlabel-ce", tiny, "unused"))
    key = {"recipe": recipe.model_dump(mode="json"), "seeds": list(seeds), "tiny": tiny}
    cached = work / "label_only_direct.json"
    if cached.is_file():
        old = json.loads(cached.read_text())
        if old.get("key") == key:
            log(f"[label-only direct] reusing {cached}")
            return old["result"]
    data = load_data(recipe.data, recipe.seed)
    labelled = Subset(data.train.dataset, data.train.labelled)
    torch.set_num_threads(1)  # a 6-MFLOP model on batches of 16: one thread is as fast and waits less
    accs = []
    epochs = 20 if tiny else 150
    for seed in seeds:
        torch.manual_seed(seed)
        model = build_model(recipe.student.model, recipe.student.config,
                            {"in_channels": data.input_shape[0], "num_classes": data.num_classes})
        loader = DataLoader(labelled, batch_size=16, shuffle=True, generator=torch.Generator().manual_seed(seed))
        opt = torch.optim.AdamW(model.parameters(), lr=recipe.distill.lr, weight_decay=recipe.distill.weight_decay)
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=recipe.distill.lr, total_steps=epochs * len(loader))
        best, best_state = -1.0, None
        for epoch in range(epochs):
            model.train()
            for x, y in loader:
                loss = F.cross_entropy(model(x), y)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
            if (epoch + 1) % 5 == 0 or epoch == epochs - 1:
                val = evaluate(model, data.loader("val", 256))
                if val > best:
                    best, best_state = val, {k: v.clone() for k, v in model.state_dict().items()}
        model.load_state_dict(best_state)
        accs.append(evaluate(model, data.loader("test", 256)))
        log(f"  label-only direct, seed {seed}: test accuracy {accs[-1]:.4f} (val {best:.4f})")
    x = data.tensors("test", limit=1)[0]
    result = {"labelled": len(data.train.labelled), "train": len(data.train), "seeds": list(seeds), "epochs": epochs,
              "accuracy": accs, "accuracy_mean": sum(accs) / len(accs), "params": count_params(model),
              "flops": count_flops(model, x)}
    cached.write_text(json.dumps({"key": key, "result": result}, indent=2) + "\n")
    return result


def _few_setup(work: Path, tiny: bool, log):
    """The few-label data, and the full-label teacher's logits on every training image, computed once
    and cached in ``work`` (the pipeline's distill stage recomputes them at every step: on a shared
    2-core machine that forward pass is most of the cost)."""
    import torch

    from compressor.data import load_data
    from compressor.models import build_model
    from compressor.recipe import load_recipe
    from compressor.teacher import evaluate, load_state

    ckpt = teacher_checkpoint(tiny)
    recipe = load_recipe(recipe_for("fewlabel-kd", tiny, ckpt))
    data = load_data(recipe.data, recipe.seed)
    defaults = {"in_channels": data.input_shape[0], "num_classes": data.num_classes}
    path = work / "teacher_logits.pt"
    if path.is_file():
        cached = torch.load(path, weights_only=True)
        if cached.get("checkpoint") == ckpt and cached["logits"].shape[0] == len(data.train):
            return recipe, data, defaults, cached["logits"], cached["teacher_accuracy"], cached["teacher_flops"]
    from compressor.models import count_flops

    teacher = build_model(recipe.teacher.model, recipe.teacher.kwargs, defaults).eval()
    teacher.load_state_dict(load_state(ckpt, "teacher"))
    x, _ = data.tensors("train")
    t0 = time.time()
    with torch.no_grad():
        logits = torch.cat([teacher(x[i:i + 128]) for i in range(0, len(x), 128)])
    acc = evaluate(teacher, data.loader("test", 256))
    flops = count_flops(teacher, x[:1])
    log(f"[few labels] teacher logits for {len(x)} training images in {time.time() - t0:.0f} s; teacher test {acc:.4f}")
    torch.save({"checkpoint": ckpt, "logits": logits, "teacher_accuracy": acc, "teacher_flops": flops}, path)
    return recipe, data, defaults, logits, acc, flops


def few_label_run(work: Path, tiny: bool, mode: str, seed: int, log=print) -> dict:
    """One student trained on the few-label data: ``kd`` = the recipe's losses (KD on every image against
    the cached teacher logits + CE on the labelled ones), ``ce`` = CE alone (the labelled images only,
    the same steps). Same optimizer and schedule as the distill stage (AdamW, cosine per epoch), best
    validation epoch kept. Cached in ``work`` per (mode, seed)."""
    import torch

    from compressor.distill import build_loss
    from compressor.models import build_model, count_flops, count_params
    from compressor.schedule import cosine
    from compressor.teacher import evaluate

    out = work / f"fewlabel_{mode}_{seed}.json"
    if out.is_file():
        return json.loads(out.read_text())
    recipe, data, defaults, logits, _, _ = _few_setup(work, tiny, log)
    torch.set_num_threads(1)  # a 6-MFLOP model: a second thread only waits at barriers on a shared machine
    spec = recipe.distill
    losses = [(l.weight, build_loss(l.name, **l.params)) for l in spec.losses] if mode == "kd" else \
        [(1.0, build_loss("ce"))]
    torch.manual_seed(seed)
    model = build_model(recipe.student.model, recipe.student.config, defaults)
    x_all, y_all = data.tensors("train")
    opt = torch.optim.AdamW(model.parameters(), lr=spec.lr, weight_decay=spec.weight_decay)
    epochs = spec.epochs
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda e: cosine(e, epochs))
    g = torch.Generator().manual_seed(seed)
    bs = recipe.data.batch_size
    best, best_state, t0 = -1.0, None, time.time()
    for epoch in range(epochs):
        model.train()
        perm = torch.randperm(len(x_all), generator=g)
        for i in range(0, len(perm), bs):
            idx = perm[i:i + bs]
            s = model(x_all[idx])
            loss = sum(w * term(student=s, teacher=logits[idx], target=y_all[idx]) for w, term in losses)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        sched.step()
        val = evaluate(model, data.loader("val", 256))
        if val > best:
            best, best_state = val, {k: v.clone() for k, v in model.state_dict().items()}
    model.load_state_dict(best_state)
    acc = evaluate(model, data.loader("test", 256))
    res = {"mode": mode, "seed": seed, "accuracy": acc, "val": best, "epochs": epochs, "batch": bs,
           "losses": [l.model_dump() for l in spec.losses] if mode == "kd" else [{"name": "ce", "weight": 1.0}],
           "params": count_params(model), "flops": count_flops(model, x_all[:1]),
           "labelled": len(data.train.labelled), "train": len(data.train), "seconds": round(time.time() - t0, 1)}
    log(f"[few labels] {mode} seed {seed}: test {acc:.4f} (best val {best:.4f}) in {res['seconds']:.0f} s")
    out.write_text(json.dumps(res, indent=2) + "\n")
    return res


def machine() -> dict:
    import numpy
    import onnxruntime
    import torch
    from importlib import metadata

    cpu = "unknown"
    try:
        cpu = next(l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name"))
    except (OSError, StopIteration):
        pass
    versions = {"python": platform.python_version(), "torch": torch.__version__,
                "onnxruntime": onnxruntime.__version__, "numpy": numpy.__version__}
    for dist in ("compressor", "pytorch-lightning", "onnx", "scikit-learn"):
        try:
            versions[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            pass
    return {"cpu": cpu, "cores": os.cpu_count(), "platform": platform.platform(), "load_average": os.getloadavg(),
            "threads": 2, "versions": versions, "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}


def _mean(xs):
    return sum(xs) / len(xs) if xs else None


def few_label_summary(teacher_acc: float, teacher_flops: float, student_flops: float, distilled: list[float],
                      label_only: dict[str, list[float]]) -> dict:
    """Gap closed = (distilled - label-only) / (teacher - label-only), against the best label-only mean."""
    out = {"teacher": teacher_acc, "distilled": _mean(distilled), "distilled_runs": distilled,
           "label_only": {k: {"mean": _mean(v), "runs": v} for k, v in label_only.items() if v},
           "flops_ratio": teacher_flops / student_flops if student_flops else None}
    means = [v["mean"] for v in out["label_only"].values()]
    if means and out["distilled"] is not None:
        lo = max(means)
        out["label_only_best"] = lo
        gap = teacher_acc - lo
        out["gap_closed"] = (out["distilled"] - lo) / gap if gap > 0 else None
        out["goal_met"] = bool(out["gap_closed"] is not None and out["gap_closed"] >= 0.8
                               and out["flops_ratio"] and out["flops_ratio"] >= 10)
    return out


def _f(v, spec):
    return "n/a" if v is None else format(v, spec)


def markdown(res: dict) -> str:
    mc = res["machine"]
    v = mc["versions"]
    lines = ["# Digits on CPU: teacher against compressed students", "",
             f"{mc['date']}; {mc['cpu']}, {mc['cores']} cores (load average {mc['load_average'][0]:.1f} at the start: "
             f"the machine was shared, so latencies are noisy), ONNX Runtime {v['onnxruntime']} at 2 threads, torch "
             f"{v['torch']}, Lightning {v.get('pytorch-lightning')}. Digits {res.get('image_size', 32)}px, held-out split of "
             f"{res.get('test_size', 'n/a')} images; latency: " + (
                 f"the students' files timed again side by side, best p50 of {res['rounds']} interleaved rounds (the "
                 "teacher's from its bundle's profile stage)" if res.get("rounds") else "p50 of the pipeline's profile "
                 "stage") + ".", "",
             "| setting | model | params | MFLOPs | ONNX MB | accuracy | b1 p50 ms | b32 p50 ms | b1 GFLOP/s (of peak) | "
             "b32 GFLOP/s (of peak) |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in res["rows"]:
        lines.append(f"| {r['setting']} | {r['model']} | {r['params'] or 0:,} | {_f((r['flops'] or 0) / 1e6, '.1f')} | "
                     f"{_f((r['bytes'] or 0) / 1e6, '.3f')} | {_f(r['accuracy'], '.4f')} | {_f(r['b1_p50_ms'], '.3f')} | "
                     f"{_f(r['b32_p50_ms'], '.3f')} | {_f(r['b1_gflops'], '.1f')} "
                     f"({_f(r['b1_of_peak'] and 100 * r['b1_of_peak'], '.0f')}%) | {_f(r['b32_gflops'], '.1f')} "
                     f"({_f(r['b32_of_peak'] and 100 * r['b32_of_peak'], '.0f')}%) |")
    for s, why in res.get("unavailable", {}).items():
        lines.append(f"| {s} | not run | | | | | | | | {why} |")
    lines.append("")
    for r in res["rows"]:
        if r["model"] != "student":
            continue
        if r.get("genome"):
            se = r.get("search") or {}
            lines.append(f"- searched: profiles/recipes/quickstart-search.yaml (the teacher's own sub-networks under 15% "
                         f"of its FLOPs and no slower at batch 1 than the hand-picked student, ranked by short distillations): {se.get('trials')} "
                         f"candidates, {se.get('feasible')} within the budgets, {_f(se.get('seconds'), '.0f')} s; chosen "
                         f"{r['genome']}, then distilled as the quickstart's.")
        if r.get("removed") is not None:
            lines.append(f"- pruned: profiles/recipes/quickstart-prune.yaml (LAPTOP-Diff, remove 40% of the teacher's "
                         f"measured latency, kd + ce + feature_norm): removed {', '.join(r['removed']) or 'nothing'} "
                         "from the teacher, then distilled.")
    if res.get("note"):
        lines += ["", res["note"]]
    peak = res.get("peak_gflops")
    lines += ["", f"Peak: {_f(peak, '.1f')} GFLOP/s (2 x the fastest 1-thread fp32 torch GEMM, n 256-1024, probed when "
                  "the results were written). int8 files are charged the fp32 FLOPs. int8: ONNX Runtime static QDQ (uint8 "
                  "activations, 256 calibration images)."]
    if res.get("distill_epochs_override"):
        lines.append(f"The pipeline settings distilled for {res['distill_epochs_override']} epochs (--epochs; the "
                     "quickstart's 15 did not fit this run on the shared machine), so their students' accuracy is "
                     "below what the full schedule gives.")
    lines.append("")
    f = res.get("few_labels")
    if f:
        runs = lambda xs: ", ".join(f"{a:.4f}" for a in xs)  # noqa: E731
        e = f.get("setup", {})
        pct = f"{100 * e.get('label_fraction', 0.05):g}%"
        cfg = e.get("student", {}).get("config", FEW_STUDENT)
        lines += [f"## Few labels: {pct} of the training labels", ""]
        if res.get("few_labels_from"):
            same = res.get("few_labels_teacher") == (res.get("teacher_checkpoint") or {}).get("sha256")
            lines += [f"Not rerun with the table above: these figures are from the run of {res['few_labels_from']} "
                      + ("(the same teacher checkpoint; they do not depend on the other settings)." if same else
                         "(with that run's teacher, since retrained: its accuracy below is that teacher's).") , ""]
        lines += [
                  f"{e.get('labelled', 'n/a')} of {e.get('train', 'n/a')} training images keep their label "
                  "(stratified by class, label -1 for the rest); the teacher was trained on all labels. Student: "
                  f"resnet {'-'.join(map(str, cfg['widths']))}, depths {'-'.join(map(str, cfg['depths']))}, "
                  f"{_f(f.get('student_flops') and f['student_flops'] / 1e6, '.1f')} "
                  f"MFLOPs (1/{_f(f.get('flops_ratio'), '.0f')} of the teacher). Mean over seeds; test split as above.", "",
                  "| model | sees | held-out accuracy | runs |", "|---|---|---|---|",
                  f"| teacher | all labels | {_f(f['teacher'], '.4f')} | |",
                  f"| student distilled: {e.get('kd_losses', 'KD + CE')}, {e.get('epochs', '?')} epochs | {pct} labels + "
                  f"teacher outputs on every image | {_f(f['distilled'], '.4f')} | {runs(f['distilled_runs'])} |"]
        names = {"same_steps": f"same student and loop, CE on the labelled {pct} alone, {e.get('epochs', '?')} epochs",
                 "subset": "same student on the labelled images only, batch 16, "
                           f"{e.get('subset_epochs', '?')} epochs, best val",
                 "pipeline_ce": "pipeline, CE only (fewlabel-ce)", "pipeline_kd": "pipeline, KD + CE (fewlabel-kd)"}
        for k, v in f["label_only"].items():
            lines.append(f"| {names.get(k, k)} | {pct} labels | {_f(v['mean'], '.4f')} | {runs(v['runs'])} |")
        lines += ["", f"Distillation closes **{_f(f.get('gap_closed') and 100 * f['gap_closed'], '.1f')}%** of the gap "
                      f"between the best label-only student ({_f(f.get('label_only_best'), '.4f')}) and the teacher "
                      f"({_f(f['teacher'], '.4f')}), at 1/{_f(f.get('flops_ratio'), '.1f')} of the teacher's FLOPs "
                      f"(goal: >= 80% at <= 1/10: {'met' if f.get('goal_met') else 'not met'}).", ""]
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--settings", default="full,fewlabel", help=f"comma-separated, of {', '.join(SETTINGS)}")
    p.add_argument("--work", type=Path, default=ROOT / "runs" / "digits-bench", help="bundles (reused when unchanged)")
    p.add_argument("--results", type=Path, default=ROOT / "benchmarks" / "results")
    p.add_argument("--epochs", type=int, default=None, help="distill epochs of the pipeline settings (default: the "
                                                            "quickstart's 15)")
    p.add_argument("--few", default="kd:0,kd:1,ce:0,ce:1", help="few-label runs, mode:seed (mode kd or ce)")
    p.add_argument("--tiny", action="store_true", help="a seconds-long smoke run (for tests); figures mean nothing")
    p.add_argument("--note", default="", help="a sentence for the results page (e.g. the load while reused "
                                              "bundles were made, which the start's load average does not show)")
    p.add_argument("--rounds", type=int, default=5, help="side-by-side timing rounds of every file (0: each "
                                                          "bundle's own profile stage)")
    p.add_argument("--no-write", action="store_true", help="run the settings, write no results (parallel workers)")
    a = p.parse_args(argv)
    global EPOCHS
    EPOCHS = a.epochs
    log = lambda s: print(s, file=sys.stderr, flush=True)  # noqa: E731
    settings = [s.strip() for s in a.settings.split(",") if s.strip()]
    for s in settings:
        if s not in SETTINGS:
            p.error(f"unknown setting {s!r}: {', '.join(SETTINGS)}")
    few = [(m, int(sd)) for m, _, sd in (x.strip().partition(":") for x in a.few.split(",") if x.strip())]
    t0 = time.time()
    res = {"benchmark": "digits_cpu", "machine": machine(), "tiny": a.tiny, "settings": settings, "rows": [],
           "unavailable": {}, "distill_epochs_override": a.epochs, "note": a.note}
    a.work.mkdir(parents=True, exist_ok=True)
    bundles = {}
    if "full" in settings or not teacher_checkpoint(a.tiny):  # every table needs the teacher; fewlabel its weights
        bundles["full"] = run_setting("full", a.work, a.tiny, None, log)
    for s in settings:
        if s in ("full", "fewlabel"):
            continue
        try:
            bundles[s] = run_setting(s, a.work, a.tiny, teacher_checkpoint(a.tiny), log)
        except Exception as e:  # a setting that cannot run is reported, the others still are
            res["unavailable"][s] = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
            log(f"[{s}] unavailable: {res['unavailable'][s]}")
    few_runs = [few_label_run(a.work, a.tiny, m, sd, log) for m, sd in few] if "fewlabel" in settings else []
    direct = label_only_direct(a.work, a.tiny, log=log) if "fewlabel" in settings and not a.no_write else None
    if a.no_write:
        return 0
    full = bundles.get("full") or run_setting("full", a.work, a.tiny, None, log)
    bundles.setdefault("full", full)
    for s in ["full", *(x for x in bundles if x != "full")]:  # the teacher's row first
        res["rows"] += rows_of(bundles[s], s)
    if a.rounds:
        retime(res["rows"], bundles, a.rounds, log)
        res["rounds"] = a.rounds
    m = json.loads((full / "manifest.json").read_text())
    res["test_size"], res["image_size"] = m["data"].get("test"), m["data"].get("image_size")
    prof = next(s for s in m["stages"] if s["name"] == "profile")["metrics"]
    res["bundle_peak_gflops"] = (prof.get("peak_gflops") or {}).get("local-cpu", {}).get("gflops")
    # One yardstick for every setting's rows (each bundle probed its own, at another moment of load).
    from devices.peak import gemm_peak_gflops

    res["peak_gflops"] = round(gemm_peak_gflops(2), 1)
    for r in res["rows"]:
        for b in (1, 32):
            if r.get(f"b{b}_gflops"):
                r[f"b{b}_of_peak"] = r[f"b{b}_gflops"] / res["peak_gflops"]
    if few_runs:
        _, _, _, _, t_acc, t_flops = _few_setup(a.work, a.tiny, log)
        kd = [r["accuracy"] for r in few_runs if r["mode"] == "kd"]
        label_only = {"same_steps": [r["accuracy"] for r in few_runs if r["mode"] == "ce"],
                      "subset": direct["accuracy"] if direct else []}
        for s in ("fewlabel-ce", "fewlabel-kd"):
            row = next((r for r in res["rows"] if r["setting"] == s and r["model"] == "student"), None)
            if row and s == "fewlabel-ce":
                label_only["pipeline_ce"] = [row["accuracy"]]
        res["few_labels"] = few_label_summary(t_acc, t_flops, few_runs[0]["flops"], kd, label_only)
        res["few_labels"]["student_flops"] = few_runs[0]["flops"]
        few_recipe = recipe_for("fewlabel-kd", a.tiny, "unused")
        res["few_labels"]["setup"] = {"labelled": few_runs[0]["labelled"], "train": few_runs[0]["train"],
                                      "label_fraction": few_recipe["data"]["kwargs"]["label_fraction"],
                                      "student": few_recipe["student"],
                                      "epochs": few_runs[0]["epochs"], "subset_epochs": direct and direct["epochs"],
                                      "kd_losses": " + ".join(f"{l['weight']} {l['name']}" for l in
                                                              next((r["losses"] for r in few_runs if r["mode"] == "kd"), []))}
        res["few_label_runs"], res["label_only_direct"] = few_runs, direct
    old = a.results / "digits_cpu.json"
    if not few_runs and not a.tiny and old.is_file():
        # fewlabel not rerun: keep its section from the last results (it does not depend on the other
        # settings), saying when it was measured, rather than dropping it from the page
        prev = json.loads(old.read_text())
        if prev.get("few_labels"):
            res["few_labels"] = prev["few_labels"]
            res["few_labels_from"] = prev.get("few_labels_from") or prev["machine"]["date"]
            res["few_labels_teacher"] = prev.get("few_labels_teacher") or (prev.get("teacher_checkpoint") or {}).get("sha256")
            for k in ("few_label_runs", "label_only_direct"):
                if k in prev:
                    res[k] = prev[k]
    ckpt = teacher_checkpoint(a.tiny)
    if ckpt:
        from exporters.artifact import sha256

        res["teacher_checkpoint"] = {"path": repo_path(ckpt), "sha256": sha256(Path(ckpt))}
    res["seconds"] = round(time.time() - t0, 1)
    from compressor.bundle import atomic_write

    a.results.mkdir(parents=True, exist_ok=True)
    atomic_write(a.results / "digits_cpu.json", json.dumps(res, indent=2, default=str) + "\n")
    atomic_write(a.results / "digits_cpu.md", markdown(res) + "\n")
    print(markdown(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
