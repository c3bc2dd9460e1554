"""The recipe's sections (teacher, data, student, distill, quantize, export, profile, budgets) as pydantic
models that reject unknown keys."""
from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class TrainSpec(_Section):
    """Training from labels alone, used for a built-in teacher that is trained on first use and cached."""

    epochs: int = Field(10, ge=1)
    lr: float = Field(2e-3, gt=0)
    weight_decay: float = Field(5e-4, ge=0)
    batch_size: int = Field(64, ge=1, description="its own, so changing the distillation batch keeps the cached teacher")
    precision: str = Field("auto", description="auto: bf16 autocast on a CPU with AMX or AVX512-BF16 (the teacher "
                           "trains on the CPU), fp32 elsewhere; or 32-true, bf16-mixed")


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
    group_by_length: bool | Literal["auto"] = Field(
        "auto", description="training batches of token inputs drawn among sentences of similar length, so each "
        "batch trimmed to its longest pays for little padding; auto: on where the samples carry an attention mask")


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
        from ..distill import LOSSES, check_params

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
    precision: str = Field("auto", description="auto: bf16-mixed on a GPU with bf16 or a CPU with AMX or AVX512-BF16, "
                           "32-true elsewhere; or any Lightning precision (32-true, bf16-mixed, 16-mixed)")
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
    freeze: list[str] = Field(default_factory=list, description="module paths of the student whose weights are not "
                              "trained (a token embedding table: most of a small encoder's weights, few of its rows "
                              "in any batch); a negative index counts from the end of a list of layers")
    lazy_embeddings: bool = Field(True, description="token tables (nn.Embedding of 1024 rows or more, not tied to an "
                                  "output layer) update only the rows each batch uses (lazy Adam, no weight decay on "
                                  "them): a fifth of a MiniLM student's step; adamw on one device")
    cache_teacher: Literal["auto"] | bool = Field(
        "auto", description="compute the teacher's outputs once and look them up by sample (auto: when the training "
        "data reads the same twice and no loss reads the teacher's hidden features)")

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
    allow_float: bool = Field(True, description="NNCF and Polino: a module with weights of its own, which may stay float, is a warning (false: an error)")
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
