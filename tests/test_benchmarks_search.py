"""The search benchmarks' result pages (benchmarks/search_subnets.py, benchmarks/rank_subnets.py) from
made-up results: what they say must follow the numbers."""
import importlib
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent


def _bench(name):
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        return importlib.import_module(name)
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))


def _machine():
    return {"date": "2026-12-05T00:00:00Z", "cpu": "a CPU", "cores": 2, "cpu_flags": {"avx2": True, "amx_bf16": False}}


def test_search_subnets_page_averages_the_seeds():
    b = _bench("search_subnets")
    row = {"recipe": "r", "student": {}, "params": 10, "flops": 2e6, "b32_p50_ms": 1.0, "search_seconds": None,
           "stage_seconds": 3.0, "search_budget": None}
    rows = [{**row, "seed": 0, "setting": "full", "accuracy": 0.95, "b1_p50_ms": 0.10},
            {**row, "seed": 0, "setting": "searched", "accuracy": 0.97, "b1_p50_ms": 0.08,
             "search_budget": {"max_flops": None, "max_latency": 0.2}},
            {**row, "seed": 1, "setting": "full", "accuracy": 0.96, "b1_p50_ms": 0.10},
            {**row, "seed": 1, "setting": "searched", "accuracy": 0.95, "b1_p50_ms": 0.08}]
    summary = {"mean_accuracy": {"full": 0.955, "searched": 0.96}, "mean_b1_p50_ms": {"full": 0.1, "searched": 0.08},
               "accuracy_gain": 0.005, "b1_ratio_searched_over_full": 0.8, "dominates": True,
               "per_seed": [{"seed": 0, "dominates": True}, {"seed": 1, "dominates": False}]}
    md = b.markdown({"machine": _machine(), "model": "vit", "rounds": 3, "seeds": [0, 1], "rows": rows,
                     "summary": summary})
    assert "a ViT of our own" in md and "20% of its batch-1 latency" in md
    assert "searched 0.9600, hand-picked 0.9550 (+0.0050)" in md and "in 1 of 2 seeds" in md
    assert md.count("| 1 | ") == 2


def test_rank_page_and_rung_scores():
    r = _bench("rank_subnets")
    logits = torch.tensor([[2.0, 0.0], [0.0, 2.0], [2.0, 0.0]])
    s = r.rung_scores(logits, torch.tensor([0, 1, 1]), logits)
    assert abs(s["acc"] - 2 / 3) < 1e-6 and s["kl"] == 0.0 and s["nll"] < 0
    rows = [{"genome": {"channels": 0.5}, "removed": ["a"], "params": 100 + i, "flops": 1e6 - i, "accuracy": a,
             "accuracies": [a, a], "nll": 1 - a, "nlls": [1 - a, 1 - a], "diswot": a,
             **{f"rung_{k}": {"acc": a, "nll": a, "kl": a} for k in (1, 2)}} for i, a in enumerate((0.9, 0.95))]
    got = r.summarize(rows, [1.5, 4.5], 2)
    assert got["kendall_tau"]["rung_4.5ep"] == 1.0 and got["kendall_tau"]["flops"] == -1.0
    assert got["summary"]["deciding_rung"] == "rung_4.5ep" and got["accuracy_tau_between_training_seeds"] == 1.0
    res = {"machine": _machine(), "recipe": "quickstart-search", "rows": rows,
           "setup": {"candidates": 2, "max_flops": 0.15, "teacher_flops": 2e8, "space_genomes": 45, "units": ["a"],
                     "channels": [0.5], "test_samples": 359, "distill_epochs": 15, "train_seeds": 2,
                     "rungs": [1.5, 4.5], "rung_samples": 512, "val_samples": 180},
           "kendall_tau": {"params": 1.0, "rung_4.5ep": 1.0},
           "kendall_tau_vs_heldout_nll": {"params": 1.0, "rung_4.5ep": 0.5},
           "accuracy_tau_between_training_seeds": 1.0, "nll_tau_between_training_seeds": 1.0,
           "summary": {"deciding_rung": "rung_4.5ep"}}
    md = r.markdown(res)
    assert "| rung_4.5ep | +1.000 | +0.500 |" in md and "(two training seeds against each other)" in md
    assert "| 1.5 ep | 4.5 ep |" in md
    assert "spans 0.9000..0.9500" in md and md.index("0.9500 (0.9500") < md.index("0.9000 (0.9000")
