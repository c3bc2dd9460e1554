"""Multi-objective student search with Optuna's NSGA-II sampler.

Objectives: the proxy score up, latency on each target device down (size down when there is no
device). Constraints: size_mb and latency_ms from the recipe's budgets, through Optuna's
constraints_func (a value <= 0 is met), so infeasible candidates lose every comparison with feasible
ones. The study lives in an Optuna storage: SQLite in the run directory by default, so an interrupted
search resumes where it stopped; a PostgreSQL URL lets several workers share one study.
"""
from __future__ import annotations

import contextlib
import sys
import time
import warnings
from typing import Callable

import torch
from torch import nn

from ..errors import UserError
from .latency import candidate_features, fit_or_reuse, measure_model, record
from ..models import MLP, ResNet, count_flops, count_params
from ..tasks import take
from .proxies import conv_linear_flops, cost
# Candidates, the result and its front live in results.py; imported from here by the search stage and tests.
from .results import Candidate, SearchResult, _objective_value, _optuna, candidates, pareto, tightest  # noqa: F401
from .spaces import Space, genome_key


def search(space: Space, proxy: Callable, batch, *, teacher_view=None, defaults: dict | None = None,
           devices: dict | None = None, size_mb: float | None = None, latency_ms: dict | None = None,
           trials: int = 200, population: int = 50, seed: int = 0, storage: str | None = None,
           study_name: str = "search", latency: str = "predict", calibration: int = 6,
           measure_kw: dict | None = None, predictors: dict | None = None,
           log: Callable[[str], None] = print, shared: bool | None = None,
           sampler_seed: int | None = None, seeds: list[dict] | None = None,
           progress_bar: bool | None = None, more_batches: list | None = None, example=None) -> SearchResult:
    """Run (or resume) the NSGA-II study and return every candidate, the Pareto front and the best
    candidate meeting every budget (None when none does: the caller says which budget is tightest).

    ``devices`` maps a target name to a Device; ``latency`` "predict" fits the device's
    devices.predictor.LatencyPredictor on ``calibration`` measured candidates (or uses the one given in
    ``predictors``, e.g. loaded from `compress calibrate`), "measure" measures every candidate (slow, exact).
    ``shared`` drives the stored study directly so other workers see each trial at once (default: for
    any storage but SQLite); ``sampler_seed`` (default ``seed``) must differ between workers, or they
    would all propose the same genomes.
    ``seeds``: ``{"genome": ..., "origin": ...}`` candidates evaluated first (Optuna's enqueue_trial),
    so a known architecture (the pruned teacher) competes on the front; a resumed study skips those it
    already has. ``progress_bar``: a rich bar with the best so far; default on when stderr is a terminal.
    ``more_batches``: further ``(batch, teacher_view)`` pairs; the score is then the mean of the proxy over
    ``batch`` at init seed ``seed`` and pair k at init seed ``seed + k`` (a one-batch, one-init proxy is
    noisy: averaging 4 took DisWOT's Kendall tau from +0.13 to +0.32 in benchmarks/search_rank.py).
    ``example``: one input as the devices run it, for FLOPs and latency (token inputs at the profiled
    sequence length, compressor.tasks.at_length); default: the batch's first sample. Inputs may be a
    tensor or a dict of tensors (input_ids, attention_mask).
    """
    optuna = _optuna()
    devices, latency_ms = dict(devices or {}), dict(latency_ms or {})
    measure_kw = dict(measure_kw or {})
    example = take(batch[0], 1) if example is None else example
    objectives = ["score"] + ([f"latency_ms[{d}]" for d in devices] or ["size_mb"])
    directions = ["maximize"] + ["minimize"] * (len(objectives) - 1)
    storage = storage or "sqlite:///search.db"
    shared = not storage.startswith("sqlite:") if shared is None else shared

    def constraints(trial) -> list[float]:
        return trial.user_attrs["candidate"]["constraints"]

    # Optuna 5 moved constraints from the sampler's constraints_func to Trial.set_constraint; use
    # whichever this Optuna has (the same numbers: a value <= 0 is met).
    per_trial = hasattr(optuna.trial.Trial, "set_constraint")
    sampler = optuna.samplers.NSGAIISampler(population_size=population, seed=seed if sampler_seed is None else sampler_seed,
                                            constraints_func=None if per_trial else constraints)
    for attempt in range(4):
        try:
            stored = optuna.create_study(storage=_storage(optuna, storage, shared), study_name=study_name,
                                         directions=directions, sampler=sampler, load_if_exists=True)
            break
        except Exception as e:
            # Workers started together on a new database race to create its tables (3 of 12 starts
            # failed here, "table studies already exists"): the loser opens it again once they exist.
            if not shared or attempt == 3:
                raise UserError(f"search: cannot open the study {study_name!r} in {_redact(storage)}: "
                                f"{type(e).__name__}: {e}") from None
            time.sleep(0.5 * (attempt + 1))
    if [d.name.lower() for d in stored.directions] != directions:
        raise UserError(f"search: study {study_name!r} in {storage} has other objectives; use another study name")
    # A local SQLite study is driven in memory and written back once per generation: each trial is a
    # dozen storage operations, which cost more than scoring the candidate (0.16 s against 0.012 s in
    # memory here). A resumed search loses at most the unwritten generation. A shared storage
    # (PostgreSQL, or SQLite with several workers) is used directly, so workers see each other's trials
    # at once.
    if shared:
        study = stored
    else:
        study = optuna.create_study(directions=directions, sampler=sampler)
        study.add_trials([t for t in stored.trials if t.state.name == "COMPLETE"])
    written = len(study.trials)

    def write_back(*_):
        nonlocal written
        if shared:
            return
        trials = study.trials
        new = [t for t in trials[written:] if t.state.name == "COMPLETE"]
        if new:
            stored.add_trials(new)
        written = len(trials)

    def build(genome: dict) -> nn.Module:
        torch.manual_seed(seed)  # the same genome gets the same initial weights in any process
        return space.build(genome, defaults)

    # Latency predictors: fitted once per study and kept in it, so a resumed search (or another worker)
    # predicts with the same one instead of refitting on new, noisy measurements.
    models = {} if latency == "measure" else fit_or_reuse(
        devices, stored, space, build, example, given=predictors, defaults=defaults, seed=seed,
        calibration=calibration, log=log, **measure_kw)

    cache: dict[str, dict] = {}
    scored = 0

    def evaluate(genome: dict) -> dict:
        nonlocal scored
        model = build(genome)  # the recipe's seed, not the sampler's: every worker scores a genome alike
        if isinstance(model, (ResNet, MLP)):  # all their arithmetic is in Conv2d/Linear: hooks suffice
            n, f = count_params(model), conv_linear_flops(model, example)
        elif space.family == "hf-encoder":  # counted as the pipeline counts it (one sample, profiled length)
            n, f = count_params(model), count_flops(model, example)
        else:
            n, f = cost(lambda: space.skeleton(genome, defaults), example)
        torch.manual_seed(seed)
        score = float(proxy(model, batch, teacher_view))
        if more_batches:
            scores = [score]
            for k, (b, view) in enumerate(more_batches, 1):
                torch.manual_seed(seed + k)  # another initialisation of the same genome
                m = space.build(genome, defaults)
                torch.manual_seed(seed + k)
                scores.append(float(proxy(m, b, view)))
            score = sum(scores) / len(scores)
        lat = {}
        feats = candidate_features(model, example) if models else None
        for name, dev in devices.items():
            lat[name] = measure_model(model, example, dev, **measure_kw) if latency == "measure" \
                else models[name].predict_ms(feats)
        scored += 1
        return {"params": n, "flops": f, "size_mb": 4 * n / 1e6, "score": score, "latency_ms": lat,
                "latency_label": "measured" if latency == "measure" else "predicted"}

    def objective(trial):
        genome = {g: trial.suggest_categorical(g, choices) for g, choices in space.genes.items()}
        key = genome_key(genome)
        if key not in cache and shared:  # another worker may have scored it already: reuse, don't redo
            _sync(study, cache)
            if key not in cache:  # or be scoring it now: wait for its figures rather than score it twice
                _await_other(optuna, study, trial, space, key, cache)
        if key not in cache:
            cache[key] = evaluate(genome)
        m = cache[key]
        cons = []
        if size_mb is not None:
            cons.append(m["size_mb"] - size_mb)
        for d, limit in latency_ms.items():
            cons.append(m["latency_ms"][d] - limit)
        # One attribute per trial: each is a write (a transaction) to the storage.
        rec = {"genome": genome, "key": key, "metrics": m, "constraints": cons}
        if trial.user_attrs.get("origin"):
            rec["origin"] = trial.user_attrs["origin"]
        trial.set_user_attr("candidate", rec)
        if per_trial:
            for name, v in zip(["size_mb"] * (size_mb is not None) + [f"latency_ms[{d}]" for d in latency_ms], cons):
                trial.set_constraint(name, v)
        if not torch.isfinite(torch.tensor(m["score"])):
            m = {**m, "score": -1e30}  # a proxy that blew up ranks last rather than stopping the search
        return (m["score"], *(m["latency_ms"][d] for d in devices)) if devices else (m["score"], m["size_mb"])

    if shared:
        with _quiet(optuna):
            optuna.storages.fail_stale_trials(stored)  # a killed worker's trials: FAIL, and queued again
    done = len([t for t in study.trials if t.state.name == "COMPLETE"])
    todo = max(0, trials - done)
    have = {t.user_attrs.get("candidate", {}).get("key") for t in study.trials}
    for s in seeds or []:
        genome = s["genome"]
        bad = [g for g in space.genes if genome.get(g) not in space.genes[g]] + [g for g in genome if g not in space.genes]
        if bad:
            raise UserError(f"search: the seed {s.get('origin', genome)} is not in the space (genes {', '.join(bad)})")
        if todo and genome_key(genome) not in have:
            study.enqueue_trial(genome, user_attrs={"origin": s.get("origin", "seed")})
            log(f"search: {s.get('origin', 'a seed')} enqueued as a candidate ({genome})")
    if done:
        log(f"search: resuming study {study_name!r} ({done} trials done, {todo} to go)")
    t0 = time.time()
    every = max(1, todo // 10)

    added = 0
    bar = _progress_bar(progress_bar, todo, "search" if study_name == "search" else f"search {study_name}")
    best_seen = [None]  # (score, genome) of the best trial meeting every budget, for the bar

    def progress(study, trial):
        nonlocal added
        added += trial.state.name == "COMPLETE"
        i = trial.number + 1
        if bar is not None:
            rec = trial.user_attrs.get("candidate", {})
            if trial.values and all(c <= 0 for c in rec.get("constraints", [1])) and \
                    (best_seen[0] is None or trial.values[0] > best_seen[0][0]):
                best_seen[0] = (trial.values[0], rec.get("genome"))
            b = best_seen[0]
            bar.update(advance=1, best="none yet" if b is None else
                       f"{b[0]:.4g} (" + " ".join(f"{k}={v}" for k, v in (b[1] or {}).items()) + ")")
        if (i - done) % population == 0:
            write_back()
        if (i - done) % every == 0 or i == trials:
            feas = [t for t in study.trials if t.state.name == "COMPLETE"
                    and all(c <= 0 for c in t.user_attrs.get("candidate", {}).get("constraints", [1]))]
            best = max(feas, key=lambda t: t.values[0], default=None)
            rate = 60 * scored / max(time.time() - t0, 1e-9)
            shown = "none yet" if best is None else f"{best.values[0]:.4g} {best.user_attrs['candidate']['genome']}"
            log(f"search {i}/{trials}: {len(feas)} meet the budgets, best score {shown} ({rate:.0f} candidates/min)")

    # One intra-op thread: a small candidate gains little from two, and on a shared machine idle-waiting
    # OpenMP threads made each proxy ~5x slower. Parallelism comes from workers sharing the study.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        if todo:
            # Several workers share `trials`: each stops once the study holds that many complete trials
            # (n_trials alone would let every worker add `todo`).
            stop = [optuna.study.MaxTrialsCallback(trials, states=(optuna.trial.TrialState.COMPLETE,))] * shared
            study.optimize(objective, n_trials=todo, callbacks=[progress, *stop], gc_after_trial=False)
    finally:
        torch.set_num_threads(threads)
        if bar is not None:
            bar.stop()
        write_back()  # also on Ctrl-C: the finished trials are kept for --resume
    seconds = time.time() - t0

    cands = candidates(study.trials, space.family, size_mb, latency_ms)
    front = pareto(cands, objectives)
    best = front[0] if front else None
    return SearchResult(best, front, cands, {k: record(v) for k, v in models.items()}, objectives,
                        _redact(storage), study_name, seconds, scored, added)


def _sync(study, cache: dict) -> None:
    """Every candidate the shared study's finished trials hold, into ``cache`` (key -> metrics)."""
    import optuna

    for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,)):
        rec = t.user_attrs.get("candidate")
        if rec:
            cache.setdefault(rec["key"], rec["metrics"])


def _await_other(optuna, study, trial, space, key: str, cache: dict, poll_s: float = 0.05) -> None:
    """When another worker's RUNNING trial with a lower number has the same genome, wait until it ends
    and take its figures. The lower number scores and the higher waits, so two workers that draw one
    genome at the same instant never both score it, and never wait on each other. A trial that fails,
    or whose worker dies (its heartbeat stops; this loop marks it FAIL after GRACE_S), leaves ``key`` out
    of ``cache``: the caller then scores it."""
    def same(t):
        return t.number < trial.number and genome_key({g: t.params.get(g) for g in space.genes}) == key

    running = (optuna.trial.TrialState.RUNNING,)
    if not any(same(t) for t in study.get_trials(deepcopy=False, states=running)):
        return
    t0 = last_check = time.time()
    while any(same(t) for t in study.get_trials(deepcopy=False, states=running)):
        time.sleep(poll_s)
        if time.time() - last_check > GRACE_S:
            last_check = time.time()
            with _quiet(optuna):
                optuna.storages.fail_stale_trials(study)
        if time.time() - t0 > 30 * 60:  # a scoring this long is not one to wait for
            return
    _sync(study, cache)


# A shared study's trials send a heartbeat; one silent for GRACE_S (its worker was killed) is marked
# FAIL by the next worker to start a trial and queued again with the same genome, so it is neither
# lost nor left RUNNING for ever.
HEARTBEAT_S, GRACE_S = 2, 10


class _Bar:
    """A rich progress bar on stderr: trials done, time left, and the best score meeting every budget."""

    def __init__(self, total: int, title: str, console):
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
        from rich.table import Column

        # Log lines printed while the bar is live go above it (rich redirects stdout and stderr). The
        # counts come first and keep their width; a long genome is cut at the terminal's edge.
        self.progress = Progress(TextColumn("[bold]{task.description}"), BarColumn(bar_width=20), MofNCompleteColumn(),
                                 TimeRemainingColumn(),
                                 TextColumn("best {task.fields[best]}", table_column=Column(no_wrap=True, overflow="ellipsis")),
                                 console=console, transient=False, redirect_stdout=True, redirect_stderr=True)
        self.task = self.progress.add_task(title, total=total, best="none yet")
        self.progress.start()

    def update(self, advance: int, best: str) -> None:
        self.progress.update(self.task, advance=advance, best=best)

    def stop(self) -> None:
        self.progress.stop()


def _console():
    from rich.console import Console

    return Console(stderr=True)


def _progress_bar(enabled: bool | None, total: int, title: str) -> _Bar | None:
    """A bar when asked, or by default when stderr is a terminal: logs and tests get none."""
    if enabled is None:
        enabled = sys.stderr.isatty()
    if not enabled or total <= 0:
        return None
    try:
        return _Bar(total, title, _console())
    except ImportError:  # rich is optional: the log lines say the same, less often
        return None


def _storage(optuna, url: str, shared: bool = False):
    """SQLite without fsync per commit: a trial is several commits, and on a busy disk those fsyncs were
    most of the search time (25 ms each). A killed process still leaves a consistent database (WAL);
    only a power cut could lose the last trials, which a resumed search simply redoes."""
    kw = {}
    if shared:
        with _quiet(optuna):
            retry = getattr(optuna.storages, "RetryHeartbeatStaleTrialCallback", None)
            kw = {"heartbeat_interval": HEARTBEAT_S, "grace_period": GRACE_S}
            if retry is not None:  # Optuna >= 4.9 renamed the callback and its argument
                kw["heartbeat_stale_trial_callback"] = retry(max_retry=2)
            else:
                kw["failed_trial_callback"] = optuna.storages.RetryFailedTrialCallback(max_retry=2)
    if not url.startswith("sqlite:"):
        if not kw:
            return url
        with _quiet(optuna):
            return optuna.storages.RDBStorage(url, **kw)
    from sqlalchemy import event

    # Several workers on one SQLite file wait for each other's write lock instead of failing after 5 s.
    with _quiet(optuna):
        storage = optuna.storages.RDBStorage(url, engine_kwargs={"connect_args": {"timeout": 60}}, **kw)

    @event.listens_for(storage.engine, "connect")
    def _pragmas(conn, record):
        cur = conn.cursor()
        cur.execute("PRAGMA journal_mode=WAL")
        cur.execute("PRAGMA synchronous=OFF")
        cur.close()

    storage.engine.dispose()  # connections opened before the listener get the pragmas on reconnect
    return storage


@contextlib.contextmanager
def _quiet(optuna):
    """Heartbeats and their retry callback are 'experimental' in Optuna (since 2.8/2.9): not the user's concern."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        yield


def _redact(url: str) -> str:
    """A storage URL without its password, for the manifest."""
    if "://" in url and "@" in url:
        scheme, rest = url.split("://", 1)
        cred, host = rest.rsplit("@", 1)
        return f"{scheme}://{cred.split(':', 1)[0]}:***@{host}"
    return url
