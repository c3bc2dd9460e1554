"""The recipe: a YAML job description parsed into pydantic models that reject unknown keys.

YAML is data: the only code it names is an explicit ``module:function`` reference, imported when used.
"""
from __future__ import annotations

import copy
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from .errors import UserError


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class TrainSpec(_Section):
    """Training from labels alone, used for a built-in teacher that is trained on first use and cached."""

    epochs: int = Field(10, ge=1)
    lr: float = Field(2e-3, gt=0)
    weight_decay: float = Field(5e-4, ge=0)
    batch_size: int = Field(64, ge=1, description="its own, so changing the distillation batch keeps the cached teacher")


class TeacherSpec(_Section):
    model: str = Field(description="a built-in name (compressor.models.MODELS) or 'module:function'")
    kwargs: dict[str, Any] = Field(default_factory=dict)
    checkpoint: str | None = Field(None, description="a state_dict file, loaded with weights_only=True")
    train: TrainSpec | None = Field(None, description="train on first use when no checkpoint is given")


class DataSpec(_Section):
    dataset: str = Field(description="a built-in name (compressor.data.DATASETS) or 'module:function'")
    kwargs: dict[str, Any] = Field(default_factory=dict)
    batch_size: int = Field(64, ge=1)
    val_fraction: float = Field(0.1, ge=0, lt=1)
    test_fraction: float = Field(0.2, gt=0, lt=1)
    workers: int = Field(0, ge=0)


class StudentSpec(_Section):
    model: str = Field(description="a built-in family (compressor.models.MODELS) or 'module:function'")
    config: dict[str, Any] = Field(default_factory=dict, description="the genome: builder keyword arguments")


class LossSpec(BaseModel):
    """One weighted loss term; keys besides name and weight are the loss's own parameters."""

    model_config = ConfigDict(extra="allow")
    name: str
    weight: float = Field(1.0, ge=0)

    @property
    def params(self) -> dict[str, Any]:
        return dict(self.model_extra or {})

    @model_validator(mode="after")
    def _known(self):
        from .distill import LOSSES, check_params

        if self.name not in LOSSES:
            raise ValueError(f"unknown loss {self.name!r}; known: {', '.join(sorted(LOSSES))}")
        check_params(self.name, self.params)
        return self


class TrainerSpec(_Section):
    """Passed to lightning's Trainer, so the same recipe runs on GPUs and across nodes."""

    accelerator: str = "cpu"
    devices: int | str | list[int] = 1
    strategy: str = "auto"
    num_nodes: int = Field(1, ge=1)
    precision: str = "32-true"
    deterministic: bool = False
    extra: dict[str, Any] = Field(default_factory=dict, description="any other Trainer keyword argument")


class DistillSpec(_Section):
    epochs: int = Field(10, ge=1)
    lr: float = Field(3e-3, gt=0)
    weight_decay: float = Field(1e-4, ge=0)
    optimizer: Literal["adamw", "sgd"] = "adamw"
    schedule: Literal["cosine", "constant"] = "cosine"
    losses: list[LossSpec] = Field(default_factory=lambda: [LossSpec(name="kd", weight=0.7, temperature=4.0),
                                                           LossSpec(name="ce", weight=0.3)])
    trainer: TrainerSpec = Field(default_factory=TrainerSpec)

    @field_validator("losses")
    @classmethod
    def _some(cls, v):
        if not v:
            raise ValueError("at least one loss term is needed")
        return v


class ParitySpec(_Section):
    atol: float = Field(1e-4, gt=0)
    rtol: float = Field(1e-3, ge=0)
    samples: int = Field(64, ge=1)


class ExportSpec(_Section):
    opset: int = Field(17, ge=11)
    dynamic_batch: bool = True
    parity: ParitySpec = Field(default_factory=ParitySpec)


class QuantizeSpec(_Section):
    """Quantization after (or as the end of) distillation. ``none`` ships only the fp32 student."""

    mode: Literal["qat-kd", "ptq-ort", "ptq-nncf", "ptq-dynamic", "none"] = Field(
        "none", description="qat-kd: NNCF fake-quant fine-tuned against the teacher (bits 8) or Polino's "
        "bucketed weights (bits < 8); ptq-ort: ONNX Runtime static QDQ; ptq-nncf: NNCF post-training; "
        "ptq-dynamic: ONNX Runtime dynamic int8 weights, per channel (no calibration; Transformers on CPUs)")
    bits: Literal[2, 3, 4, 8] = Field(8, description="8: int8 QDQ ONNX; 2-4: Polino bucketed weights (qat-kd only)")
    bucket: int = Field(256, ge=8, description="bucket size of Polino's uniform quantization (bits < 8)")
    zero_point: Literal["integer", "float"] = Field(
        "integer", description="bits < 8: integer: each bucket's offset is a whole number of steps (scale = "
        "range / (2^b - 1), zero point in 0..2^b - 1, range widened to hold 0), in QAT and in the file, so ONNX "
        "Runtime's MatMulNBits gets uint8 zero points and its fast prepacked kernel; float: Polino's exact "
        "offset (beta = the bucket's minimum), which MatMulNBits only takes as float zero points (slow path)")
    calibration: int = Field(256, ge=32, description="training samples used to calibrate activation ranges "
                             "(fewer than 32 give ranges that swing with the sample)")
    activations: Literal["auto", "uint8", "int8"] = Field(
        "auto", description="auto: int8 (symmetric) for GPU/NPU targets, uint8 on CPUs (faster in ONNX Runtime)")
    reduce_range: Literal["auto"] | bool = Field(
        "auto", description="int8 weights in 7 bits (ONNX Runtime's reduce_range, NNCF's overflow fix). auto: "
        "when a CPU target's int8 kernels saturate on full-range weights (x86 without VNNI; read from this "
        "host for a local target, from options.int8_saturates in a remote profile)")
    epochs: int = Field(3, ge=1, description="QAT fine-tuning epochs")
    lr: float = Field(5e-4, gt=0, description="QAT learning rate (a fraction of the distillation one)")
    keep_float: list[str] | None = Field(
        None, description="module paths kept in float; default: none for int8, first and last layer below 8 bits")
    allow_float: bool = Field(True, description="keep layers the quantizer cannot handle in float (with a warning)")
    fold_bn: bool = Field(True, description="fold BatchNorm into the preceding convolution before quantizing")
    parity_tol: float = Field(0.02, gt=0, description="max |ONNX - fake-quant PyTorch| as a fraction of the "
                              "largest |output|: integer kernels round differently from float fake quant")

    @model_validator(mode="after")
    def _bits_mode(self):
        if self.bits < 8 and self.mode != "qat-kd":
            raise ValueError(f"bits {self.bits} needs mode qat-kd (Polino's quantized distillation); "
                             "post-training quantization here is int8")
        return self


class ProfileSpec(_Section):
    batch_sizes: list[int] = Field(default_factory=lambda: [1])
    dims: dict[str, int] = Field(default_factory=dict, description="sizes of symbolic input axes besides the "
                                 "batch (sequence: 128); default: what the data states (its max_length)")
    warmup: int = Field(20, ge=0)
    runs: int = Field(200, ge=5)
    max_seconds: float = Field(20.0, gt=0)


class Budgets(_Section):
    size_mb: float | None = Field(None, gt=0)
    latency_ms: dict[str, float] = Field(default_factory=dict, description="device name -> p50 at batch 1")
    max_quality_drop: float | None = Field(None, ge=0, le=1, description="fraction of the teacher's metric")


class SearchSpec(_Section):
    """Student search (compressor/search/): when set, the searched student replaces `student`."""

    proxy: str = Field("diswot", description="zero-cost proxy (compressor.search.PROXIES): diswot, naswot, synflow, "
                       "params, flops; for task: embedding diswot takes its relation form and synflow is refused")
    trials: int = Field(200, ge=1)
    population: int = Field(50, ge=2, description="NSGA-II population size")
    family: Literal["cnn", "mlp", "transformer", "hf-encoder"] | None = Field(None, description="default: detected from the teacher")
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
        return self


class WidthSpec(_Section):
    """Width pruning after the layers (compressor/width.py): FFN neurons and attention heads cut out of the
    teacher's weights, chosen by their linearised output loss under a FLOPs budget."""

    remove: float = Field(gt=0, lt=1, description="the fraction of the (layer-pruned) model's FLOPs to remove")
    ffn: bool = Field(True, description="cut neurons between a Linear and the next (Transformer FFNs, MLPs)")
    heads: bool = Field(True, description="cut attention heads (modules with prune_heads: Hugging Face's)")
    multiple: int = Field(16, ge=1, description="kept FFN widths are multiples of this (GEMM kernels prefer it)")
    projections: int = Field(4, ge=1, description="random output projections per calibration batch")


class ChannelsSpec(_Section):
    """Structural pruning of any model (compressor/structural.py, torch-pruning's DepGraph): channels,
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
    keep_stem: bool = Field(False, description="keep the input stem's outputs (in most models the residual stream's width)")
    projections: int = Field(4, ge=1, description="output-loss: random output projections per calibration batch")


class PruneSpec(_Section):
    """One-shot layer pruning of the teacher (compressor/prune.py), then optionally width pruning
    (compressor/width.py) and structural pruning of any model (compressor/structural.py); the pruned
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
    device: str | None = Field(None, description="by: latency: the device profile whose latency counts "
                                                 "(default: the recipe's first target)")
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
        if self.by != "latency" and (self.device or self.predictor or self.latency != "measure"):
            raise ValueError(f"device, latency and predictor go with by: latency (this section has by: {self.by})")
        if self.latency == "predict" and not self.predictor:
            raise ValueError("latency: predict needs predictor: the JSON file `compress calibrate DEVICE` wrote")
        return self


class Recipe(_Section):
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    seed: int = 0
    task: Literal["classification", "embedding"] = Field(
        "classification", description="classification: logits, top-1 accuracy; embedding: a vector per input "
        "(a sentence encoder), quality as agreement with the teacher (compressor/tasks.py)")
    metric: Literal["accuracy", "agreement"] | None = Field(None, description="default: the task's own")
    teacher: TeacherSpec
    data: DataSpec
    student: StudentSpec | None = Field(None, description="required unless search: or prune: makes the student")
    search: SearchSpec | None = Field(None, description="set to search for the student")
    prune: PruneSpec | None = Field(None, description="set to prune the teacher into the student")
    distill: DistillSpec = Field(default_factory=DistillSpec)
    quantize: QuantizeSpec = Field(default_factory=QuantizeSpec)
    export: ExportSpec = Field(default_factory=ExportSpec)
    profile: ProfileSpec = Field(default_factory=ProfileSpec)
    targets: list[str] = Field(default_factory=lambda: ["local-cpu"])
    budgets: Budgets = Field(default_factory=Budgets)

    @model_validator(mode="after")
    def _budget_devices(self):
        unknown = set(self.budgets.latency_ms) - set(self.targets)
        if unknown:
            raise ValueError(f"budgets.latency_ms names {', '.join(sorted(unknown))}, which is not in targets")
        return self

    @model_validator(mode="after")
    def _task(self):
        from .distill import NEEDS_LOGITS

        own = {"classification": "accuracy", "embedding": "agreement"}[self.task]
        if self.metric is None:
            self.metric = own
        elif self.metric != own:
            raise ValueError(f"metric {self.metric} does not go with task {self.task} (its metric is {own})")
        if self.student is None and self.search is None and self.prune is None:
            raise ValueError("student: is required unless search: or prune: makes the student")
        if self.task == "embedding":
            if self.search is not None:
                from .search.proxies import check_task

                try:  # a proxy that needs logits (or an all-ones input) has no embedding form
                    check_task(self.search.proxy, "embedding")
                except UserError as e:
                    raise ValueError(str(e)) from None
            if "losses" not in self.distill.model_fields_set:
                self.distill.losses = [LossSpec(name="cosine", weight=1.0, relation=1.0)]
            bad = [l.name for l in self.distill.losses if l.name in NEEDS_LOGITS]
            if bad:
                raise ValueError(f"distill.losses: {', '.join(bad)} need class logits; an embedding model is "
                                 "distilled with cosine, feature, feature_norm, minilm, rkd, ...")
        return self


def _set(data: dict, dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    node: Any = data
    for i, k in enumerate(keys):
        last = i == len(keys) - 1
        if isinstance(node, list):
            if not k.isdigit() or int(k) >= len(node):
                raise UserError(f"--set {dotted}: {'.'.join(keys[:i])} has no item {k}")
            k = int(k)
        elif not isinstance(node, dict):
            raise UserError(f"--set {dotted}: {'.'.join(keys[:i])} is not a section")
        if last:
            node[k] = value
        else:
            if isinstance(node, dict) and node.get(k) is None:
                node[k] = {}
            node = node[k]


def apply_overrides(data: dict, overrides: list[str] | tuple[str, ...]) -> dict:
    """``a.b=c`` overrides; the value is parsed as YAML (so 3, 0.5, true, [1, 2] keep their types)."""
    data = copy.deepcopy(data)
    for o in overrides:
        if "=" not in o:
            raise UserError(f"--set {o!r}: expected KEY=VALUE, for example distill.epochs=5")
        key, raw = o.split("=", 1)
        try:
            value = yaml.safe_load(raw)
        except yaml.YAMLError:
            value = raw
        _set(data, key.strip(), value)
    return data


def _one_line(e: ValidationError, source: str) -> str:
    errs = e.errors()
    first = errs[0]
    loc = ".".join(str(p) for p in first["loc"]) or "(top level)"
    msg = first["msg"]
    if first["type"] == "extra_forbidden":
        msg = "unknown key (check its spelling)"
    got = first.get("input")
    detail = f" (got {got!r})" if first["type"] not in ("extra_forbidden", "missing") and not isinstance(got, dict) else ""
    more = f" (and {len(errs) - 1} more problem{'s' * (len(errs) > 2)})" if len(errs) > 1 else ""
    return f"{source}: {loc}: {msg}{detail}{more}"


def builtin_recipe(name: str) -> Path | None:
    res = resources.files("profiles") / "recipes" / f"{name}.yaml"
    return Path(str(res)) if res.is_file() else None


def load_recipe(source: str | Path | dict | Recipe | None = None, overrides=()) -> Recipe:
    """Read a recipe from a path, a built-in recipe name, or a dict; apply ``--set`` overrides; validate."""
    if isinstance(source, Recipe):
        source = source.model_dump(mode="json")
    if source is None:
        source = "quickstart"
    if isinstance(source, dict):
        data, where = source, "recipe"
    else:
        path = Path(source)
        if not path.is_file():
            builtin = builtin_recipe(str(source))
            if builtin is None:
                raise UserError(f"recipe {source} does not exist (give a path to a .yaml file or a built-in "
                                "recipe name such as quickstart)")
            path = builtin
        where = str(source)
        try:
            data = yaml.safe_load(path.read_text())
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
            problem = " ".join(str(getattr(e, "problem", None) or e).split())
            raise UserError(f"{where}: not valid YAML{at}: {problem}") from None
        except (OSError, UnicodeDecodeError) as e:
            raise UserError(f"{where}: cannot be read ({e})") from None
        if not isinstance(data, dict):
            raise UserError(f"{where}: a recipe is a YAML mapping (name:, teacher:, data:, student:, ...)")
    if overrides:
        # Overrides apply to the resolved recipe, so they can reach defaults the YAML left out
        # (distill.losses.0.temperature=2); a base that needs the override to be valid takes it raw.
        try:
            data = Recipe.model_validate(data).model_dump(mode="json")
        except ValidationError:
            pass
        data = apply_overrides(data, overrides)
    try:
        return Recipe.model_validate(data)
    except ValidationError as e:
        raise UserError(_one_line(e, where)) from None


def dump_recipe(recipe: Recipe) -> str:
    return yaml.safe_dump(recipe.model_dump(mode="json"), sort_keys=False)
