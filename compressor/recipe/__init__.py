"""The recipe: a YAML job description parsed into pydantic models that reject unknown keys.

YAML is data: the only code it names is an explicit ``module:function`` reference, imported when used.
"""
from __future__ import annotations

from .load import apply_overrides, builtin_recipe, dump_recipe, load_recipe
from .sections import (
    Budgets,
    DataSpec,
    DistillSpec,
    ExportSpec,
    LossSpec,
    ParitySpec,
    ProfileSpec,
    QuantizeSpec,
    StudentSpec,
    TeacherSpec,
    TrainerSpec,
    TrainSpec,
)
from .spec import Recipe
from .student import ChannelsSpec, PruneSpec, SearchSpec, WidthSpec

__all__ = [
    "Budgets", "ChannelsSpec", "DataSpec", "DistillSpec", "ExportSpec", "LossSpec", "ParitySpec", "ProfileSpec",
    "PruneSpec", "QuantizeSpec", "Recipe", "SearchSpec", "StudentSpec", "TeacherSpec", "TrainSpec", "TrainerSpec",
    "WidthSpec", "apply_overrides", "builtin_recipe", "dump_recipe", "load_recipe",
]
