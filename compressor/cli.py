"""The `compress` command. Heavy libraries are imported inside commands, so --help answers at once."""
from __future__ import annotations

import json
import sys

import click

DEBUG = False


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--debug", is_flag=True, help="Show tracebacks for errors.")
def cli(debug: bool):
    """Compress a trained PyTorch model into a measured, deployable bundle."""
    global DEBUG
    DEBUG = DEBUG or debug


@cli.command()
@click.argument("recipe", required=False)
@click.option("--out", "out_dir", type=click.Path(), help="Bundle directory (default: runs/<recipe name>).")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help="Override a recipe value, e.g. distill.epochs=3.")
@click.option("--resume", is_flag=True, help="Continue an unfinished run from its last finished stage.")
@click.option("--force", is_flag=True, help="Replace an existing bundle or unfinished run.")
def run(recipe, out_dir, overrides, resume, force):
    """Run RECIPE (a YAML file or built-in name; default: the quickstart) end to end."""
    from .pipeline import run as run_pipeline

    bundle = run_pipeline(recipe, out_dir, overrides=overrides, resume=resume, force=force)
    if bundle is not None:  # None: a follower rank of a multi-process distillation; rank 0 writes it
        click.echo(str(bundle))


@cli.command()
@click.argument("recipe", required=False)
@click.option("--out", "out_dir", type=click.Path(), help="Directory for the study and results (default: runs/<recipe name>-search).")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help="Override a recipe value, e.g. search.trials=100.")
@click.option("--storage", metavar="URL", help="Optuna storage of the study (sqlite:///path.db, postgresql://...); "
              "default: the recipe's search.storage, else SQLite in --out.")
@click.option("--study", metavar="NAME", help="Study name (default: the recipe's search.study, else <recipe name>-search).")
@click.option("--worker", is_flag=True, help="Be one of several processes adding trials to one shared study: "
              "each trial is stored as it ends, with a sampler seed of this worker's own; every worker stops "
              "when the study holds search.trials complete trials.")
def search(recipe, out_dir, overrides, storage, study, worker):
    """Search for a student of RECIPE's teacher under its budgets (rerun to resume the study)."""
    from pathlib import Path

    import yaml

    from .recipe import SearchSpec, load_recipe
    from .stages.search import search_command

    r = load_recipe(recipe, overrides)
    given = {k: v for k, v in (("storage", storage), ("study", study)) if v}
    if given:  # also for a recipe with no search section (the defaults, then these)
        r = r.model_copy(update={"search": (r.search or SearchSpec()).model_copy(update=given)})
    out = Path(out_dir or Path("runs") / f"{r.name}-search")
    best = search_command(r, out, log=lambda s: click.echo(s, err=True), worker=worker)
    click.echo(yaml.safe_dump({"student": best["student"]}, sort_keys=False).rstrip())
    click.echo(f"# {best['metrics']['params']:,} params, score {best['metrics']['score']:.4g}; "
               f"front and candidates in {out}")


@cli.command()
@click.argument("bundle", type=click.Path())
def verify(bundle):
    """Check a bundle's schema and the sha256 of every file in it."""
    from .bundle import verify as verify_bundle

    m = verify_bundle(bundle)
    click.echo(f"ok: {bundle}: {len(m['files'])} files match the manifest (schema {m['schema']})")


@cli.command()
@click.argument("bundle", type=click.Path())
@click.option("--json", "as_json", is_flag=True, help="Print the manifest as JSON.")
def inspect(bundle, as_json):
    """Show what a bundle holds and how each file came to be."""
    from .bundle import read_manifest
    from .report import markdown

    m = read_manifest(bundle)
    click.echo(json.dumps(m, indent=2) if as_json else markdown(m))


@cli.command()
def devices():
    """List the device profiles and whether each can be measured from here."""
    from devices import builtin_profiles, get_device, load_profile

    rows = []
    for name in builtin_profiles():
        p = load_profile(name)
        try:
            why = get_device(p).why_unavailable()
        except Exception as e:  # a runtime without a backend yet
            why = str(e)
        rows.append((p.name, p.kind, p.runtime, p.connection, "reachable" if why is None else f"unavailable: {why}"))
    width = [max(len(r[i]) for r in rows + [("name", "kind", "runtime", "connection", "")]) for i in range(4)]
    click.echo("  ".join(h.ljust(w) for h, w in zip(("name", "kind", "runtime", "connection"), width)) + "  status")
    for r in rows:
        click.echo("  ".join(c.ljust(w) for c, w in zip(r, width)) + "  " + r[4])


@cli.command()
@click.argument("model", type=click.Path())
@click.option("--device", "device_name", default="local-cpu", show_default=True, help="Device profile name or YAML path.")
@click.option("--batch", type=int, multiple=True, default=[1], show_default=True)
@click.option("--warmup", type=int, default=20, show_default=True)
@click.option("--runs", type=int, default=200, show_default=True)
@click.option("--max-seconds", type=float, default=20.0, show_default=True)
@click.option("--precision", default="fp32", show_default=True)
@click.option("--dim", multiple=True, metavar="NAME=N", help="Size of a symbolic input dimension, e.g. sequence=128.")
@click.option("--json", "as_json", is_flag=True, help="Print the measurements as JSON.")
def profile(model, device_name, batch, warmup, runs, max_seconds, precision, dim, as_json):
    """Measure the latency of any ONNX file MODEL on a device."""
    from pathlib import Path

    from devices import DeviceError, get_device
    from exporters.onnx import describe

    if not Path(model).is_file():
        raise DeviceError(f"{model} does not exist")
    describe(model)  # a file that is not ONNX fails here with a clear message
    dims = {}
    for d in dim:
        k, sep, v = d.partition("=")
        if not sep or not v.isdigit():
            raise click.BadParameter(f"{d!r}: expected NAME=N", param_hint="--dim")
        dims[k] = int(v)
    device = get_device(device_name)
    out = [device.measure(model, batch=b, warmup=warmup, runs=runs, max_seconds=max_seconds,
                          precision=precision, dims=dims) for b in batch]
    if as_json:
        click.echo(json.dumps([m.to_dict() for m in out], indent=2))
        return
    click.echo(f"{'batch':>5} {'p50 ms':>9} {'p90 ms':>9} {'p99 ms':>9} {'mean ms':>9} {'cv':>6} {'runs':>5}  device")
    for m in out:
        click.echo(f"{m.batch:>5} {m.p50_ms:>9.3f} {m.p90_ms:>9.3f} {m.p99_ms:>9.3f} {m.mean_ms:>9.3f} {m.cv:>6.2f} "
                   f"{m.runs:>5}  {m.device} ({m.runtime} {m.runtime_version}, {m.threads} threads, {m.label})")
        for n in m.notes:
            click.echo(f"      note: {n}")


@cli.command()
@click.argument("device_name", metavar="DEVICE")
@click.option("--space", "spaces", multiple=True, type=click.Choice(["digits", "transformer"]), default=["digits"],
              show_default=True, help="Candidate space to sample (repeat for several).")
@click.option("--samples", type=click.IntRange(6), default=80, show_default=True, help="Candidates measured per space.")
@click.option("--holdout", type=click.FloatRange(0.05, 0.5), default=0.25, show_default=True,
              help="Share of the candidates kept out of the fit to report its accuracy.")
@click.option("--rounds", type=click.IntRange(1), default=3, show_default=True,
              help="Measure every candidate this many times, round robin; the best round counts.")
@click.option("--runs", type=click.IntRange(5), default=3000, show_default=True, help="Timed runs per measurement (at most).")
@click.option("--max-seconds", type=float, default=0.25, show_default=True,
              help="Time window per measurement: long enough to catch undisturbed runs on a busy machine.")
@click.option("--statistic", type=click.Choice(["min", "p50"]), default="min", show_default=True,
              help="What the predictor learns: the fastest run (repeatable on a shared machine) or the median.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--out", "out_dir", type=click.Path(), default="predictors", show_default=True,
              help="Directory for <device>-<space>.json.")
@click.option("--refit", is_flag=True,
              help="Measure nothing: refit on the measurements an earlier calibration saved in --out.")
@click.option("--count-disturbed", is_flag=True,
              help="Keep candidates measured only while other processes held cores the run needed (the "
                   "behaviour before rounds were marked), and measure none again.")
@click.option("--json", "as_json", is_flag=True, help="Print the accuracy report as JSON.")
def calibrate(device_name, spaces, samples, holdout, rounds, runs, max_seconds, statistic, seed, out_dir, refit,
              count_disturbed, as_json):
    """Measure sampled candidates on DEVICE, fit its latency predictor, report it on held-out candidates."""
    from .calibrate import calibrate as run_calibration

    report = run_calibration(device_name, tuple(spaces), n=samples, holdout=holdout, seed=seed, rounds=rounds,
                             statistic=statistic, out_dir=out_dir, refit=refit, count_disturbed=count_disturbed,
                             log=lambda s: click.echo(s, err=True), runs=runs,
                             max_seconds=max_seconds)
    if as_json:
        click.echo(json.dumps(report, indent=2))
        return
    click.echo(f"{'space':<12} {'held-out':>8} {'within 10%':>10} {'MAPE':>7}  {'5-fold 10%':>10} {'MAPE':>7}  "
               f"{'method':<10}  predictor (estimates)")
    for space, r in report.items():
        click.echo(f"{space:<12} {r['n']:>8} {r['within_10pct']:>10.0%} {r['mape']:>7.1%}  {r['cv_within_10pct']:>10.0%} "
                   f"{r['cv_mape']:>7.1%}  {r['method']:<10}  {r['path']}")
        if r["rounds_within_10pct"] is not None:
            click.echo(f"{'':<12} measurement noise floor: {r['rounds_within_10pct']:.0%} of candidates' rounds agree "
                       f"within 10% ({r['statistic']}); best of odd vs even rounds: {r['halves_within_10pct']:.0%}")


def main(argv=None) -> int:
    """Entry point: user errors are one line on stderr and exit code 2; --debug shows tracebacks."""
    global DEBUG
    args = list(sys.argv[1:] if argv is None else argv)
    DEBUG = "--debug" in args
    try:
        rv = cli.main(args=args, prog_name="compress", standalone_mode=False)
        return rv if isinstance(rv, int) else 0
    except click.exceptions.Abort:
        click.echo("interrupted", err=True)
        return 130
    except click.ClickException as e:
        e.show()
        return e.exit_code
    except KeyboardInterrupt:
        click.echo("interrupted", err=True)
        return 130
    except Exception as e:
        from devices import DeviceError
        from exporters import ExportError

        from .errors import UserError

        if DEBUG:
            raise
        if isinstance(e, (UserError, DeviceError, ExportError)):  # the user's to fix, in any subsystem
            click.echo(f"error: {e}", err=True)
            return 2
        click.echo(f"internal error: {type(e).__name__}: {e} (rerun with --debug for the traceback)", err=True)
        return 1


if __name__ == "__main__":
    sys.exit(main())
