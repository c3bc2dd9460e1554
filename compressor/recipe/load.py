"""Reading a recipe (a path, a built-in name or a dict), ``--set`` overrides, and writing it back as YAML."""
from __future__ import annotations

import copy
from importlib import resources
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from ..errors import UserError
from .spec import Recipe


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
    # a key is shown as written unless it holds a newline or another unprintable character (then its repr):
    # the error stays one line
    loc = ".".join(str(p) if str(p).isprintable() else repr(p) for p in first["loc"]) or "(top level)"
    msg = " ".join(first["msg"].split())
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
