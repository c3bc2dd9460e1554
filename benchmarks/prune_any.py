"""Channel pruning of any model: ours against torch-pruning's default and against random init, same distillation.

Three students with half the teacher's FLOPs, each then distilled the same epochs (the quickstart's KD + CE):

1. ours: compressor.structural.prune_channels(by="flops", importance="output-loss") (DepGraph groups, output-loss
   importance per FLOP, BatchNorm recalibrated);
2. torch-pruning magnitude: torch-pruning's default, MetaPruner with GroupMagnitudeImportance(p=2), uniform
   (global_pruning=False), the classifier head ignored, the ratio bisected to the same FLOPs; no BatchNorm
   recalibration (torch-pruning does none);
3. scratch: ours' pruned architecture, every parameter re-initialised at random.

Two teachers: the quickstart's digits-resnet (digits at 32x32, the pipeline's cached teacher) and a small ViT from
nn.TransformerEncoder defined here (digits at 16x16, 4x4 patches, dim 64, 4 heads, depth 4, MLP 256, class token,
pre-norm), trained here and cached beside the pipeline's teachers.

    python benchmarks/prune_any.py --epochs 3 --models digits-resnet,vit --out benchmarks/results/prune_any.json

Held-out accuracy on the test split before (zero-shot) and after distillation; batch-1 p50 latency in ONNX Runtime
(local-cpu, 2 threads) of the teacher and the three students, measured round robin in the same run. Writes the
JSON and a .md beside it.
"""
from __future__ import annotations

import argparse
import copy
import hashlib
import json
import os
import sys
import tempfile
import time
import types
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # devices/ and exporters/ live beside compressor/
sys.path.insert(0, str(ROOT / "benchmarks"))
import host  # noqa: E402  (benchmarks/host.py: the machine record)

MODELS = ("digits-resnet", "vit")
METHODS = ("ours", "torch-pruning magnitude", "scratch")
REMOVE = 0.5  # of the teacher's FLOPs
LATENCY_TOL = 0.05  # "no more latency": within 5% of the other's p50 (scratch has ours' architecture: noise only)
VIT = {"image_size": 16, "patch": 4, "dim": 64, "heads": 4, "depth": 4, "mlp": 256}
VIT_TRAIN = {"epochs": 60, "lr": 1e-3, "weight_decay": 0.05, "batch_size": 64, "seed": 0}
ROUNDS = 7  # latency: round-robin rounds; each model's figure is its fastest round's p50 (a shared machine only adds time)


class ViT(nn.Module):
    """A small vision Transformer from nn.TransformerEncoder (class token and position embeddings as bare
    nn.Parameters, as a user writes it)."""

    def __init__(self, in_channels=1, num_classes=10, image_size=16, patch=4, dim=64, heads=4, depth=4, mlp=256):
        super().__init__()
        self.patch = nn.Conv2d(in_channels, dim, patch, patch)
        n = (image_size // patch) ** 2
        self.cls = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos = nn.Parameter(torch.zeros(1, n + 1, dim))
        layer = nn.TransformerEncoderLayer(dim, heads, mlp, dropout=0.0, batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, depth, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)
        self.reset_parameters()

    def reset_parameters(self):  # this module's own parameters (the submodules reset their own)
        nn.init.zeros_(self.cls)
        nn.init.normal_(self.pos, std=0.02)

    def forward(self, x):
        h = self.patch(x).flatten(2).transpose(1, 2)
        h = torch.cat([self.cls.expand(len(h), -1, -1), h], 1) + self.pos
        return self.head(self.norm(self.encoder(h))[:, 0])


def machine() -> dict:
    import torch_pruning

    m = host.machine(("torch-pruning", "compressor", "pytorch-lightning", "onnx"), ort_threads=2)
    m["versions"]["torch_pruning.__version__"] = getattr(torch_pruning, "__version__", None)
    return m


# ------------------------------------------------------------------------------------------ teachers

def digits_resnet(log):
    from compressor.data import load_data
    from compressor.recipe import load_recipe
    from compressor.teacher import load_teacher

    recipe = load_recipe("quickstart")
    data = load_data(recipe.data, recipe.seed)
    teacher, origin = load_teacher(recipe, data, log=log)
    info = {"model": "digits-resnet (compressor.models)", "image_size": recipe.data.kwargs.get("image_size"),
            "trained": "earlier, cached" if "trained" not in origin else f"now, {origin['train_seconds']} s",
            "train": recipe.teacher.train.model_dump(mode="json")}
    return recipe, data, teacher, info


def vit(log):
    from compressor.data import load_data
    from compressor.recipe import load_recipe
    from compressor.teacher import cache_dir, train_supervised

    recipe = load_recipe("quickstart", overrides=[f"data.kwargs.image_size={VIT['image_size']}"])
    data = load_data(recipe.data, recipe.seed)
    torch.manual_seed(VIT_TRAIN["seed"])  # the initial weights too (train_supervised seeds only the training)
    model = ViT(data.input_shape[0], data.num_classes, **VIT)
    key = json.dumps({"vit": VIT, "train": VIT_TRAIN, "init": "seeded", "data": recipe.data.model_dump(mode="json"),
                      "seed": recipe.seed}, sort_keys=True)
    path = cache_dir() / "teachers" / f"bench-vit-{hashlib.sha256(key.encode()).hexdigest()[:16]}.pt"
    info = {"model": "ViT (benchmarks/prune_any.py)", "config": VIT, "train": VIT_TRAIN, "image_size": VIT["image_size"]}
    if path.is_file():
        model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
        info["trained"] = "earlier, cached"
    else:
        log(f"training the ViT teacher ({VIT_TRAIN['epochs']} epochs)")
        t0 = time.time()
        spec = types.SimpleNamespace(epochs=VIT_TRAIN["epochs"], lr=VIT_TRAIN["lr"],
                                     weight_decay=VIT_TRAIN["weight_decay"])
        quiet = lambda s: log(s) if s.startswith(f"teacher epoch {spec.epochs}/") or " 1/" in s else None  # noqa: E731
        train_supervised(model, data, spec, VIT_TRAIN["batch_size"], VIT_TRAIN["seed"], log=quiet)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + f".{os.getpid()}.tmp")
        torch.save(model.state_dict(), tmp)
        os.replace(tmp, path)
        info["trained"] = f"now, {time.time() - t0:.0f} s"
    return recipe, data, model.eval(), info


TEACHERS = {"digits-resnet": digits_resnet, "vit": vit}


# ------------------------------------------------------------------------------------------ students

def torch_pruning_magnitude(teacher, x1, head_path: str, target: float, log, tolerance: float = 0.02):
    """torch-pruning's default pruner (L2 magnitude, uniform), ratio bisected until FLOPs <= target."""
    import torch_pruning as tp

    from compressor.flops import count_flops, no_fastpath

    total = count_flops(teacher, x1)

    def prune(r):
        m = copy.deepcopy(teacher).eval().requires_grad_(True)
        mha = {a: a.num_heads for a in m.modules() if isinstance(a, nn.MultiheadAttention)}
        pruner = tp.pruner.MetaPruner(m, x1, importance=tp.importance.GroupMagnitudeImportance(p=2),
                                      pruning_ratio=r, ignored_layers=[m.get_submodule(head_path)],
                                      global_pruning=False, num_heads=mha)
        with no_fastpath():
            pruner.step()
        return m

    best, lo, hi = None, 0.0, 0.95
    for _ in range(14):
        mid = (lo + hi) / 2
        m = prune(mid)
        c = count_flops(m, x1)
        if c <= target:
            best, hi = (mid, m, c), mid
            if c >= target - tolerance * total:
                break
        else:
            lo = mid
    if best is None:
        raise RuntimeError(f"torch-pruning magnitude: no ratio up to {hi} reaches {target:,.0f} FLOPs")
    log(f"torch-pruning magnitude: ratio {best[0]:.4f}: FLOPs {total:,.0f} -> {best[2]:,.0f} ({best[2] / total:.1%})")
    return best[1], {"ratio": round(best[0], 4)}


def reinitialised(model: nn.Module, seed: int) -> nn.Module:
    """A copy of ``model`` with every parameter re-initialised (reset_parameters, or nn.MultiheadAttention's
    _reset_parameters, on every submodule that has one; BatchNorm statistics reset too)."""
    torch.manual_seed(seed)
    m = copy.deepcopy(model)
    for sub in m.modules():
        fn = getattr(sub, "reset_parameters", None) or getattr(sub, "_reset_parameters", None)
        if callable(fn):
            fn()
    return m.requires_grad_(True)


def params(model) -> int:
    return sum(p.numel() for p in model.parameters())


# ------------------------------------------------------------------------------------------ one teacher

def run_teacher(name: str, epochs: int, work: Path, log) -> dict:
    from compressor.distill.train import fit
    from compressor.flops import count_flops
    from compressor.prune import calibration_batches
    from compressor.structural import kept_by_default, prune_channels
    from compressor.tasks import get_task

    t0 = time.time()
    recipe, data, teacher, tinfo = TEACHERS[name](log)
    teacher.eval()
    task = get_task("classification")
    bs = recipe.data.batch_size
    x1 = data.tensors("test", limit=1)[0]
    t_flops = count_flops(teacher, x1)
    t_acc = task.score(teacher, data, bs)["accuracy"]
    tinfo.update(accuracy=t_acc, flops=t_flops, params=params(teacher))
    log(f"[{name}] teacher: {t_flops / 1e6:.1f} MFLOPs, {params(teacher):,} params, held-out accuracy {t_acc:.4f}")
    head = next(p for p, why in kept_by_default(teacher, x1).items() if why == "classifier head")
    batches, labels = calibration_batches(data, bs, 4, labels=True)  # the prune stage's default: 4 batches
    out = {"teacher": tinfo, "head": head, "errors": {}, "details": {}, "students": {}}
    students = {}

    t = time.time()
    try:
        pruned, plan, info = prune_channels(teacher, batches, REMOVE, by="flops", importance="output-loss",
                                            labels=labels, log=log)
        students["ours"] = pruned
        out["details"]["ours"] = {"prune": {k: info[k] for k in ("allocation", "ratio", "kept",
                                                                   "modules_changed", "batchnorm_recalibrated")},
                                  "prune_seconds": round(time.time() - t, 1)}
    except Exception as e:  # reported, not fixed here
        out["errors"]["ours"] = f"{type(e).__name__}: {e}"
        log(f"[{name}] ours failed: {out['errors']['ours']}")
    t = time.time()
    try:
        m, info = torch_pruning_magnitude(teacher, x1, head, (1 - REMOVE) * t_flops, log)
        students["torch-pruning magnitude"] = m
        out["details"]["torch-pruning magnitude"] = {"prune": {**info, "batchnorm_recalibrated": 0},
                                                     "prune_seconds": round(time.time() - t, 1)}
    except Exception as e:
        out["errors"]["torch-pruning magnitude"] = f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"
        log(f"[{name}] torch-pruning magnitude failed: {out['errors']['torch-pruning magnitude']}")
    if "ours" in students:
        students["scratch"] = reinitialised(students["ours"], seed=0)
        out["details"]["scratch"] = {"init_seed": 0, "architecture": "ours' pruned student"}
    else:
        out["errors"]["scratch"] = "needs ours' pruned architecture"

    spec = recipe.distill.model_copy(update={"epochs": epochs})
    out["distill"] = {"epochs": epochs, "lr": spec.lr, "weight_decay": spec.weight_decay,
                      "losses": " + ".join(f"{l.weight} {l.name}" for l in spec.losses), "seed": 0,
                      "batch_size": bs}
    for method in METHODS:
        if method not in students:
            continue
        s = students[method].requires_grad_(True)
        zero = task.score(s, data, bs)["accuracy"]
        log(f"[{name}] {method}: {count_flops(s, x1) / t_flops:.1%} of the FLOPs, zero-shot accuracy {zero:.4f}; "
            f"distilling {epochs} epochs")
        d = fit(s, teacher, data, spec, recipe.data, work / name / method.replace(" ", "-") / "ckpt", seed=0,
                log=lambda msg, n=f"  {name} {method}: ": log(n + msg))
        acc = task.score(s, data, bs)["accuracy"]
        out["students"][method] = {"zero_shot_accuracy": zero, "accuracy": acc}
        out["details"][method].update(distill_seconds=d["train_seconds"],
                                      best_val_acc=d.get("best_val_acc"))
        log(f"[{name}] {method}: held-out accuracy {acc:.4f} after distillation")

    # Latency: the teacher and every student exported, then measured round robin.
    from devices import get_device, load_profile
    from exporters.onnx import export_onnx

    dev = get_device(load_profile("local-cpu"))
    onnx = {}
    for method, m in [("teacher", teacher), *students.items()]:
        p = work / name / f"{method.replace(' ', '-')}.onnx"
        export_onnx(m.eval(), (x1,), p, dynamic_batch=False)
        onnx[method] = p
    p50 = {k: [] for k in onnx}
    for _ in range(ROUNDS):
        for method, p in onnx.items():
            p50[method].append(dev.measure(p, batch=1, warmup=20, runs=200, max_seconds=5).p50_ms)
    lat = {k: min(v) for k, v in p50.items()}
    log(f"[{name}] batch-1 p50 ms: " + ", ".join(f"{k} {v:.3f}" for k, v in lat.items()))

    rows = [{"model": name, "method": "teacher", "flops": t_flops, "flops_ratio": 1.0, "params": params(teacher),
             "zero_shot_accuracy": t_acc, "accuracy": t_acc, "b1_p50_ms": lat["teacher"], "b1_ratio_vs_teacher": 1.0}]
    for method in METHODS:
        if method not in students:
            continue
        s, r = students[method], out["students"][method]
        f = count_flops(s, x1)
        rows.append({"model": name, "method": method, "flops": f, "flops_ratio": f / t_flops, "params": params(s),
                     "zero_shot_accuracy": r["zero_shot_accuracy"], "accuracy": r["accuracy"],
                     "b1_p50_ms": lat[method], "b1_ratio_vs_teacher": lat[method] / lat["teacher"]})
    out["rows"] = rows
    out["b1_p50_ms_rounds"] = p50
    out["verdict"] = verdict(rows)
    out["seconds"] = round(time.time() - t0, 1)
    del out["students"]
    return out


def verdict(rows: list[dict]) -> dict:
    """Did ours keep at least as much accuracy as both others at no more latency (within LATENCY_TOL)?"""
    by = {r["method"]: r for r in rows}
    if not all(m in by for m in METHODS):
        return {"holds": None, "why": "missing: " + ", ".join(m for m in METHODS if m not in by)}
    ours, others = by["ours"], [by[m] for m in METHODS[1:]]
    acc = all(ours["accuracy"] >= o["accuracy"] for o in others)
    lat = all(ours["b1_p50_ms"] <= o["b1_p50_ms"] * (1 + LATENCY_TOL) for o in others)
    return {"holds": acc and lat, "accuracy_at_least": acc, "latency_no_more": lat}


# ------------------------------------------------------------------------------------------ output

def markdown(r: dict) -> str:
    m = r["machine"]
    flags = ", ".join(f"{k} {'yes' if v else 'no'}" for k, v in m["cpu_flags"].items())
    v = m["versions"]
    lines = [
        "# Channel pruning of any model: ours vs torch-pruning's default vs random init",
        "",
        f"`{r['command']}` ({r['date']}, {r['seconds'] / 60:.1f} min). Machine: {m['cpu']} ({m['cores']} cores; {flags}), "
        f"torch {v['torch']} ({m['torch_threads']} thread{'s' * (m['torch_threads'] != 1)}), torch-pruning {v['torch-pruning']}, ONNX Runtime "
        f"{v['onnxruntime']} at {m['ort_threads']} threads; load average {m['load_average'][0]} at the start, "
        f"{r['load_after'][0]} at the end (a shared machine).",
        "",
        f"Every student has at most {1 - r['remove']:.0%} of its teacher's FLOPs and is then distilled the same "
        f"{r['epochs']} epoch{'s' * (r['epochs'] != 1)} (the quickstart's distill settings: {r['distill_losses']}, AdamW, cosine, seed "
        f"{r['distill_seed']}, best validation epoch kept):",
        "",
        "- **ours**: `compressor.structural.prune_channels(by=\"flops\", importance=\"output-loss\")`: DepGraph "
        "groups scored by output loss (Fisher diagonal x w^2) per FLOP, channels in multiples of 8, the classifier "
        "head kept, BatchNorm recalibrated on 4 training batches;",
        "- **torch-pruning magnitude**: torch-pruning's default, `MetaPruner` with `GroupMagnitudeImportance(p=2)`, "
        "uniform ratio (`global_pruning=False`) bisected to the same FLOPs, the classifier head ignored, attention "
        "heads kept; no BatchNorm recalibration (torch-pruning's default);",
        "- **scratch**: ours' pruned architecture, every parameter re-initialised at random (seed "
        f"{r['scratch_seed']}), then the same distillation.",
        "",
        "Accuracy: held-out (test split). Zero-shot: before distillation. Latency: batch-1 p50 in ONNX Runtime "
        f"(local-cpu), the fastest of {r['rounds']} round-robin rounds of the teacher and the three students (a shared machine only adds time).",
        "",
    ]
    for name, t in r["teachers"].items():
        ti = t.get("teacher", {})
        lines += [f"## {name}", ""]
        if "rows" not in t:
            lines += [f"Failed: {t.get('error')}", ""]
            continue
        desc = (f"{ti['model']}, digits at {ti['image_size']}x{ti['image_size']}, {ti['params']:,} params, "
                f"{ti['flops'] / 1e6:.1f} MFLOPs, held-out accuracy {ti['accuracy']:.4f} (trained {ti['trained']}")
        desc += f"; {ti['train']['epochs']} epochs" if "epochs" in ti.get("train", {}) else ""
        lines += [desc + ").", ""]
        lines += ["| method | MFLOPs | FLOPs vs teacher | params | zero-shot accuracy | accuracy | b1 p50 ms | "
                  "b1 vs teacher |", "|---|---|---|---|---|---|---|---|"]
        for row in t["rows"]:
            lines.append(f"| {row['method']} | {row['flops'] / 1e6:.1f} | {row['flops_ratio']:.3f} | "
                         f"{row['params']:,} | {row['zero_shot_accuracy']:.4f} | {row['accuracy']:.4f} | "
                         f"{row['b1_p50_ms']:.3f} | {row['b1_ratio_vs_teacher']:.3f} |")
        d = t["details"]
        notes = []
        if "ours" in d:
            p = d["ours"]["prune"]
            notes.append(f"ours: {p['allocation']} ratio {p['ratio']}")
        if "torch-pruning magnitude" in d:
            notes.append(f"torch-pruning: uniform ratio {d['torch-pruning magnitude']['prune']['ratio']}")
        lines += ["", "; ".join(notes) + "." if notes else ""]
        for method, err in t["errors"].items():
            lines.append(f"{method} failed: `{err}`")
        lines += ["", sentence(t["rows"], t["verdict"]), ""]
    return "\n".join(lines)


def sentence(rows, v) -> str:
    if v["holds"] is None:
        return f"No verdict: {v['why']}."
    by = {r["method"]: r for r in rows}
    o, tp, sc = by["ours"], by["torch-pruning magnitude"], by["scratch"]
    nums = (f"accuracy {o['accuracy']:.4f} vs {tp['accuracy']:.4f} (torch-pruning) and {sc['accuracy']:.4f} "
            f"(scratch); b1 p50 {o['b1_p50_ms']:.3f} ms vs {tp['b1_p50_ms']:.3f} and {sc['b1_p50_ms']:.3f} ms, "
            f"within {LATENCY_TOL:.0%} counting as no more")
    if v["holds"]:
        return f"Yes: ours kept at least as much accuracy as both others at no more latency ({nums})."
    why = []
    if not v["accuracy_at_least"]:
        why.append("less accuracy than " + " and ".join(
            n for n, x in (("torch-pruning", tp), ("scratch", sc)) if o["accuracy"] < x["accuracy"]))
    if not v["latency_no_more"]:
        why.append("more latency than " + " and ".join(
            n for n, x in (("torch-pruning", tp), ("scratch", sc))
            if o["b1_p50_ms"] > x["b1_p50_ms"] * (1 + LATENCY_TOL)))
    return f"No: ours had {' and '.join(why)} ({nums})."


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--epochs", type=int, default=3, help="distillation epochs, the same for every student")
    p.add_argument("--models", default=",".join(MODELS), help=f"comma-separated, of {', '.join(MODELS)}")
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/prune_any.json"))
    p.add_argument("--threads", type=int, default=1, help="torch threads for training and pruning (ONNX Runtime "
                   "latency uses the local-cpu profile's 2): on a shared 2-core machine a second torch thread "
                   "mostly waits at barriers, and a busy neighbour can make it many times slower")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    models = [s.strip() for s in a.models.split(",") if s.strip()]
    for s in models:
        if s not in MODELS:
            p.error(f"unknown model {s!r}: {', '.join(MODELS)}")
    log = lambda s: print(s, file=sys.stderr, flush=True)  # noqa: E731
    t0 = time.time()
    args = " ".join(argv if argv is not None else sys.argv[1:])
    res = {"benchmark": "prune_any", "command": f"python benchmarks/prune_any.py {args}".strip(),
           "machine": machine(), "remove": REMOVE, "epochs": a.epochs, "models": models, "rounds": ROUNDS,
           "latency_tolerance": LATENCY_TOL, "distill_seed": 0, "scratch_seed": 0, "data_seed": 0,
           "vit": {"config": VIT, "train": VIT_TRAIN}, "teachers": {}}
    res["date"] = res["machine"]["date"]
    with tempfile.TemporaryDirectory(prefix="prune_any.") as tmp:
        for name in models:
            try:
                res["teachers"][name] = run_teacher(name, a.epochs, Path(tmp), log)
            except Exception as e:  # one teacher failing still leaves the other's table
                import traceback

                traceback.print_exc()
                res["teachers"][name] = {"error": f"{type(e).__name__}: {str(e)[:500]}"}
    first = next((t for t in res["teachers"].values() if "distill" in t), None)
    res["distill_losses"] = first["distill"]["losses"] if first else None
    res["load_after"] = [round(v, 2) for v in os.getloadavg()]
    res["seconds"] = round(time.time() - t0, 1)
    text = json.dumps(res, indent=2, default=str)
    from compressor.bundle import atomic_write

    a.out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(a.out, text + "\n")
    md = markdown(res)
    atomic_write(a.out.with_suffix(".md"), md + "\n")
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
