"""What the stages of one run share: the recipe, the data, the teacher, the student and what each stage
has made so far. ``make_context`` builds it from a recipe, checking the data, teacher and student against
each other before any stage runs."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from devices import Measurement
from exporters.artifact import Artifact

from .bundle import StageRecord
from .data import DataSplits, load_data
from .errors import UserError
from .models import HF_BUILDERS, build_model, is_hf_dir
from .recipe import Recipe
from .tasks import Classification, Embedding, at_length, get_task
from .teacher import check_fits, load_teacher


@dataclass
class Context:
    recipe: Recipe
    work: Path  # the partial bundle directory
    data: DataSplits
    teacher: nn.Module
    teacher_origin: dict
    student: nn.Module | None  # None until search or prune makes one, when the recipe names none
    genome: dict  # how to rebuild the student: builder, config, defaults (and what pruning removed)
    task: Classification | Embedding | None = None  # compressor.tasks: how quality is measured
    log: Callable[[str], None] = print
    artifacts: list[Artifact] = field(default_factory=list)  # the files the bundle ships
    reference: list[Artifact] = field(default_factory=list)  # measured for comparison, not shipped
    measurements: list[Measurement] = field(default_factory=list)
    records: dict[str, StageRecord] = field(default_factory=dict)  # the finished stages' records
    quality: dict = field(default_factory=dict)  # {"teacher": {...}, "student": {...}, "student_int8": ...}
    teacher_onnx: Artifact | None = None  # analyze's export of the teacher, reused by the export stage

    @property
    def scratch(self) -> Path:
        """Files needed while running (checkpoints, the teacher's ONNX) but not shipped."""
        return self.work / "work"

    def example(self, n: int = 1):
        """``n`` held-out inputs: a tensor, or a dict of tensors (token inputs)."""
        return self.data.tensors("test", limit=n)[0]

    def flops_example(self):
        """One input at the length the devices run (data's dims, or the profile's), for FLOP counts."""
        length = {**self.data.meta.get("dims", {}), **self.recipe.profile.dims}.get("sequence")
        return at_length(self.example(1), length)

    def score(self, model: nn.Module) -> dict:
        """The task's quality metrics of ``model`` on the held-out split."""
        return self.task.score(model, self.data, self.recipe.data.batch_size)

    @property
    def metric(self) -> str:
        return self.recipe.metric


def build_student(recipe: Recipe, data: DataSplits, spec=None) -> tuple[nn.Module | None, dict]:
    """The recipe's own student and its genome; (None, {}) when search or prune makes it. ``spec``: another
    StudentSpec built the same way (search.as_fast_as, say)."""
    spec = spec or recipe.student
    if spec is None:
        return None, {}
    defaults = {"in_channels": data.input_shape[0], "num_classes": data.num_classes,
                "in_features": int(torch.Size(data.input_shape).numel())}
    if spec.model in HF_BUILDERS:  # the teacher's own class with a smaller config
        from .hf import inherited

        own = spec.config.keys() & {"path", "package"}  # a student from another directory
        defaults.update({k: v for k, v in inherited(recipe.teacher).items()
                         if not (own and k in ("path", "package"))
                         and (spec.model == "hf-encoder" or k in ("path", "package"))})
    model = build_model(spec.model, spec.config, defaults, what="student")
    genome = {"model": spec.model, "config": spec.config, "defaults": defaults}
    return model, genome


def data_defaults(recipe: Recipe) -> dict:
    """A Hugging Face teacher lends the data its tokenizer."""
    t = recipe.teacher
    if t.model in HF_BUILDERS:
        return {"tokenizer_path": t.kwargs.get("path"), "tokenizer_package": t.kwargs.get("package")}
    if is_hf_dir(t.model):
        return {"tokenizer_path": t.model}
    return {}


def load_inputs(recipe: Recipe, log=print):
    """The recipe's data and teacher (trained and cached on first use): what every entry point starts from."""
    torch.manual_seed(recipe.seed)
    data = load_data(recipe.data, recipe.seed, defaults=data_defaults(recipe))
    teacher, origin = load_teacher(recipe, data, log=log)
    return data, teacher, origin


def make_context(recipe: Recipe, work: Path, log) -> Context:
    """Data, task, teacher and the recipe's student (if any), checked against each other."""
    data, teacher, origin = load_inputs(recipe, log)
    task = get_task(recipe.task)
    # Training a teacher on first use draws from the global RNG and loading a cached one does not, so the
    # student's initialisation must not depend on which happened.
    torch.manual_seed(recipe.seed)
    student, genome = build_student(recipe, data)
    if student is not None:
        s_width, t_width = check_fits(student, data, "student", task), check_fits(teacher, data, "teacher", task)
        if s_width != t_width and recipe.task == "classification":
            raise UserError(f"the student outputs {s_width} classes and the teacher {t_width}: "
                            "distillation needs the same classes")
    return Context(recipe, work, data, teacher, origin, student, genome, task=task, log=log)


def sequence_length(recipe, data) -> int | None:
    """The sequence length the devices run (the data's dims, or profile.dims): FLOPs and latency of a
    text candidate are counted there, as the pipeline's analyze and profile stages count them."""
    return {**data.meta.get("dims", {}), **recipe.profile.dims}.get("sequence")
