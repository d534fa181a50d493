"""Training recipes: a TOML file, typed by the dataclasses of recipe_types.py, with `key=value` overrides.

A recipe has top-level keys (`name`, `seed`) and four sections, `[model]`, `[data]`, `[optim]`,
`[train]`. Every field has a default, so a recipe file only states what differs. Overrides on the
command line use dotted keys for sections (`train.steps=100`, `model.group_size=16`, `seed=1`)
and their values are TOML literals (`optim.lr=3e-4`, `model.moe_layers=[2,3]`,
`data.source="corpus.txt"`); a value that is not a TOML literal is taken as a string, and `none`
sets an optional field back to None. A key that takes a list takes one item alone as the list of
it, in a file as on the command line (`train.report_to=tensorboard`, `model.moe_layers=3`).

Anything wrong (an unknown key, a value of the wrong type, a value that cannot work) raises a
ValueError of one line that names the key. The `[model]` section is checked by building the
`MoTConfig` it describes.
"""

from __future__ import annotations

import dataclasses
import difflib
import tomllib
import typing
from pathlib import Path

from ..config import as_written
from .recipe_checks import check_recipe, micro_batch_size
from .recipe_types import (
    PRECISIONS, RECIPE_RULES, SECTIONS, TOP_LEVEL, DataRecipe, ModelRecipe, OptimRecipe, Recipe, TrainRecipe,
)

RECIPES_DIR = Path(__file__).resolve().parents[2] / "recipes"


def resolve_recipe_path(recipe: str | Path) -> Path:
    """A path as given, or a bare name such as `tiny` looked up as `recipes/tiny.toml` in the repo."""
    path = Path(recipe)
    if path.is_file():
        return path
    if path.suffix == "" and len(path.parts) == 1 and (RECIPES_DIR / f"{path.name}.toml").is_file():
        return RECIPES_DIR / f"{path.name}.toml"
    shipped = sorted(RECIPES_DIR.glob("*.toml"), key=lambda p: p.stem) if RECIPES_DIR.is_dir() else []
    grids = [p.stem for p in shipped if is_grid_toml(p)]
    known = [p.stem for p in shipped if p.stem not in grids]
    hint = (f"; built-in recipes: {', '.join(known)}" if known else "") + (
        f"; built-in study grids (mot-transition study NAME): {', '.join(grids)}" if grids else "")
    raise FileNotFoundError(f"recipe {str(recipe)!r} not found (give a .toml path or a built-in name{hint})")


# the keys only a study grid has (mot_transition.study.grid): its [[size]] tables, learning-rate sweep, results folder
GRID_KEYS = frozenset({"size", "sweep", "results"})


def _is_grid(raw: dict) -> bool:
    return bool(GRID_KEYS & raw.keys())


def is_grid_toml(path: Path) -> bool:
    """Whether the TOML file `path` is a study grid; False for a recipe and for what does not read as TOML."""
    try:
        return _is_grid(tomllib.loads(path.read_text()))
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError, RecursionError):
        return False


def load_recipe(recipe: str | Path | None = None, overrides: typing.Sequence[str] = ()) -> Recipe:
    """Read a recipe (a path, a built-in name, or None for all defaults) and apply `key=value` overrides."""
    raw: dict = {}
    name = "run"
    if recipe is not None:
        path = resolve_recipe_path(recipe)
        name = path.stem
        try:
            raw = tomllib.loads(path.read_text())
        except tomllib.TOMLDecodeError as error:
            raise ValueError(f"recipe {path} is not valid TOML: {error}") from None
        except RecursionError:  # tomllib recurses per level of nesting: [[[[...]]]] 100,000 deep
            raise ValueError(f"recipe {path} is not a recipe: its values nest deeper than Python's recursion limit") from None
        if _is_grid(raw):
            raise ValueError(f"{path} is a study grid (sizes of a recipe), not a training recipe: run it with mot-transition study {recipe}")
    raw.setdefault("name", name)
    for override in overrides:
        key, value = parse_override(override)
        *section, leaf = key.split(".")
        target = raw
        for part in section:
            target = target.setdefault(part, {})
            if not isinstance(target, dict):
                raise ValueError(f"recipe key {part!r} is a value, not a section, so {key!r} cannot be set")
        target[leaf] = value
    checked = recipe_from_dict(raw)
    if recipe is not None and not raw.get("model") and not any(o.strip().startswith("model.") for o in overrides):
        import warnings

        warnings.warn(
            f"recipe {recipe} sets nothing in [model]: the default model is trained (GPT-2 small's shape, 12 blocks of "
            f"768 with 32 experts: about 1B parameters); see recipes/tiny.toml for a small one",
            stacklevel=2,
        )
    return checked


def parse_override(text: str) -> tuple[str, typing.Any]:
    """`train.steps=100` -> ("train.steps", 100); the value is a TOML literal, else a plain string."""
    key, sep, value = text.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ValueError(f"override {text!r} is not of the form key=value (e.g. train.steps=100)")
    value = value.strip()
    if value.lower() in ("none", "null"):
        return key, None
    try:
        return key, tomllib.loads(f"v = {value}")["v"]
    except (tomllib.TOMLDecodeError, RecursionError):  # a plain string (its key's rule then says what it must be)
        return key, value


def recipe_from_dict(raw: dict) -> Recipe:
    """Build and check a Recipe from nested dicts (as read from TOML)."""
    top = {}
    sections = {}
    for key, value in raw.items():
        if key in SECTIONS:
            if not isinstance(value, dict):
                raise ValueError(f"recipe key {key!r} must be a section ([{key}]), got {as_written(value)}")
            sections[key] = _build_section(SECTIONS[key], value, prefix=f"{key}.")
        elif key in TOP_LEVEL:
            top[key] = value
        else:
            raise ValueError(f"unknown recipe key {key!r}{_did_you_mean(key, [*TOP_LEVEL, *SECTIONS], '')}")
    for key, value in top.items():
        top[key] = RECIPE_RULES[key].read(f"recipe key {key!r}", value)
    recipe = Recipe(**top, **sections)
    check_recipe(recipe)
    return recipe


def _build_section(cls, values: dict, prefix: str):
    names = [f.name for f in dataclasses.fields(cls)]
    checked = {}
    for key, value in values.items():
        if key not in names:
            raise ValueError(f"unknown recipe key {prefix + key!r}{_did_you_mean(key, names, prefix)}")
        checked[key] = RECIPE_RULES[prefix + key].read(f"recipe key {prefix + key!r}", value)  # one value for a list: [value]
    return cls(**checked)


def _did_you_mean(key: str, choices: list[str], prefix: str) -> str:
    close = difflib.get_close_matches(key, choices, n=1)
    return f" (did you mean {prefix + close[0]!r}?)" if close else f" (known: {', '.join(prefix + c for c in choices)})"


def recipe_to_toml(recipe: Recipe) -> str:
    """The recipe as TOML (None values left out, as TOML has no null), to store next to a run."""

    def literal(value) -> str:
        if isinstance(value, bool):
            return "true" if value else "false"
        if isinstance(value, str):
            return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
        if isinstance(value, list):
            return "[" + ", ".join(literal(v) for v in value) + "]"
        return repr(value)

    data = recipe.to_dict()
    lines = [f"{key} = {literal(data[key])}" for key in TOP_LEVEL]
    for section in SECTIONS:
        lines.append(f"\n[{section}]")
        lines += [f"{k} = {literal(v)}" for k, v in data[section].items() if v is not None]
    return "\n".join(lines) + "\n"


__all__ = [
    "PRECISIONS",
    "RECIPES_DIR",
    "RECIPE_RULES",
    "SECTIONS",
    "TOP_LEVEL",
    "Recipe",
    "ModelRecipe",
    "DataRecipe",
    "OptimRecipe",
    "TrainRecipe",
    "load_recipe",
    "recipe_from_dict",
    "resolve_recipe_path",
    "parse_override",
    "check_recipe",
    "recipe_to_toml",
    "micro_batch_size",
]
