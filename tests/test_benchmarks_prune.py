"""benchmarks/quickstart_prune.py's summary (the benchmark itself takes minutes; only its markdown runs here)."""
import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _bench():
    spec = importlib.util.spec_from_file_location("quickstart_prune", ROOT / "benchmarks" / "quickstart_prune.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_markdown_has_the_three_students_side_by_side():
    row = {"accuracy": 0.99, "params": 326634, "mflops": 134.8, "distill_seconds": 10.0, "run_seconds": 20.0}
    r = {"remove": 0.5, "epochs": 3, "trials": 60, "proxies": ["diswot", "params"], "losses": "kd + ce",
         "teacher": {"accuracy": 0.997, "params": 696042, "flops": 210e6}, "removed": ["stages.1.1", "stages.2.1"],
         "search": {"size_mb_budget": 1.3, "diswot": {"candidates_per_minute": 100.0},
                    "params": {"candidates_per_minute": 900.0}},
         "students": {"pruned": row, "searched_diswot": {**row, "accuracy": 0.95, "config": {"widths": [8], "depths": [1]}},
                      "searched_params": {**row, "accuracy": 0.96, "config": {"widths": [8], "depths": [2]}},
                      "random_init": {**row, "accuracy": 0.8, "config": {"widths": [32, 64, 128], "depths": [2, 1, 1]}}},
         "seeded_search": {"proxy": "diswot", "pruned_teacher_chosen": False, "on_pareto_front": True,
                           "rank_by_proxy_among_feasible": 7, "feasible": 50, "chosen_config": {}},
         "threads": 2, "load_before": [1.0, 1, 1], "load_after": [2.0, 1, 1]}
    md = _bench().markdown(r)
    table = [l for l in md.splitlines() if l.startswith("| ")]
    assert len(table) == 5  # header + four students
    assert "| pruned teacher, distilled | 0.9900 | 326,634 | 134.8 |" in md
    assert "0.9500" in md and "0.9600" in md and "0.8000" in md and "depths [2, 1, 1]" in md
    assert "searched (params proxy)" in md and "params 900.0 candidates/min" in md
    assert "ranks 7 of 50" in md and "did not choose it" in md
