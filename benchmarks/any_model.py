"""Any model, the whole pipeline: models nobody designed the toolchain for, pruned to half their FLOPs and distilled.

For each architecture of tests/user_models.py (vit, residual_mlp, dw_cnn, dict_cnn, fused_qkv_vit, mixer,
shufflenet, weight_norm_cnn: nn.Modules defined there; hf_resnet, hf_mobilenet, hf_vit, hf_bert, hf_deberta,
hf_albert, hf_gpt2, hf_distilbert, hf_beit, hf_dinov2, hf_mpnet: tiny-config Hugging Face classifiers) one
`compressor.run` of the tests' tiny recipe
(tests/conftest.py TINY, tests/test_any_model.py `_recipe`), changed as stated:

    teacher   user_models:<name>, trained on first use (TEACHER_TRAIN below: epochs and lr per model) and cached
              in $COMPRESSOR_CACHE (default here: /tmp/compressor-any-model-cache)
    data      digits at 16x16, 1 channel (text models: user_models:token_data, 16 tokens, 4 classes)
    student   none: prune: {channels: {remove: 0.5}} makes it (torch-pruning's dependency graph, output-loss
              importance per FLOP; PRUNE_FOR below where the model refuses it, as its error says), then
              distill: {epochs: 5, lr: 0.003} (the default kd + ce), the same for all
    targets   [local-cpu]: the profile stage measures teacher and student at batch 1 in ONNX Runtime
              (warmup 20, 200 runs, at most 5 s each)

    python benchmarks/any_model.py                                   # all nineteen, results in benchmarks/results/
    python benchmarks/any_model.py --models vit,hf_bert --out /tmp/any_model.json

Per model: the teacher's params; its FLOPs as the analyze stage counts them (torch.utils.flop_counter) and by an
independent count from module shapes (tests/test_any_model.py `independent_flops`, on one example of the same
builder's model); the pruned student's FLOPs (prune stage) and their ratio to the teacher's; held-out accuracy of
teacher and student and the retained fraction (manifest `quality`); batch-1 p50 latency of both (profile stage,
local-cpu) and the speedup; the seconds of the whole run (teacher training included when it was not cached). A run
that fails is a row with its error line. Writes the JSON and a .md beside it.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TESTS = ROOT / "tests"
sys.path.insert(0, str(ROOT))  # devices/ and exporters/ live beside compressor/
sys.path.insert(0, str(ROOT / "benchmarks"))
import host  # noqa: E402  (benchmarks/host.py: the machine record)
sys.path.insert(0, str(TESTS))  # user_models, conftest, test_any_model
os.environ["PYTHONPATH"] = os.pathsep.join([str(TESTS), str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])
os.environ.setdefault("COMPRESSOR_CACHE", "/tmp/compressor-any-model-cache")

MODELS = ("vit", "residual_mlp", "dw_cnn", "hf_resnet", "hf_mobilenet", "hf_vit", "hf_bert",
          # from sweeps of architectures that each broke a stage once (tests/test_more_models.py)
          "hf_deberta", "hf_albert", "hf_gpt2", "hf_distilbert", "dict_cnn",
          "fused_qkv_vit", "mixer", "shufflenet", "weight_norm_cnn", "hf_beit", "hf_dinov2", "hf_mpnet")
TEXT = ("hf_bert", "hf_deberta", "hf_albert", "hf_gpt2", "hf_distilbert", "hf_mpnet")  # user_models:token_data
# The shape count of tests/test_any_model.py knows Linear, Conv2d, nn.MultiheadAttention and BERT-style attention;
# these run matmuls it does not see (DeBERTa's and MPNet's relative-position terms, GPT-2's Conv1D, DistilBERT's
# q_lin attention, scaled_dot_product_attention, BEiT's and DINOv2's attention classes).
NOT_INDEPENDENT = ("hf_deberta", "hf_gpt2", "hf_distilbert", "fused_qkv_vit", "hf_beit", "hf_dinov2", "hf_mpnet")
# Teacher training per model: long enough for a reasonably accurate teacher, under ~2 minutes each on 2 cores.
TEACHER_TRAIN = {  # tried beforehand at 1 torch thread (test accuracy): vit 20 ep 0.939, 60 ep 0.961; hf_vit 20 ep at
    # 1e-3 0.889, 60 ep at 2e-3 0.981; hf_mobilenet 15 ep 0.922, 30 ep 0.944 (39 s); the rest >= 0.95 at 15 epochs
    "vit": {"epochs": 60, "lr": 1e-3},
    "residual_mlp": {"epochs": 15, "lr": 0.003},
    "dw_cnn": {"epochs": 15, "lr": 0.003},
    "hf_resnet": {"epochs": 15, "lr": 0.003},
    "hf_mobilenet": {"epochs": 30, "lr": 0.003},
    "hf_vit": {"epochs": 60, "lr": 2e-3},
    "hf_bert": {"epochs": 15, "lr": 0.003},
    "hf_deberta": {"epochs": 15, "lr": 0.003},
    "hf_albert": {"epochs": 15, "lr": 0.003},
    "hf_gpt2": {"epochs": 15, "lr": 0.003},
    "hf_distilbert": {"epochs": 15, "lr": 0.003},
    "dict_cnn": {"epochs": 15, "lr": 0.01},
    "fused_qkv_vit": {"epochs": 30, "lr": 0.003},
    "mixer": {"epochs": 30, "lr": 0.003},
    "shufflenet": {"epochs": 15, "lr": 0.01},
    "weight_norm_cnn": {"epochs": 15, "lr": 0.01},
    "hf_beit": {"epochs": 30, "lr": 0.002},
    "hf_dinov2": {"epochs": 30, "lr": 0.002},
    "hf_mpnet": {"epochs": 15, "lr": 0.003},
}
PRUNE = {"channels": {"remove": 0.5}}
# Where the default cannot go, what the error told the user to do instead (each refusal is tested):
PRUNE_FOR = {
    # torch-pruning has no rule for transformers' Conv1D: no channel can be cut; whole blocks instead
    "hf_gpt2": {"by": "flops", "remove": 0.4},  # one of its two blocks (0.5 would take both)
    # DepGraph cannot trace the channel shuffle: whole blocks (its units have no skip path)
    "shufflenet": {"by": "flops", "remove": 0.3},
}
DISTILL = {"epochs": 5, "lr": 0.003}
PROFILE = {"batch_sizes": [1], "warmup": 20, "runs": 200, "max_seconds": 5}
TARGET = "local-cpu"


def recipe_for(name: str) -> dict:
    """The tests' tiny recipe (conftest TINY) made into `_recipe`'s whole run, with the schedules above."""
    from conftest import TINY

    r = copy.deepcopy(TINY)
    r["name"] = f"any-{name.replace('_', '-')}"
    r["teacher"] = {"model": f"user_models:{name}", "train": dict(TEACHER_TRAIN[name])}
    r.pop("student", None)
    r["prune"] = copy.deepcopy(PRUNE_FOR.get(name, PRUNE))
    r["distill"] = dict(DISTILL)
    r["profile"] = copy.deepcopy(PROFILE)
    r["targets"] = [TARGET]
    if name in TEXT:
        r["data"] = {"dataset": "user_models:token_data", "batch_size": 64}
    return r


def machine() -> dict:
    return host.machine(("transformers", "torch-pruning", "compressor", "pytorch-lightning", "onnx"))


def independent(name: str) -> int:
    """The teacher's FLOPs on one example by tests/test_any_model.py's count from module shapes: the same
    builder's model (random weights: FLOPs do not depend on them), taken in by compressor.intake."""
    import torch
    import user_models as U
    from test_any_model import _call, _example, independent_flops

    from compressor.intake import intake

    model = getattr(U, name)().eval()
    x = _example("hf_bert" if name in TEXT else name)  # token inputs for every text model
    with torch.no_grad():
        out = _call(model, x)
    intake(model, out)
    return independent_flops(model, x)  # counts on x[:1]


def _stage(m: dict, name: str) -> dict:
    return next((s for s in m["stages"] if s["name"] == name), {}).get("metrics") or {}


def row_of(name: str, bundle: Path) -> dict:
    from compressor.bundle import read_manifest

    m = read_manifest(bundle)
    analyze, prune, profile = _stage(m, "analyze"), _stage(m, "prune"), _stage(m, "profile")
    lat = profile.get(TARGET) or {}
    t_flops, s_flops = analyze["teacher"]["flops"], prune.get("flops")
    t_ms, s_ms = lat.get("teacher_b1_p50_ms"), lat.get("student_b1_p50_ms")
    q = m.get("quality") or {}
    teacher = m.get("teacher") or {}
    return {"model": name, "params": analyze["teacher"]["params"], "student_params": prune.get("params"),
            "flops": t_flops, "flops_independent": None, "student_flops": s_flops,
            "flops_ratio": s_flops / t_flops if s_flops and t_flops else None,
            "channels_ratio": (prune.get("channels") or {}).get("ratio"),
            "teacher_accuracy": (q.get("teacher") or {}).get("accuracy"),
            "student_accuracy": (q.get("student") or {}).get("accuracy"),
            "student_onnx_accuracy": (q.get("student") or {}).get("onnx_accuracy"),
            "retained": q.get("retained"),
            "teacher_b1_p50_ms": t_ms, "student_b1_p50_ms": s_ms,
            "speedup_b1": t_ms / s_ms if t_ms and s_ms else None,
            "parity_max_abs": (_stage(m, "export").get("student") or {}).get("parity_max_abs"),
            "teacher_trained_now": "train_seconds" in teacher and bool(teacher.get("train_seconds")),
            "teacher_train_seconds": teacher.get("train_seconds"),
            "distill_seconds": (_stage(m, "distill") or {}).get("train_seconds"),
            "test_size": (m.get("data") or {}).get("test")}


def run_model(name: str, work: Path, log) -> dict:
    import compressor

    recipe = recipe_for(name)
    t0 = time.time()
    row: dict = {"model": name}
    try:
        log(f"[{name}] running")
        bundle = compressor.run(recipe, work / name, force=True, log=lambda s: log(f"  {name}: {s}"))
        row = row_of(name, bundle)
    except Exception as e:  # a model that fails is a row with its error; the others still run
        traceback.print_exc()
        row["error"] = f"{type(e).__name__}: {(str(e).splitlines() or [''])[0][:300]}"
    row["seconds"] = round(time.time() - t0, 1)
    row["prune"] = recipe["prune"]
    try:
        if name in NOT_INDEPENDENT:
            raise NotImplementedError("attention the shape count does not know")
        row["flops_independent"] = independent(name)
        if row.get("flops"):
            row["flops_agreement"] = row["flops"] / row["flops_independent"]
    except NotImplementedError as e:
        row["flops_independent_na"] = str(e)
    except Exception as e:
        traceback.print_exc()
        row["flops_independent_error"] = f"{type(e).__name__}: {(str(e).splitlines() or [''])[0][:300]}"
    row["teacher_train"] = TEACHER_TRAIN[name]
    log(f"[{name}] {'failed: ' + row['error'] if 'error' in row else 'done'} in {row['seconds']:.0f} s")
    return row


def _f(v, spec):
    return "n/a" if v is None else format(v, spec)


def _prune_said(pr: dict) -> str:
    if "channels" in pr:
        c = pr["channels"]
        return (f"channels {c['remove']:g}" + (f", multiple {c['multiple']}" if "multiple" in c else "")
                + (f", {len(pr['ignore'])} attentions ignored" if pr.get("ignore") else ""))
    return f"blocks, by {pr['by']} {pr['remove']:g}"


def markdown(res: dict) -> str:
    mc = res["machine"]
    v, fl = mc["versions"], mc["cpu_flags"]
    flags = ", ".join(f"{k} {'yes' if on else 'no'}" for k, on in fl.items())
    lines = ["# Any model: prune to half the FLOPs, distil, measure", "",
             f"    {res['command']}", "",
             f"{mc['date']}; {mc['cpu']} ({flags}), {mc['cores']} cores (load average {mc['load_average'][0]:.1f} at "
             f"the start), torch {v['torch']} at {res.get('torch_threads')} thread(s) for training, transformers {v.get('transformers')}, torch-pruning "
             f"{v.get('torch-pruning')}, ONNX Runtime {v['onnxruntime']}. Whole run: {res['seconds']:.0f} s.", "",
             f"Each row is one `compressor.run` (tests' tiny recipe): teacher `user_models:<model>` trained on first "
             f"use (epochs / lr in the column), prune `{json.dumps(res['prune'])}`, distill "
             f"`{json.dumps(res['distill'])}` (kd + ce), latency p50 at batch 1 on {TARGET} (ONNX Runtime, warmup "
             f"{res['profile']['warmup']}, {res['profile']['runs']} runs). Image models: digits 16x16, 1 channel "
             f"(test split {res.get('test_size', {}).get('digits', 'n/a')}); text models: user_models:token_data "
             f"(test split {res.get('test_size', {}).get('token_data', 'n/a')}). FLOPs per sample; independent: "
             "tests/test_any_model.py `independent_flops` on the same builder's model (n/a: attention it does not "
             "count); seconds: the whole run, teacher training included where it was not cached (*). A model whose "
             "structure refuses the default cut gets what the refusal says to do, in brackets.", "",
             "| model | teacher train | params | FLOPs (ours) | FLOPs (independent) | pruned FLOPs (ratio) | teacher acc | "
             "student acc | retained | teacher b1 p50 ms | student b1 p50 ms | speedup | seconds |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in res["rows"]:
        tt = r.get("teacher_train") or {}
        train = f"{tt.get('epochs')} ep, lr {tt.get('lr'):g}" if tt else ""
        indep = ("n/a" if "flops_independent_na" in r else _f(r.get("flops_independent"), ",")
                 if "flops_independent_error" not in r else "error")
        pr = r.get("prune") or res["prune"]
        prune = "" if pr == res["prune"] else f" ({_prune_said(pr)})"
        if "error" in r:
            lines.append(f"| {r['model']}{prune} | {train} | | | {indep} | | | | | | | | {_f(r.get('seconds'), '.0f')} |")
            continue
        star = "*" if r.get("teacher_trained_now") else ""
        lines.append(
            f"| {r['model']}{prune} | {train} | {r['params']:,} | {_f(r['flops'], ',')} | {indep} | "
            f"{_f(r['student_flops'], ',')} ({_f(r['flops_ratio'], '.3f')}) | {_f(r['teacher_accuracy'], '.4f')} | "
            f"{_f(r['student_accuracy'], '.4f')} | {_f(r['retained'], '.3f')} | {_f(r['teacher_b1_p50_ms'], '.3f')} | "
            f"{_f(r['student_b1_p50_ms'], '.3f')} | {_f(r['speedup_b1'], '.2f')}x | {_f(r['seconds'], '.0f')}{star} |")
    errors = [r for r in res["rows"] if "error" in r or "flops_independent_error" in r]
    if errors:
        lines.append("")
        for r in errors:
            if "error" in r:
                lines.append(f"- {r['model']}: the run failed: `{r['error']}`")
            if "flops_independent_error" in r:
                lines.append(f"- {r['model']}: the independent count failed: `{r['flops_independent_error']}`")
    lines += ["", "Latencies were measured on a shared 2-core machine (other jobs ran beside this one), so absolute "
                  "milliseconds are noisy: the teacher / student ratios, each pair measured in the same run, are what "
                  "to compare."]
    return "\n".join(lines)


def _rel(arg: str) -> str:
    """An argument as the command line gave it, with this checkout's root taken out (no absolute paths)."""
    return arg.replace(str(ROOT) + os.sep, "")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default=",".join(MODELS), help=f"comma-separated, of {', '.join(MODELS)}")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "any_model.json",
                   help="the results JSON (the .md is written beside it)")
    p.add_argument("--work", type=Path, default=Path("/tmp/any-model-bench"), help="the bundles (replaced each run)")
    p.add_argument("--threads", type=int, default=1, help="torch threads for training, pruning and distillation "
                   "(ONNX Runtime latency uses the local-cpu profile's 2): on a shared 2-core machine a second torch "
                   "thread mostly waits at barriers (measured here: a ViT training step 13 ms at 1 thread, 1.5 s at 2)")
    a = p.parse_args(argv)
    import torch

    torch.set_num_threads(a.threads)
    models = [s.strip() for s in a.models.split(",") if s.strip()]
    for s in models:
        if s not in MODELS:
            p.error(f"unknown model {s!r}: {', '.join(MODELS)}")
    log = lambda s: print(s, file=sys.stderr, flush=True)  # noqa: E731
    t0 = time.time()
    args = " ".join(_rel(x) for x in (argv if argv is not None else sys.argv[1:]))
    res = {"benchmark": "any_model", "command": f"python benchmarks/any_model.py {args}".strip(),
           "machine": machine(), "models": models, "teacher_train": {m: TEACHER_TRAIN[m] for m in models},
           "prune": PRUNE, "distill": DISTILL, "profile": PROFILE, "target": TARGET, "torch_threads": a.threads,
           "rows": []}
    log(f"COMPRESSOR_CACHE={os.environ['COMPRESSOR_CACHE']}, bundles in {a.work}")
    a.work.mkdir(parents=True, exist_ok=True)
    for name in models:
        res["rows"].append(run_model(name, a.work, log))
    sizes = {}
    for r in res["rows"]:
        if r.get("test_size"):
            sizes["token_data" if r["model"] in TEXT else "digits"] = r["test_size"]
    res["test_size"] = sizes
    res["load_after"] = [round(v, 2) for v in os.getloadavg()]
    res["seconds"] = round(time.time() - t0, 1)
    from compressor.bundle import atomic_write

    a.out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(a.out, json.dumps(res, indent=2, default=str) + "\n")
    md = markdown(res)
    atomic_write(a.out.with_suffix(".md"), md + "\n")
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
