"""`compress calibrate DEVICE`: measure a sample of candidates of a search space on a device, fit its
latency predictor (devices/predictor.py), and report the predictor on held-out candidates.

The features are computed here, on the PyTorch model, because devices/ never imports compressor:
FLOPs (total and per operator family), parameters, activation elements, and counts per layer type.
"""
from __future__ import annotations

import json
import random
import time
from pathlib import Path

import torch
from torch import nn

# The sampled model families (calibrate_spaces.py), imported from here by the CLI and the tests.
from .calibrate_spaces import (IMAGE, SEQ, SPACES, TinyTransformer, build_digits,  # noqa: F401
                               build_transformer, sample_digits, sample_transformer)

LANES = (8, 16)  # fp32 lanes of the vector units that conv FLOPs are rounded up to

# aten operator -> feature family for per-operator FLOPs
_FAMILIES = {"convolution": "conv", "mm": "matmul", "addmm": "matmul", "bmm": "matmul", "baddbmm": "matmul",
             "_scaled_dot_product_efficient_attention": "attention", "_scaled_dot_product_flash_attention": "attention",
             "_scaled_dot_product_cudnn_attention": "attention",
             "_scaled_dot_product_flash_attention_for_cpu": "attention"}


def features(model: nn.Module, example) -> dict:
    """The predictor's inputs for one model at batch 1. ``example``: a tensor or a dict of tensors
    (a text encoder's input_ids and attention_mask)."""
    from .flops import flop_counts
    from .tasks import take

    x = take(example, 1)
    n_in = sum(v.numel() for v in x.values()) if isinstance(x, dict) else x.numel()

    model = model.eval()
    act, counts, conv = [0], {}, {}

    def hook(mod, inp, out):
        if isinstance(out, torch.Tensor):
            act[0] += out.numel()
        if isinstance(mod, nn.Conv2d) and isinstance(out, torch.Tensor):
            # A CPU runs a 5x5 or a 4-channel convolution at a lower FLOP rate than a 3x3 with 64
            # channels: FLOPs split by kernel and by width let an additive model learn one rate each
            # (nn-Meter predicts per kernel configuration for the same reason).
            f = 2 * out.numel() * (mod.in_channels // mod.groups) * mod.kernel_size[0] * mod.kernel_size[1]
            width = min(mod.in_channels, mod.out_channels)
            bucket = "c8" if width <= 8 else "c32" if width <= 32 else "cwide"
            for key in (f"flops_conv_k{mod.kernel_size[0]}", f"flops_conv_{bucket}"):
                conv[key] = conv.get(key, 0) + f
            # Vector units work on whole registers: channels rounded up to 8 (AVX2, NEON x2) or 16
            # (AVX-512) fp32 lanes is the work the CPU really does.
            for lanes in LANES:
                up = lambda c: -(-c // lanes) * lanes  # noqa: E731
                conv[f"flops_conv_pad{lanes}"] = conv.get(f"flops_conv_pad{lanes}", 0) + f * (
                    up(mod.in_channels // mod.groups) * up(mod.out_channels)) // ((mod.in_channels // mod.groups) * mod.out_channels)

    leaves = [m for m in model.modules() if not list(m.children()) or isinstance(m, nn.MultiheadAttention)]
    handles = [m.register_forward_hook(hook) for m in leaves]
    for m in leaves:
        counts[f"n_{type(m).__name__}"] = counts.get(f"n_{type(m).__name__}", 0) + 1
    # The one FLOP counter (compressor/flops.py) turns attention's fused fast path off and counts CPU
    # attention's matmuls, as the exported ONNX graph runs them.
    try:
        total, per_op = flop_counts(model, x)
    finally:
        for h in handles:
            h.remove()
    fam = {}
    for op, n in per_op.items():
        name = op.split(".")[0]
        key = f"flops_{_FAMILIES.get(name, 'other')}"
        fam[key] = fam.get(key, 0) + int(n)
    return {"flops": total, "params": sum(p.numel() for p in model.parameters()),
            "activations": act[0], "layers": len(leaves), "input_elements": n_in, **fam, **conv,
            **counts}


# aten operators that only relabel memory: no kernel of their own in an inference runtime
_VIEWS = {"view", "_unsafe_view", "reshape", "t", "transpose", "unsqueeze", "squeeze", "select", "slice", "expand",
          "permute", "detach", "alias", "empty", "flatten", "split", "unbind", "_reshape_alias", "as_strided",
          "lift_fresh", "dropout"}
_ACTS = {"relu", "relu_", "gelu", "silu", "silu_", "sigmoid", "tanh", "hardtanh", "hardtanh_", "hardswish",
         "hardswish_", "leaky_relu", "leaky_relu_", "clamp", "clamp_min"}
_ELTWISE = {"add", "add_", "mul", "mul_", "sub", "sub_", "div", "div_"}
_POOLS = {"mean", "avg_pool2d", "max_pool2d", "max_pool2d_with_indices", "_adaptive_avg_pool2d", "adaptive_max_pool2d"}


def kernels(model: nn.Module, example) -> list[dict]:
    """The model as the list of kernels an inference runtime runs, in execution order (nn-Meter's
    kernel split): aten operators recorded at batch 1, with a convolution's BatchNorm and activation
    folded into it (every runtime fuses them: ONNX export folds BN, ONNX Runtime fuses Conv+ReLU), an
    activation after an elementwise add folded into the add, and views dropped. Plain dicts, so devices/
    can turn them into features without importing torch models."""
    # The same hook torch.utils.flop_counter.FlopCounterMode is built on: it sees every aten operator
    # (functional adds and ReLUs included, which module hooks miss) with its real shapes.
    from torch.utils._python_dispatch import TorchDispatchMode

    class Record(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            self.ops.append((func.__name__.split(".")[0], args, out))  # keeps tensors alive: ids stay unique
            return out

    from .tasks import call, take

    model = model.eval()
    fast = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)  # the exported graph has the plain operators
    try:
        with torch.no_grad(), Record() as rec:
            call(model, take(example, 1))
    finally:
        torch.backends.mha.set_fastpath_enabled(fast)
    out, producer = [], {}  # id(tensor) -> the kernel that wrote it

    def first(args):
        return next((a for a in args if isinstance(a, torch.Tensor)), None)

    for name, args, res in rec.ops:
        x = first(args)
        y = res[0] if isinstance(res, (tuple, list)) and res and isinstance(res[0], torch.Tensor) else res
        if name in _VIEWS or not isinstance(y, torch.Tensor):
            if isinstance(y, torch.Tensor) and x is not None and id(x) in producer:
                producer[id(y)] = producer[id(x)]
            continue
        k = producer.get(id(x)) if x is not None else None
        if name in ("native_batch_norm", "_native_batch_norm_legit_no_training", "batch_norm") and k is not None \
                and k["op"] == "conv" and not k["act"]:
            producer[id(y)] = k
            continue
        if name in _ACTS and k is not None and k["op"] in ("conv", "add", "linear") and not k["act"]:
            k["act"] = name.rstrip("_")
            producer[id(y)] = k
            continue
        if name == "convolution":
            w, stride, groups = args[1], args[3], args[8]
            k = {"op": "conv", "cin": int(x.shape[1]), "cout": int(w.shape[0]), "h": int(x.shape[2]),
                 "w": int(x.shape[3]) if x.dim() > 3 else 1, "k": int(w.shape[2]), "stride": int(stride[0]),
                 "groups": int(groups), "out": int(y.numel()), "act": "",
                 "flops": 2 * int(y.numel()) * int(w.shape[1]) * int(w[0, 0].numel())}
        elif name in ("addmm", "mm", "bmm", "baddbmm", "matmul"):
            a, b = (args[1], args[2]) if name in ("addmm", "baddbmm") else (args[0], args[1])
            batch = int(a.shape[0]) if a.dim() == 3 else 1
            m, kk, n = int(a.shape[-2]), int(a.shape[-1]), int(b.shape[-1])
            k = {"op": "linear", "m": m * batch, "k": kk, "n": n, "act": "", "out": int(y.numel()),
                 "flops": 2 * batch * m * kk * n}
        elif name.startswith("_scaled_dot_product") or name == "scaled_dot_product_attention":
            q, key = args[0], args[1]
            k = {"op": "attention", "heads": int(q.shape[1]), "seq": int(q.shape[2]), "kv": int(key.shape[2]),
                 "dim": int(q.shape[1] * q.shape[3]), "out": int(y.numel()),
                 "flops": 4 * int(q.shape[1] * q.shape[2] * key.shape[2] * q.shape[3])}
        elif name in _ELTWISE:
            k = {"op": "add" if isinstance(args[1], torch.Tensor) and args[1].numel() > 1 else "scale",
                 "out": int(y.numel()), "act": ""}
        elif name in _ACTS:
            k = {"op": "act", "out": int(y.numel()), "act": name.rstrip("_")}
        elif name in _POOLS:
            k = {"op": "pool", "in": int(x.numel()), "out": int(y.numel())}
        elif name in ("native_layer_norm", "native_batch_norm", "_native_batch_norm_legit_no_training", "batch_norm",
                      "native_group_norm"):
            k = {"op": "norm", "out": int(y.numel())}
        elif name in ("_softmax", "softmax", "_log_softmax"):
            k = {"op": "softmax", "out": int(y.numel())}
        else:
            k = {"op": "other", "name": name, "out": int(y.numel())}
        out.append(k)
        producer[id(y)] = k
    return out


SPARE_CORES = 0.25  # other processes may keep this many cores busy beyond those a run leaves free


def disturbed(other_cores, cpus, threads) -> bool:
    """Whether other processes took cores a ``threads``-thread run needed (``other_cores``: cores they
    kept busy during the window, from devices.bench_onnxruntime.contention; None: not known, e.g. an
    old measurements file or a board without /proc/stat, so not disturbed). On 2 cores a 2-thread run
    with one core taken runs at its 1-thread speed: such a round says nothing about 2 threads."""
    if other_cores is None or not cpus:
        return False
    need = min(threads or cpus, cpus)
    return other_cores > cpus - need + SPARE_CORES


def measure_space(space: str, device, n: int, *, seed: int = 0, rounds: int = 3, warmup: int = 10,
                  runs: int = 3000, max_seconds: float = 0.25, statistic: str = "min", log=print,
                  extra_rounds: int | None = None) -> list[dict]:
    """Sample ``n`` distinct genomes, export each to ONNX and measure each ``rounds`` times through one
    compressor.measure.Meter (round robin, so slow drifts of a shared machine spread over all
    candidates) and keep the lowest p50 (``statistic`` "p50") or the fastest single run ("min":
    interference from other processes only ever adds time, so on a shared or throttling machine the
    minimum is the most repeatable figure).

    Each measurement is a time window (``max_seconds``, ``runs`` only caps it), not a run count: 100 runs
    of a 0.05 ms model last 5 ms, and under load such a window often holds no undisturbed run. With
    0.25 s windows, consecutive rounds of a 1-thread calibration agreed within 10% for 93% of the
    candidates at load average 7 on 2 cores (45% with 100 runs).

    Every round records the cores other processes kept busy (``other_cores``); a round during which
    they took cores the run needed is marked ``disturbed``. Candidates left with no undisturbed round
    are measured again, round robin, up to ``extra_rounds`` more times (default: ``rounds``); any still
    without one are kept, marked, and left out of the fit (fit_and_report)."""
    from .measure import Meter

    sample, build = SPACES[space]
    rng, seen, points = random.Random(seed), set(), []
    while len(points) < n:
        g = sample(rng)
        key = repr(sorted(g.items()))
        if key in seen:
            continue
        seen.add(key)
        torch.manual_seed(0)
        model, example = build(g)
        # the kernel list travels in the features: the predictor expands it (devices.predictor.kernel_features)
        points.append({"genome": g, "features": {**features(model, example), "kernels": kernels(model, example)},
                       "model": model, "example": example})
    with Meter(device, warmup=warmup, runs=runs, max_seconds=max_seconds) as meter:
        for p in points:
            p["path"] = meter.export(p.pop("model"), p.pop("example"))
        t0 = time.time()
        threads = getattr(getattr(device, "profile", None), "threads", 0) or 0

        def measure(todo):
            for p in todo:
                m = meter.measure_file(p["path"], batch=1, fresh=True)  # every round a new window
                p.setdefault("p50_ms", []).append(m.p50_ms)
                p.setdefault("min_ms", []).append(m.min_ms)
                p.setdefault("cv", []).append(m.cv)
                other, cpus = m.extra.get("other_cores"), m.extra.get("cpus")
                p.setdefault("other_cores", []).append(other)
                p.setdefault("disturbed", []).append(disturbed(other, cpus, threads))

        for r in range(rounds):
            measure(points)
            bad = sum(p["disturbed"][-1] for p in points)
            log(f"{space}: round {r + 1}/{rounds} measured {len(points)} candidates ({time.time() - t0:.0f} s)"
                + (f"; {bad} while other processes held cores the run needed" if bad else ""))
        for r in range(rounds if extra_rounds is None else extra_rounds):
            todo = [p for p in points if all(p["disturbed"])]
            if not todo:
                break
            measure(todo)
            log(f"{space}: extra round {r + 1}: measured again the {len(todo)} candidates with no undisturbed "
                f"round ({time.time() - t0:.0f} s)")
    for p in points:
        del p["path"]
        p["rounds_ms"] = p.pop("p50_ms")
        p["latency_ms"] = _latency(p, statistic)
    return points


def _latency(p: dict, statistic: str) -> float:
    """The figure a candidate's predictor point gets: its best round. Disturbed rounds count too: where
    one is faster than the undisturbed ones (a small model, whose kernels ONNX Runtime's main thread ran
    itself instead of waking a worker on an idle core), it is a real run of the same session. What the
    minimum cannot undo is a candidate that never had the cores free, and _undisturbed leaves those out."""
    return min(p["rounds_ms"] if statistic == "p50" else p["min_ms"])


def _undisturbed(p: dict, count_disturbed: bool = False) -> bool:
    return count_disturbed or not p.get("disturbed") or not all(p["disturbed"])


def calibrate(device_name: str, spaces=("digits",), *, n: int = 80, holdout: float = 0.25, seed: int = 0,
              rounds: int = 3, statistic: str = "min", out_dir: str | Path = "predictors", refit: bool = False,
              count_disturbed: bool = False, log=print, **measure_kw) -> dict:
    """Measure, fit on the training share, report on the held-out share, then refit on everything and
    save ``<out_dir>/<device>-<space>.json``. Returns {space: report}. ``refit``: measure nothing, read
    the measurements an earlier calibration saved beside its predictor (a newer predictor, the same
    measurements and the same held-out split)."""
    from devices import get_device, load_profile

    from .errors import UserError

    profile = load_profile(device_name)
    device = get_device(profile)
    why = None if refit else device.why_unavailable()
    if why:
        from devices import DeviceError

        raise DeviceError(f"device {profile.name} is not available: {why}")
    out = {}
    for space in spaces:
        if space not in SPACES:
            raise UserError(f"unknown space {space!r} (known: {', '.join(SPACES)})")
        path = Path(out_dir) / f"{profile.name}-{space}.measurements.json"
        if refit:
            if not path.is_file():
                raise UserError(f"--refit: {path} does not exist: calibrate {profile.name} once without --refit")
            pts = json.loads(path.read_text())
            rounds = max(len(p["min_ms"]) for p in pts)
        else:
            pts = measure_space(space, device, n, seed=seed, rounds=rounds, statistic=statistic, log=log,
                                extra_rounds=0 if count_disturbed else None, **measure_kw)
        out[space] = fit_and_report(profile.name, space, pts, holdout=holdout, seed=seed, rounds=rounds,
                                    statistic=statistic, out_dir=out_dir, save_measurements=not refit,
                                    count_disturbed=count_disturbed,
                                    measure_kw=measure_kw, log=log)
    return out


def fit_and_report(device_name: str, space: str, pts: list[dict], *, holdout: float, seed: int, rounds: int,
                   statistic: str, out_dir: str | Path, save_measurements: bool = True, measure_kw=None,
                   count_disturbed: bool = False, log=print) -> dict:
    """Fit on a seeded share of ``pts`` and report on the rest, 5-fold over all, and the measurement's
    repeatability; save the predictor refitted on all points (and the measurements). Candidates whose
    every round was disturbed are left out unless ``count_disturbed`` (the behaviour before rounds
    were marked)."""
    from devices.predictor import LatencyPredictor, accuracy, cross_validate

    from .files import atomic_write

    for p in pts:
        p["latency_ms"] = _latency(p, statistic)
    # A candidate measured only while other processes held the cores it needed has no figure for this
    # device at this thread count (on 2 shared cores a 2-thread run then runs at 1-thread speed): it is
    # kept in the measurements file but neither fitted nor scored.
    all_pts, pts = pts, [p for p in pts if _undisturbed(p, count_disturbed)]
    dropped = len(all_pts) - len(pts)
    if dropped:
        log(f"{space}: {dropped} of {len(all_pts)} candidates were measured only while other processes held "
            "cores the run needed: left out of the fit and the report")
    if len(pts) < max(4, -(-len(all_pts) // 4)):  # 4: three to fit, one to hold out
        from .errors import UserError

        raise UserError(f"{space}: only {len(pts)} of {len(all_pts)} candidates were measured with the cores the run "
                        "needs free (other processes kept them busy): calibrate again on a quieter machine")
    rng = random.Random(seed + 1)
    idx = list(range(len(pts)))
    rng.shuffle(idx)
    k = max(1, round(len(pts) * holdout))
    test, train = [pts[i] for i in idx[:k]], [pts[i] for i in idx[k:]]
    pred = LatencyPredictor.fit(device_name, [(p["features"], p["latency_ms"]) for p in train], space=space)
    acc = accuracy(pred, [(p["features"], p["latency_ms"]) for p in test])
    final = LatencyPredictor.fit(device_name, [(p["features"], p["latency_ms"]) for p in pts], space=space)
    cv = cross_validate(final)
    final.meta.update(held_out={**acc, "train": len(train)}, cross_validation=cv, rounds=rounds, seed=seed,
                      undisturbed_round="not required" if count_disturbed else "required",
                      latency=f"{statistic}: " + ("lowest p50 over the rounds" if statistic == "p50" else "fastest run over the rounds") + ", batch 1",
                      measure=measure_kw or {})
    path = Path(out_dir) / f"{device_name}-{space}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, final.to_json().encode())
    ms = [p["latency_ms"] for p in pts]
    if save_measurements:
        atomic_write(path.with_suffix(".measurements.json"), json.dumps(all_pts, indent=1).encode())
    per_round = [p["rounds_ms"] if statistic == "p50" else p["min_ms"] for p in pts]
    rep = [abs(a - b) / min(a, b) for r in per_round for a, b in zip(r, r[1:])]
    # The fitted figure is the best of all rounds: its repeatability is nearer the best of the odd
    # rounds against the best of the even ones (split halves) than one round against the next.
    halves = [abs(min(r[0::2]) - min(r[1::2])) / min(r) for r in per_round if len(r) > 1]
    report = {**acc, "train": len(train), "path": str(path), "min_ms": min(ms), "max_ms": max(ms),
              "method": pred.method, "statistic": statistic, "cv_within_10pct": cv["within_10pct"],
              "cv_mape": cv["mape"],
              # the measurement's own noise floor: consecutive rounds within 10% of each other
              "rounds_within_10pct": sum(r <= 0.1 for r in rep) / len(rep) if rep else None,
              "halves_within_10pct": sum(h <= 0.1 for h in halves) / len(halves) if halves else None,
              # rounds during which other processes held cores the run needed (not counted), and
              # candidates that had no other round (left out)
              "disturbed_rounds": sum(sum(p.get("disturbed") or []) for p in all_pts),
              "rounds_measured": sum(len(p["min_ms"]) for p in all_pts), "disturbed_candidates": dropped,
              "count_disturbed": count_disturbed}
    log(f"{space}: {acc['within_10pct']:.0%} of {acc['n']} held-out candidates within 10% of measured, "
        f"MAPE {acc['mape']:.1%}; 5-fold over all {len(pts)}: {cv['within_10pct']:.0%}, MAPE {cv['mape']:.1%} "
        f"(latencies {min(ms):.3f}-{max(ms):.3f} ms); predictor saved to {path}")
    return report
