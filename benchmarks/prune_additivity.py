"""LAPTOP-Diff's premise on a recipe's teacher: the rank correlation (Spearman) between the summed
single-unit output losses and the measured loss of random sets of units removed together.

    python benchmarks/prune_additivity.py [--recipe quickstart] [--sets 40] [--batches 4]
"""
from __future__ import annotations



def main(argv=None) -> None:
    """python benchmarks/prune_additivity.py [--recipe quickstart] [--sets 40] [--batches 4]: the rank
    correlation between summed single-unit losses and measured set losses on a recipe's teacher."""
    import argparse
    import json

    from compressor.context import load_inputs
    from compressor.additivity import additivity
    from compressor.prune import calibration_batches
    from compressor.recipe import load_recipe

    ap = argparse.ArgumentParser(prog="benchmarks/prune_additivity.py")
    ap.add_argument("--recipe", default="quickstart")
    ap.add_argument("--sets", type=int, default=40)
    ap.add_argument("--batches", type=int, default=4)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    recipe = load_recipe(args.recipe)
    data, teacher, _ = load_inputs(recipe)
    batches = calibration_batches(data, recipe.data.batch_size, args.batches)
    r = additivity(teacher, batches, n_sets=args.sets, seed=args.seed)
    print(json.dumps({k: r[k] for k in ("spearman", "sets")} | {"units": [(u["path"], u["loss"]) for u in r["units"]]}))


if __name__ == "__main__":
    main()
