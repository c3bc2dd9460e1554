"""The sections that make the student from the teacher instead of naming it: search, and pruning (layers,
width, channels)."""
from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, model_validator

from .sections import StudentSpec, _Section


class SearchSpec(_Section):
    """Student search (compressor/search/): when set, the searched student replaces `student`."""

    proxy: str = Field("diswot", description="zero-cost proxy (compressor.search.PROXIES): diswot, naswot, synflow, "
                       "params, flops; for task: embedding diswot takes its relation form and synflow is refused")
    trials: int = Field(200, ge=1, description="candidates scored (NSGA-II) or built (family teacher: a larger space is "
                        "cut to this many, per depth and channel cut those dropping the units of least output loss)")
    population: int = Field(50, ge=2, description="NSGA-II population size")
    family: Literal["cnn", "mlp", "transformer", "hf-encoder", "teacher"] | None = Field(
        None, description="default: detected from the teacher; teacher: the teacher's own sub-networks (drop residual "
        "units, cut channels), each starting from the teacher's weights and ranked by short distillations")
    channels: list[float] = Field([0.0, 0.25, 0.5, 0.625, 0.75], description="family teacher: the fractions of "
                                  "FLOPs the channel pruning may remove")
    max_flops: float | None = Field(None, gt=0, le=1, description="family teacher: a budget, the fraction of the "
                                    "teacher's FLOPs a candidate may keep")
    max_latency: float | None = Field(None, gt=0, le=1, description="family teacher: a budget, the fraction of the "
                                      "teacher's batch-1 latency a candidate may take on each target (measured side "
                                      "by side, so it holds on any host)")
    as_fast_as: StudentSpec | Literal["prune"] | None = Field(
        None, description="family teacher: a budget, no slower at batch 1 than this model (a student you would "
        "otherwise pick: {model, config}; its weights do not matter) on each target, measured in the same round "
        "robin as the teacher and the candidates, so one noisy spell cannot move the budget against them. prune: "
        "the teacher cut as the recipe's prune section says; where that cut is a genome of the space, it is a "
        "candidate too, within the budget by definition and carried into the final few, so the search returns it "
        "unless another candidate distils better")
    rungs: list[float] = Field([1.5, 4.5, 13.5], description="family teacher: epochs of short distillation (over "
                               "rung_samples training samples) at each rung of successive halving; the last rung "
                               "decides (benchmarks/results/search_rank.md: a longer one ranks closer to full "
                               "distillation)")
    rung_samples: int = Field(512, ge=16, description="family teacher: training samples a rung distils on")
    eta: int = Field(3, ge=2, description="family teacher: after each rung the best 1/eta go on")
    final: int = Field(3, ge=0, description="family teacher: the best this many of the last rung are each distilled "
                       "for the recipe's distill epochs over the whole training split, and the best of them on the "
                       "validation split is the student (0: the last rung decides)")
    per_depth: bool = Field(True, description="family teacher: the best candidate of each depth (units kept) also goes "
                            "on through every rung and into the final few: a short rung ranks how a candidate starts, "
                            "and a deeper, narrower sub-network starts slower than a shallow, wide one of the same cost")
    builder: str | None = Field(None, description="student builder (a built-in name or 'module:function'); default: the family's")
    space: dict[str, list[Any]] = Field(default_factory=dict, description="gene -> choices; overrides the detected space")
    latency: Literal["predict", "measure"] = Field("predict", description="predict from a per-device model, or measure each")
    calibration: int = Field(6, ge=3, description="candidates measured per device to fit the latency model")
    predictor: str | None = Field(None, description="latency: predict: a predictor file written by `compress "
                                  "calibrate` (predictors/<device>-<space>.json) for one of the targets; the search "
                                  "predicts that target's latency with it instead of fitting its own on `calibration` "
                                  "candidates")
    batch_size: int = Field(64, ge=2, description="samples the proxies score on")
    proxy_seeds: int = Field(1, ge=1, description="average the proxy over this many (initialisation, batch) "
                             "pairs: slower by as much, less noisy (4 is a good value for diswot)")
    storage: str | None = Field(None, description="Optuna storage URL (default: SQLite in the run directory)")
    study: str | None = Field(None, description="study name (default: <recipe name>-search)")
    seed_pruned: bool | PruneSpec | None = Field(
        None, description="enqueue the teacher pruned (LAPTOP-Diff) as a candidate, so it competes on the Pareto "
        "front and, when chosen, becomes the student with the teacher's weights. A prune spec ({by, remove}) "
        "says how to prune it; true uses the recipe's prune section; default: seed when there is a prune section")

    @model_validator(mode="after")
    def _predictor(self):
        if self.predictor and self.latency == "measure":
            raise ValueError("predictor goes with latency: predict (this section has latency: measure)")
        if self.as_fast_as is not None and self.family != "teacher":
            raise ValueError("as_fast_as goes with family: teacher (the search over the teacher's own sub-networks)")
        return self


class WidthSpec(_Section):
    """Width pruning after the layers (compressor/width.py): FFN neurons and attention heads cut out of the
    teacher's weights, chosen by their linearised output loss under a FLOPs budget (or a measured latency one)."""

    remove: float = Field(gt=0, lt=1, description="the fraction of the (layer-pruned) model's FLOPs to remove "
                                                  "(cost: latency: of its milliseconds on prune.device)")
    ffn: bool = Field(True, description="cut neurons between a Linear and the next (Transformer FFNs, MLPs)")
    heads: bool = Field(True, description="cut attention heads (Hugging Face's, Llama-style q/k/v, fused qkv: "
                                                "compressor/groups.py)")
    hidden: float = Field(0.0, ge=0, lt=1, description="first cut this fraction of the residual stream's channels "
                          "(the hidden size: embeddings, LayerNorms and every Linear reading or writing it; "
                          "Minitron's embedding-channel pruning); its FLOPs count toward remove. A sentence "
                          "encoder's embedding narrows with it")
    multiple: int = Field(16, ge=1, description="kept FFN widths (and the stream's) are multiples of this (GEMM kernels prefer it)")
    projections: int = Field(4, ge=1, description="random output projections per calibration batch")
    cost: Literal["flops", "latency"] = Field(
        "flops", description="what remove counts: flops; or latency, milliseconds measured on prune.device (default: "
        "the recipe's first target) at the profile's sequence length, each FFN pair and attention cut to its least "
        "beside the uncut model: a head whose softmax and reshapes cost more than its FLOPs say goes first")


class ChannelsSpec(_Section):
    """Structural pruning of any model (compressor/structural/, torch-pruning's DepGraph): channels,
    neurons and attention heads, with every coupled slice (residual adds, depthwise convolutions,
    BatchNorm, attention) cut together, under a FLOPs or params budget."""

    remove: float = Field(gt=0, lt=1, description="the fraction of the (layer-pruned) model's FLOPs or params to remove")
    by: Literal["flops", "params"] = Field("flops", description="what the budget counts")
    importance: Literal["output-loss", "taylor", "magnitude"] = Field(
        "output-loss", description="output-loss: the output loss against the teacher (second-order, Fisher by "
        "random output projections) per FLOP; taylor: first-order Taylor of the labelled cross-entropy; "
        "magnitude: L2 weight norm (torch-pruning's default)")
    heads: bool = Field(True, description="remove whole attention heads where the layout is known (Hugging Face attention)")
    multiple: int | None = Field(8, ge=1, description="kept widths are multiples of this (GEMM kernels prefer it); null: any")
    keep_stem: bool = Field(False, description="keep the input stem's outputs (in most models the residual stream's width); "
                      "false: the budget is met both with them cut and kept, and the lower output loss wins")
    projections: int = Field(4, ge=1, description="output-loss: random output projections per calibration batch")


class PruneSpec(_Section):
    """One-shot layer pruning of the teacher (compressor/prune.py), then optionally width pruning
    (compressor/width.py) and structural pruning of any model (compressor/structural/); the pruned
    teacher becomes the student."""

    by: Literal["params", "flops", "units", "latency"] = Field("params", description="what the budget counts")
    remove: float = Field(0, ge=0, description="params/flops/latency: the fraction of the teacher's to remove "
                                               "(0.3 = 30%); units: how many blocks/layers to remove; 0: no layers, "
                                               "only width or channels")
    width: WidthSpec | None = Field(None, description="also narrow the layers that stay")
    channels: ChannelsSpec | None = Field(None, description="also prune channels, neurons and heads of any model "
                                                             "(torch-pruning's dependency graph)")
    ignore: list[str] = Field(default_factory=list, description="module paths that pruning leaves as they are "
                                                                 "(the classifier head is always kept)")
    calibration_batches: int = Field(4, ge=1, description="training batches the output-loss criterion averages over")
    device: str | None = Field(None, description="by: latency or width.cost: latency: the device profile whose "
                                                 "latency counts (default: the recipe's first target)")
    latency: Literal["measure", "predict"] = Field(
        "measure", description="by: latency: measure the teacher without each unit on the device, or predict "
        "it with the device's latency predictor (`compress calibrate DEVICE`)")
    predictor: str | None = Field(None, description="latency: predict: the predictor JSON written by "
                                                    "`compress calibrate` (predictors/<device>-<space>.json)")

    @model_validator(mode="after")
    def _amount(self):
        if self.remove == 0 and self.width is None and self.channels is None:
            raise ValueError("remove: 0 prunes nothing; give prune.channels or prune.width, or a remove above 0")
        if self.by == "units" and self.remove != int(self.remove):
            raise ValueError("with by: units, remove is a whole number of units")
        if self.by != "units" and self.remove >= 1:
            raise ValueError(f"with by: {self.by}, remove is a fraction below 1 (0.3 removes 30%)")
        # Only values that differ from the defaults: a resolved recipe (a bundle's recipe.yaml, or one
        # with --set overrides) spells out latency: measure, and must load again.
        timed = self.width is not None and self.width.cost == "latency"
        if self.by != "latency" and (self.predictor or self.latency != "measure" or (self.device and not timed)):
            raise ValueError(f"device, latency and predictor go with by: latency (this section has by: {self.by}); "
                             "device also with width.cost: latency")
        if timed and self.latency == "predict":
            raise ValueError("width.cost: latency measures on a device; latency: predict covers whole layers only")
        if timed and self.width.hidden:
            raise ValueError("width.cost: latency with width.hidden: the stream's channels have no measured cost; "
                             "drop one of them")
        if self.latency == "predict" and not self.predictor:
            raise ValueError("latency: predict needs predictor: the JSON file `compress calibrate DEVICE` wrote")
        return self
