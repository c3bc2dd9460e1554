"""The pipeline's stages, in the order they run.

Each stage is a module with the same five names:

- ``name``: the stage's name, its record's file (``stages/<name>.json``) and its recipe section.
- ``needs``: the Context fields it reads (compressor.context.Context), set by the stages before it.
- ``skip(ctx) -> str | None``: why it does nothing this run (no recipe section, say), or None to run.
- ``run(ctx) -> StageRecord``: do the work, update the context, return the record.
- ``restore(ctx, record)``: rebuild what ``run`` left in the context from its record (``--resume``).

A stage may import the recipe, the bundle and the methods (compressor.search, prune, width, structural,
quantize, distill); the methods never import the stages, the recipe or the bundle (import-linter holds
this: pyproject.toml's [tool.importlinter]). To add a stage, write such a module and put it in ORDER.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

from . import analyze, distill, export, profile, prune, quantize, search

if TYPE_CHECKING:
    from ..bundle import StageRecord
    from ..context import Context


class Stage(Protocol):
    name: str
    needs: tuple[str, ...]

    def skip(self, ctx: Context) -> str | None: ...

    def run(self, ctx: Context) -> StageRecord: ...

    def restore(self, ctx: Context, rec: StageRecord) -> None: ...


ORDER: tuple[Stage, ...] = (analyze, search, prune, distill, quantize, export, profile)
NAMES: tuple[str, ...] = tuple(s.name for s in ORDER)
