"""Do the search's rankings order students the way distillation does?

    python benchmarks/search_rank.py                  # the teacher's sub-networks (benchmarks/rank_subnets.py):
                                                      # #params, FLOPs, DisWOT and each rung against the distilled
                                                      # accuracy; writes results/search_rank.json and .md
    python benchmarks/search_rank.py --rungs 0,0.5,1.5,4.5,13.5 --train-seeds 2
    # a harder space, whose distilled accuracies spread (0.68..0.996): deep channel cuts under 8% of the FLOPs
    python benchmarks/search_rank.py --channels 0.85,0.9,0.95 --max-flops 0.08 --tag .heavy

--space family: the zero-cost proxies on a family space, and how fast the NSGA-II search scores. Samples
candidates of the digits ResNet space (derived from the quickstart-style teacher) under one size budget, distils each with the same training budget (KD from the teacher, same epochs, lr, seed), and
reports Kendall tau between each proxy's score and the distilled held-out accuracy. Parameter count is
the baseline a proxy has to beat. Then runs the NSGA-II search with DisWOT to count candidates scored
per minute. Writes benchmarks/results/search_rank.family.json and .md (--tag).

    python benchmarks/search_rank.py --space family   # 16 candidates, 6 epochs (about 10 minutes on 2 shared cores)
    python benchmarks/search_rank.py --space family --candidates 24 --epochs 5
    # harder, so distilled accuracies spread: 8x8 digits, 2 epochs, 20% noisy training labels; each proxy
    # averaged over 4 (init seed, batch) pairs, each accuracy over 2 training seeds
    python benchmarks/search_rank.py --space family --image-size 8 --epochs 2 --label-noise 0.2 --proxy-seeds 4 \
        --train-seeds 2 --candidates 24 --size-mb 0.2 --tag .hard
"""
from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from host import repo_path  # noqa: E402  (results hold no absolute paths)

from compressor.data import DataSplits, _split, digits  # noqa: E402
from compressor.models import ResNet, count_params  # noqa: E402
from compressor.search import PROXIES  # noqa: E402
from compressor.search.nsga import search  # noqa: E402  (imported now: a long run must not see newer code)
from compressor.search.proxies import TeacherView, cost  # noqa: E402
from compressor.search.spaces import detect, genome_key  # noqa: E402
from compressor.teacher import evaluate  # noqa: E402


def train(model, data: DataSplits, epochs: int, lr: float, seed: int, teacher=None, temperature: float = 4.0):
    """Plain loop (no Lightning start-up per candidate): 0.7 KD (T^2-scaled, batchmean) + 0.3 CE."""
    torch.manual_seed(seed)
    loader = data.loader("train", 64, shuffle=True, seed=seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=epochs * len(loader))
    for _ in range(epochs):
        model.train()
        for x, y in loader:
            logits = model(x)
            loss = F.cross_entropy(logits, y)
            if teacher is not None:
                with torch.no_grad():
                    t = teacher(x)
                kd = F.kl_div(F.log_softmax(logits / temperature, -1), F.softmax(t / temperature, -1),
                              reduction="batchmean") * temperature ** 2
                loss = 0.7 * kd + 0.3 * loss
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    return model.eval()


def kendall(a, b) -> float:
    """Kendall's tau-b (ties in either ranking counted as scipy does)."""
    from scipy.stats import kendalltau

    return float(kendalltau(a, b, variant="b").statistic)


def main(argv=None):
    first = argparse.ArgumentParser(add_help=False)
    first.add_argument("--space", choices=("teacher", "family"), default="teacher")
    known, rest = first.parse_known_args(argv)
    if known.space == "teacher":
        import rank_subnets

        return rank_subnets.main(rest, out_dir=ROOT / "benchmarks" / "results")
    family(rest)


def family(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--candidates", type=int, default=16)
    ap.add_argument("--epochs", type=int, default=6, help="distillation epochs per candidate (the same for all)")
    ap.add_argument("--lr", type=float, default=5e-3)
    ap.add_argument("--image-size", type=int, default=16)
    ap.add_argument("--size-mb", type=float, default=0.4, help="the size budget every candidate meets")
    ap.add_argument("--min-mb", type=float, default=0.0,
                    help="and a floor: a narrow band (e.g. 0.15..0.25) compares architectures of about equal size, "
                         "where the parameter count can no longer rank them")
    ap.add_argument("--tag", default=".family", help="suffix for the result files (search_rank<tag>.json/.md)")
    ap.add_argument("--search-trials", type=int, default=150, help="NSGA-II trials for the speed figure")
    ap.add_argument("--proxy-seeds", type=int, default=3,
                    help="average each proxy over this many (init seed, batch) pairs, as DisWOT advises")
    ap.add_argument("--train-seeds", type=int, default=1,
                    help="average each candidate's distilled accuracy over this many training seeds")
    ap.add_argument("--label-noise", type=float, default=0.0,
                    help="fraction of training labels replaced by random ones (teacher and students; test stays clean)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)  # as the search runs; on a shared 2-core machine this is also the fastest
    t_all = time.time()

    ds = digits(args.image_size)
    train_set, val, test = _split(ds, (0.1, 0.2), args.seed)
    if args.label_noise > 0:
        # Noisy training labels make the task harder without touching the held-out labels.
        x_all, y_all = ds.tensors
        y_all = y_all.clone()
        g = torch.Generator().manual_seed(args.seed)
        idx = torch.tensor(train_set.indices)
        flip = idx[torch.randperm(len(idx), generator=g)[:round(args.label_noise * len(idx))]]
        y_all[flip] = torch.randint(0, 10, (len(flip),), generator=g)
        ds.tensors = (x_all, y_all)
    data = DataSplits(train_set, val, test, tuple(ds.tensors[0].shape[1:]), 10, {})
    torch.manual_seed(args.seed)
    teacher = ResNet((32, 64, 128), (2, 2, 2), in_channels=1, num_classes=10)
    t0 = time.time()
    train(teacher, data, 6, 3e-3, args.seed)
    t_acc = evaluate(teacher, data.loader("test", 256))
    print(f"teacher: {count_params(teacher):,} params, held-out accuracy {t_acc:.4f} ({time.time() - t0:.0f} s)")

    space = detect(teacher)
    defaults = {"in_channels": 1, "num_classes": 10}
    batch = data.tensors("train", limit=64)
    example = batch[0][:1]
    view = TeacherView.of(teacher, batch)
    # Several (init seed, batch) pairs: a proxy on one random init and one batch of 64 is noisy.
    xs, ys = data.tensors("train", limit=64 * args.proxy_seeds)
    pairs = [(args.seed + k, (xs[64 * k:64 * (k + 1)], ys[64 * k:64 * (k + 1)])) for k in range(args.proxy_seeds)]
    views = [TeacherView.of(teacher, b) for _, b in pairs]

    # Candidates: distinct genomes under the size budget, sampled uniformly from the space.
    rng = random.Random(args.seed)
    genomes, seen = [], set()
    while len(genomes) < args.candidates:
        g = space.sample(rng)
        n, _ = cost(lambda: space.build(g, defaults), example)
        if genome_key(g) in seen or not args.min_mb <= 4 * n / 1e6 <= args.size_mb:
            continue
        seen.add(genome_key(g))
        genomes.append(g)

    rows = []
    proxy_seconds = {name: 0.0 for name in PROXIES}
    for i, g in enumerate(genomes):
        row = {"genome": g, "config": space.config(g)}
        for name, fn in PROXIES.items():
            scores = []
            for (seed, b), v in zip(pairs, views):
                torch.manual_seed(seed)
                model = space.build(g, defaults)
                t = time.time()
                scores.append(float(fn(model, b, v)))
                proxy_seconds[name] += (time.time() - t) / len(pairs)
            row[name] = sum(scores) / len(scores)
            row[f"{name}_first"] = scores[0]  # one seed and batch, as before, to show what averaging buys
        accs = []
        t = time.time()
        for k in range(args.train_seeds):
            torch.manual_seed(args.seed + k)
            student = space.build(g, defaults)
            train(student, data, args.epochs, args.lr, args.seed + k, teacher=teacher.eval())
            accs.append(evaluate(student, data.loader("test", 256)))
        row["accuracy"] = sum(accs) / len(accs)
        row["accuracies"] = accs
        row["train_s"] = round(time.time() - t, 1)
        rows.append(row)
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / f"search_rank{args.tag}.partial.json").write_text(json.dumps(rows, indent=2) + "\n")
        print(f"{i + 1}/{len(genomes)} {row['config']}: {int(row['params']):,} params, distilled accuracy "
              f"{row['accuracy']:.4f}, diswot {row['diswot']:.4f} ({row['train_s']} s)")

    acc = [r["accuracy"] for r in rows]
    taus = {name: kendall([r[name] for r in rows], acc) for name in PROXIES}
    taus_first = {name: kendall([r[f"{name}_first"] for r in rows], acc) for name in PROXIES}
    # How far the ground truth itself is from noise-free: tau between two training seeds' accuracies.
    seed_tau = kendall([r["accuracies"][0] for r in rows], [r["accuracies"][1] for r in rows]) \
        if args.train_seeds > 1 else None

    # Search speed: the NSGA-II driver end to end (build, proxy, storage), DisWOT, no latency device.
    with tempfile.TemporaryDirectory() as tmp:
        res = search(space, PROXIES["diswot"], batch, teacher_view=view, defaults=defaults, size_mb=args.size_mb,
                     trials=args.search_trials, population=30, seed=args.seed,
                     storage=f"sqlite:///{tmp}/s.db", log=lambda s: None)
    speed = res.summary()
    per_proxy = {k: round(60 * len(rows) / v, 1) for k, v in proxy_seconds.items() if v > 0}

    out = {"benchmark": "search_rank", "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
           "setup": {**vars(args), "out": repo_path(args.out), "teacher_accuracy": t_acc, "space": space.to_dict(),
                     "torch_threads": 1, "distill": "0.7 KD (T=4) + 0.3 CE, AdamW, one-cycle, batch 64"},
           "kendall_tau": taus, "kendall_tau_one_seed": taus_first, "accuracy_tau_between_training_seeds": seed_tau,
           "proxy_candidates_per_minute": per_proxy,
           "search": {k: speed[k] for k in ("trials", "unique", "seconds", "scored_here", "candidates_per_minute")},
           "rows": rows, "seconds": round(time.time() - t_all, 1)}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"search_rank{args.tag}.json").write_text(json.dumps(out, indent=2) + "\n")
    noise = f", {args.label_noise:.0%} of training labels random" if args.label_noise else ""
    md = [f"# Proxy ranking vs distilled accuracy (digits {args.image_size}x{args.image_size}{noise})", "",
          f"{len(rows)} candidates of the teacher's ResNet space, each {args.min_mb}..{args.size_mb} MB, distilled for "
          f"{args.epochs} epochs (same budget; accuracy averaged over {args.train_seeds} training seed(s)); teacher "
          f"accuracy {t_acc:.4f}. Distilled accuracy spans {min(acc):.4f}..{max(acc):.4f}. Each proxy is averaged "
          f"over {args.proxy_seeds} (init seed, batch of 64) pairs."
          + (f" Kendall tau between two training seeds' accuracies (the ground truth's own noise): {seed_tau:+.3f}."
             if seed_tau is not None else ""), "",
          f"| proxy | Kendall tau vs distilled accuracy ({args.proxy_seeds} seeds averaged) | one seed and batch | "
          "candidates/min (proxy alone, 1 thread) |", "|---|---|---|---|"]
    for name in PROXIES:
        md.append(f"| {name} | {taus[name]:+.3f} | {taus_first[name]:+.3f} | {per_proxy.get(name, 'n/a')} |")
    md += ["", f"NSGA-II search with DisWOT (build + proxy + SQLite study): {speed['scored_here']} candidates "
               f"scored in {speed['seconds']} s = **{speed['candidates_per_minute']} candidates/min** "
               f"({speed['trials']} trials, {speed['unique']} unique).", "",
           "| # | config | params | accuracy | diswot | naswot | synflow |", "|---|---|---|---|---|---|---|"]
    for i, r in enumerate(sorted(rows, key=lambda r: -r["accuracy"])):
        md.append(f"| {i + 1} | {r['config']} | {int(r['params']):,} | {r['accuracy']:.4f} | {r['diswot']:.4f} | "
                  f"{r['naswot']:.1f} | {r['synflow']:.3g} |")
    (args.out / f"search_rank{args.tag}.md").write_text("\n".join(md) + "\n")
    (args.out / f"search_rank{args.tag}.partial.json").unlink(missing_ok=True)
    print("\n".join(md))


if __name__ == "__main__":
    main()
