"""The whole recipe: its sections together, and the rules that tie them (targets, task and metric)."""
from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from ..errors import UserError
from .sections import (
    Budgets,
    DataSpec,
    DistillSpec,
    ExportSpec,
    LossSpec,
    ProfileSpec,
    QuantizeSpec,
    StudentSpec,
    TeacherSpec,
    _Section,
)
from .student import PruneSpec, SearchSpec


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
        from ..distill import NEEDS_LOGITS

        own = {"classification": "accuracy", "embedding": "agreement"}[self.task]
        if self.metric is None:
            self.metric = own
        elif self.metric != own:
            raise ValueError(f"metric {self.metric} does not go with task {self.task} (its metric is {own})")
        if self.student is None and self.search is None and self.prune is None:
            raise ValueError("student: is required unless search: or prune: makes the student")
        if self.task == "embedding":
            if self.search is not None:
                from ..search.proxies import check_task

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
