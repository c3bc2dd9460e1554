"""The teacher's own sub-networks as the search space, ranked by a ladder of rising fidelity.

A genome keeps or drops each residual unit the teacher has (compressor.prune.find_units: blocks whose
output has their input's shape) and removes a fraction of the remaining FLOPs by structural channel
pruning (compressor.structural: channels, neurons and heads by their output loss per FLOP). A candidate
is the teacher cut to its genome, with the teacher's weights: no family builder is needed, so any model
the pruning understands can be searched, and ``removed`` plus ``channels`` rebuild it
(compressor.prune.rebuild).

The ladder (``successive_halving``): every genome's cost first (params, FLOPs; latency where a callable
gives it), which filters those over a budget; the survivors then get a short distillation from the
teacher's cached outputs, scored on held-out data; after each rung the best ``1/eta`` go on to a rung
``eta`` times longer. Each rung's score and seconds stay in the candidate's record.
"""
from __future__ import annotations

import copy
import itertools
import time
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn

from ..errors import UserError
from ..flops import count_flops
from ..prune import build_pruned, find_units
from ..tasks import size, take
from .rung import Rung  # a rung of the ladder (its own module; the search stage and benchmarks reach it from here)

CHANNELS = (0.0, 0.25, 0.5, 0.625, 0.75)  # fractions of FLOPs the channel pruning removes


@dataclass
class SubnetSpace:
    units: list[str]  # the teacher's droppable units (module paths)
    channels: list[float] = field(default_factory=lambda: list(CHANNELS))
    family: str = "teacher"

    @property
    def genes(self) -> dict[str, list]:
        return {**{f"drop:{u}": [0, 1] for u in self.units}, "channels": list(self.channels)}

    @property
    def size(self) -> int:
        return (2 ** len(self.units) - (1 if self.units else 0)) * len(self.channels)

    def genomes(self) -> list[dict]:
        """Every genome, the teacher's own (nothing dropped, nothing cut) first. Some unit always stays
        (as in layer pruning: a model without any is no model)."""
        return [{**{f"drop:{u}": d for u, d in zip(self.units, drops)}, "channels": c}
                for drops in itertools.product((0, 1), repeat=len(self.units))
                if not (self.units and all(drops)) for c in self.channels]

    def removed(self, genome: dict) -> list[str]:
        return [u for u in self.units if genome.get(f"drop:{u}")]

    def to_dict(self) -> dict:
        return {"family": self.family, "genes": self.genes}


# The prune sections' settings that shape a candidate's cut (the rest, remove above all, the genome sets)
SHAPE = {"width": ("ffn", "heads", "multiple", "projections"),
         "channels": ("importance", "heads", "multiple", "keep_stem", "projections")}


def teacher_space(teacher: nn.Module, example, channels=CHANNELS, ignore=()) -> SubnetSpace:
    units = [u.path for u in find_units(teacher, example, ignore=ignore)]
    return SubnetSpace(units, sorted(set(float(c) for c in channels)))


class Builder:
    """Candidates of ``space``: the teacher without a genome's units (kept per set of units), then its
    channels cut. The channels' importance is estimated once per set of units, for every cut of it.

    ``cut`` says how: ``width`` (attention heads and FFN neurons, compressor.width: the hidden size stays)
    for a teacher with attention heads compressor.groups can cut, as the prune stage narrows an encoder;
    ``channels`` (structural pruning, compressor.structural) for every other model. ``width`` and
    ``channels``: the recipe's prune.width and prune.channels (dicts), whose settings that shape a cut (which
    elements may go, in what multiples, whether the stem stays) cut the candidates as the prune stage would cut
    the teacher; each cut's defaults where the recipe has no such section."""

    def __init__(self, space: SubnetSpace, teacher: nn.Module, batches, *, labels=None, ignore=(), example=None,
                 width: dict | None = None, channels: dict | None = None):
        from ..width import find_groups, splittable

        self.space, self.teacher, self.batches, self.labels, self.ignore = space, teacher, batches, labels, ignore
        self.options = {k: {o: v for o, v in (d or {}).items() if o in SHAPE[k]}
                        for k, d in (("width", width), ("channels", channels))}
        # FLOPs are counted on one sample of ``example`` (the budget's: a text model's full length, which the
        # calibration batches, cut to their longest sentence, may not have)
        self.example = take(example if example is not None else batches[0], 1)
        # heads as prune.width finds them: an nn.MultiheadAttention split into Linears first
        probe = splittable(teacher)[0]
        self.cut = "width" if find_groups(probe, batches[0], ffn=False) else "channels"
        # why, where it is not plain: FFN pairs but no head cut exactly (BEiT, DeBERTa, MPNet, ConvBERT) go by channels
        self.why = ("FFN pairs, but no attention heads that can be cut exactly: channels, the hidden size included"
                    if self.cut == "channels" and find_groups(probe, batches[0], heads=False) else "")
        self._flops: dict[tuple, int] = {}
        self._layers: dict[tuple, tuple[nn.Module, dict]] = {}

    @property
    def cuts(self) -> str:
        """What a genome's ``channels`` cuts, in words (the search's log lines)."""
        return "heads and FFN neurons" if self.cut == "width" else "channels"

    def layers(self, genome: dict) -> tuple[nn.Module, dict]:
        """(the teacher without the genome's units, its gradient cache), kept for the genome's other cuts."""
        key = tuple(self.space.removed(genome))
        if key not in self._layers:
            self._layers[key] = (build_pruned(self.teacher, list(key)).eval(), {})
        return self._layers[key]

    def layers_flops(self, genome: dict) -> int:
        """FLOPs per sample of the teacher without the genome's units, before its channels are cut. Only the count
        is kept per set of units (a large teacher's copies for every set would not fit in memory)."""
        key = tuple(self.space.removed(genome))
        if key not in self._flops:
            m = self._layers[key][0] if key in self._layers else build_pruned(self.teacher, list(key)).eval()
            self._flops[key] = count_flops(m, self.example)
        return self._flops[key]

    def flops_estimate(self, genome: dict) -> float:
        """FLOPs per sample before building: an upper bound, since a cut takes the nearest step at or under its
        fraction. Most land within a few percent; a model of few, narrow layers can land far under (dict_cnn's 50%
        cut removes 64%: ``run`` warns when the chosen one does)."""
        return self.layers_flops(genome) * (1 - genome["channels"])

    def __call__(self, genome: dict):
        """(candidate, its plan (``self.cut``'s) or None)."""
        from ..structural import prune_channels

        student, cache = self.layers(genome)
        if not genome["channels"]:
            return copy.deepcopy(student).eval(), None
        if self.cut == "width":
            from ..width import find_groups, prune_width, score_groups, splittable

            opts = {"projections": 4, **self.options["width"]}
            kinds = {k: v for k, v in opts.items() if k in ("ffn", "heads")}
            # The cut that wins is the cut that ships: heads and neurons scored on every calibration batch and as many
            # projections as the prune stage's (once per set of units, in ``cache``), as the channel cut below.
            if "groups" not in cache:
                probe = splittable(student, kinds.get("heads", True))[0]  # the model prune_width scores
                found = find_groups(probe, self.batches[0], **kinds)
                cache["groups"] = score_groups(probe, found, self.batches, projections=opts["projections"]) \
                    if found else []
            if not cache["groups"]:  # every layer with heads or an FFN dropped (MobileViT without its transformers)
                raise UserError("no attention head or FFN pair is left to cut in this sub-network")
            student, plan, _ = prune_width(student, self.batches, genome["channels"], groups=cache["groups"],
                                           log=lambda s: None, **opts)
            return student.eval(), plan
        # The cut that wins is the cut that ships: the channels' importance from every calibration batch and
        # four projections, as the prune stage's (two of each cut padded_cnn to 0.80 after distillation, against
        # 0.855 at the prune stage's fidelity; the importance is computed once per set of units, in ``cache``).
        student, plan, _ = prune_channels(student, self.batches, genome["channels"], by="flops",
                                          labels=self.labels, ignore=self.ignore, gradient_cache=cache,
                                          tolerance=0.02, compare_stem=False, log=lambda s: None,  # the rungs rank
                                          **{"projections": 4, **self.options["channels"]})
        return student.eval(), plan


def build(space: SubnetSpace, teacher: nn.Module, genome: dict, batches, *, labels=None, ignore=(),
          width: dict | None = None, channels: dict | None = None):
    """(candidate, plan or None): the teacher without the genome's units, then its channels cut (Builder)."""
    return Builder(space, teacher, batches, labels=labels, ignore=ignore, width=width, channels=channels)(genome)


def most_promising(genomes: list[dict], space: SubnetSpace, unit_loss: dict[str, float], n: int,
                   seed: int = 0) -> list[dict]:
    """``n`` of ``genomes`` for a space too large to build whole: within each group of genomes that drop as
    many units and cut the same fraction of channels (alike in cost), the ones whose dropped units have the
    least summed output loss (``unit_loss``: each unit's loss when removed alone, compressor.prune.score_units;
    layer pruning's criterion, which adds up across units), taken a rank at a time across the groups so every
    depth and width is tried. The last rank, where it does not fit whole, is a seeded sample of its groups."""
    groups: dict[tuple, list[dict]] = {}
    for g in genomes:
        groups.setdefault((len(space.removed(g)), g["channels"]), []).append(g)
    for members in groups.values():
        members.sort(key=lambda g: sum(unit_loss[u] for u in space.removed(g)))
    out: list[dict] = []
    gen = torch.Generator().manual_seed(seed)
    for rank in itertools.count():
        row = [m[rank] for m in groups.values() if rank < len(m)]
        if not row or len(out) >= n:
            break
        if len(out) + len(row) > n:
            row = [row[i] for i in sorted(torch.randperm(len(row), generator=gen)[:n - len(out)].tolist())]
        out.extend(row)
    return out


# ------------------------------------------------------------------------------ the ladder

@dataclass
class Trial:
    genome: dict
    model: nn.Module | None = None
    plan: dict | None = None
    cost: dict = field(default_factory=dict)  # params, flops, latency_ms {device: ms}
    feasible: bool = True
    why: str = ""  # the budget it breaks
    rungs: list[dict] = field(default_factory=list)  # {"epochs", "score", "seconds"} per rung reached
    key: str = ""  # the built candidate's content hash (compressor.measure.model_key), for the Journal
    trained: nn.Module | None = None  # the model its last rung trained (successive_halving's ``keep_trained``)
    start: dict = field(default_factory=dict)  # {"score", "loss"} of the cut before any rung trained it

    @property
    def score(self) -> float | None:
        return self.rungs[-1]["score"] if self.rungs else None

    def to_dict(self) -> dict:
        return {"genome": self.genome, "cost": self.cost, "feasible": self.feasible, "why": self.why,
                "untrained": self.start.get("score"), "rungs": self.rungs, "rung": len(self.rungs), "score": self.score}


def best_of(ranked: list[Trial], n: int, stratum: Callable[[Trial], object] | None = None) -> list[Trial]:
    """The first ``n`` of ``ranked`` (best first) and, with ``stratum``, the best of each stratum among the rest,
    in ranked order (a stratum of None is none: such trials go on by rank alone)."""
    chosen = set(map(id, ranked[:n]))
    if stratum is not None:
        seen = {stratum(t) for t in ranked[:n]} | {None}
        for t in ranked[n:]:
            if stratum(t) not in seen:
                seen.add(stratum(t))
                chosen.add(id(t))
    return [t for t in ranked if id(t) in chosen]


def successive_halving(trials: list[Trial], rung: Rung, epochs: list[float], *, eta: int = 3, keep: int = 1,
                       seed: int = 0, log: Callable[[str], None] = print,
                       scored: Callable[[Trial], None] | None = None, first: int = 0,
                       stratum: Callable[[Trial], object] | None = None, keep_trained: bool = False) -> list[Trial]:
    """Short distillations of the feasible ``trials``: all at ``epochs[0]``, the best ``1/eta`` of them at
    ``epochs[1]``, and so on (never fewer than ``keep``). Returns the trials of the last rung, best first.
    Each rung trains from the teacher's weights again (not from the previous rung's), so scores within a rung
    compare like with like. A trial that already has a rung's score (restored by a Journal) is not trained
    again; ``scored`` is called after each new score. ``first``: how many rungs the trials went through
    before these (a ladder continued with another Rung: the final distillations). ``stratum``: the best trial of
    each stratum (the search's: the sub-network's depth) goes on as well as the best ``1/eta``. ``keep_trained``:
    each trial of the last rung keeps the model that rung trained (``Trial.trained``)."""
    alive = [t for t in trials if t.feasible]
    if not alive:
        return []
    for j, ep in enumerate(epochs):
        k = first + j
        t0, reused = time.time(), 0
        for t in alive:
            if len(t.rungs) > k:
                reused += 1
                continue
            s0 = time.time()
            trained = rung.train(t.model, ep, seed=seed)
            got = rung.evaluate(trained)
            if keep_trained and j + 1 == len(epochs):
                t.trained = trained
            t.rungs.append({"epochs": ep, "samples": size(rung.x), "score": got["score"], "loss": round(got["loss"], 6),
                            "seconds": round(time.time() - s0, 3)})
            if scored is not None:
                scored(t)
        # ties of the score go to the lower held-out loss, then to fewer FLOPs (a journal from before losses
        # were kept has none)
        alive.sort(key=lambda t: (-t.rungs[k]["score"], t.rungs[k].get("loss", 0.0), t.cost["flops"]))
        log(f"search: rung {k + 1} ({ep:g} epochs of {size(rung.x)} samples): {len(alive)} candidates in "
            f"{time.time() - t0:.1f} s{f' ({reused} scores from the interrupted run)' if reused else ''}; "
            f"best {alive[0].rungs[k]['score']:.4f}")
        if j + 1 < len(epochs):
            alive = best_of(alive, max(keep, -(-len(alive) // eta)), stratum)
    return alive


# How far below the best untrained finalist the best trained one may score before the search warns: a sample of 120
# held-out sentences is 0.0083, and short distillations of a good cut wobble by about as much.
HARM = 0.01


def training_harms(final: list[Trial], rung: Rung, log: Callable[[str], None] = print) -> bool:
    """The last rung's trials (``final``, best first) scored as cut, untrained, by that rung (``Trial.start``); a
    warning, and True, where the best of them beats the best trained one by over ``HARM``: the learning rate ruins
    the cut teacher, and the ladder ranked the candidates by how little training harmed them (hf_mobilenet: a cut
    scoring 0.872 untrained was 0.728 after 3 epochs at lr 3e-3, 0.956 at 1e-3). The first rung alone says little:
    a few steps from the teacher's weights often dip (a ViT: 0.84 untrained, 0.39 after rung 1, 0.93 at the end)."""
    for t in final:
        if not t.start:
            t.start = rung.evaluate(copy.deepcopy(t.model))  # a copy: evaluate re-estimates batch-norm statistics
    if not final:
        return False
    before, after = max(t.start["score"] for t in final), final[0].score
    if after < before - HARM:
        log(f"search: warning: distillation lowered the held-out score: the best finalist {before:.4f} untrained, "
            f"{after:.4f} trained; learning rate {rung.lr:g} (distill.lr) may be too high to fine-tune the cut "
            "teacher: try a lower one")
        return True
    return False


def costs(model: nn.Module, example, latency: Callable[[nn.Module], dict] | None = None) -> dict:
    out = {"params": sum(p.numel() for p in model.parameters()), "flops": count_flops(model, take(example, 1))}
    if latency is not None:
        out["latency_ms"] = latency(model)
    return out


def mflops(n: float) -> str:
    """FLOPs in MFLOPs to three significant figures (a small model's 202,585 against 144,704 read 0.2 > 0.1)."""
    return f"{n / 1e6:.3g} MFLOPs"


def check_budget(cost: dict, *, max_flops: float | None = None, max_params: int | None = None,
                 latency_ms: dict | None = None) -> str:
    """'' when ``cost`` meets every budget, else the first one it breaks."""
    if max_flops is not None and cost["flops"] > max_flops:
        return f"{mflops(cost['flops'])} > {mflops(max_flops)}"
    if max_params is not None and cost["params"] > max_params:
        return f"{cost['params']:,} params > {max_params:,}"
    for dev, limit in (latency_ms or {}).items():
        ms = cost.get("latency_ms", {}).get(dev)
        if ms is not None and ms > limit:
            return f"{dev} {ms:.3f} ms > {limit:.3f}"
    return ""
