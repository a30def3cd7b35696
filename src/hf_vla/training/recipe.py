"""Training recipes: a YAML file with `model`, `data` and `trainer` sections, plus dotted command-line overrides.

    python trainers/train_vla.py trainers/recipes/gr00t.yaml --trainer.max_steps 100 \\
        --trainer.learning_rate.action_head 1e-4 --model.head.num_dit_layers 8 \\
        --data.mixture mix.yaml --data.eval_split 0

An override is `--section.key.subkey VALUE` (or `--section.key.subkey=VALUE`); VALUE is read as YAML, so `1e-4`,
`true`, `null`, `[a, b]` and `{min_lr: 1e-6}` have their YAML types. Under `trainer.learning_rate` the rest of the
path is one module path (`--trainer.learning_rate.vlm.model.visual 1e-5` sets the rate of `vlm.model.visual`), and a
plain `--trainer.learning_rate 3e-5` sets the base rate, keeping the per-module ones.

The `trainer` section holds `TrainingArguments` fields, except three that VLATrainer takes itself:
`learning_rate` (a number, or `{base: lr, <module path>: lr, ...}` where `base` is `TrainingArguments.learning_rate`),
`freeze` (a list of module paths, or a comma-separated string) and `loss_scale` (`{vla: w, vlm: w}`).

The optional `lora` section is null (or absent) or a mapping, so it may also be set whole: `--lora null`,
`--lora "{r: 16}"`; `--lora.r 16` turns a null section into `{r: 16}`.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Mapping, Sequence
from pathlib import Path

import yaml

from .param_groups import flatten_paths

SECTIONS = ("model", "data", "trainer", "lora")
OPTIONAL_SECTIONS = ("lora",)  # null or a mapping: absent from a recipe unless its defaults or file name them
PATH_KEYED = {("trainer", "learning_rate")}  # dicts whose keys are dotted module paths
TRAINER_OWN_KEYS = ("learning_rate", "freeze", "loss_scale")


class RecipeLoader(yaml.SafeLoader):
    """PyYAML with two YAML 1.1 surprises removed: `1e-4` is a float (1.1 wants `1.0e-4`), and only true/false are
    booleans (1.1 also reads no/off/yes/on, so `--trainer.save_strategy no` would become False)."""


RecipeLoader.yaml_implicit_resolvers = {
    first: [(tag, pattern) for tag, pattern in resolvers if tag != "tag:yaml.org,2002:bool"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
RecipeLoader.add_implicit_resolver(
    "tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF")
)
RecipeLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float", re.compile(r"^[-+]?[0-9][0-9_]*(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"), list("-+0123456789")
)


def read_yaml(text: str):
    return yaml.load(text, Loader=RecipeLoader)


def parse_overrides(argv: Sequence[str]) -> list[tuple[list[str], object]]:
    """`["--a.b", "1", "--c=x"]` → `[(["a", "b"], 1), (["c"], "x")]`."""
    overrides, i = [], 0
    while i < len(argv):
        token = argv[i]
        if not token.startswith("--") or len(token) == 2:
            raise ValueError(f"overrides: expected --section.key VALUE, got {token!r}")
        key, has_value, value = token[2:].partition("=")
        if not has_value:
            if i + 1 >= len(argv) or argv[i + 1].startswith("--"):
                raise ValueError(f"overrides: {token} has no value")
            value, i = argv[i + 1], i + 1
        path = key.split(".")
        if path[0] not in SECTIONS or (len(path) < 2 and path[0] not in OPTIONAL_SECTIONS):
            raise ValueError(f"overrides: {token!r} must start with one of {[s + '.' for s in SECTIONS]}")
        overrides.append((path, read_yaml(value) if value != "" else ""))
        i += 1
    return overrides


def apply_override(recipe: dict, path: list[str], value) -> None:
    node = recipe
    for depth, key in enumerate(path[:-1]):
        if tuple(path[: depth + 1]) in PATH_KEYED:
            child = node.get(key)
            if not isinstance(child, dict):  # a scalar learning_rate becomes the base rate of a dict
                child = {} if child is None else {"base": child}
            # flat keys, so that `vlm` set here leaves a nested `vlm: {model: {visual: ...}}` rate in place
            child = node[key] = flatten_paths(child)
            child[".".join(path[depth + 1 :])] = value
            return
        if not isinstance(node.get(key), dict):
            node[key] = {}
        node = node[key]
    if tuple(path) in PATH_KEYED and isinstance(node.get(path[-1]), dict) and not isinstance(value, Mapping):
        node[path[-1]]["base"] = value  # a number replaces the base rate, not the per-module ones
        return
    node[path[-1]] = value


def load_recipe(path: str | Path | None, overrides: Sequence[str] = (), defaults: Mapping | None = None) -> dict:
    """`defaults` ← the YAML file at `path` ← the command-line `overrides`, merged key by key."""
    recipe = copy.deepcopy(dict(defaults or {}))
    if path is not None:
        loaded = read_yaml(Path(path).read_text(encoding="utf-8")) or {}
        unknown = sorted(set(loaded) - set(SECTIONS))
        if unknown:
            raise ValueError(f"{path}: unknown section(s) {unknown}; expected {list(SECTIONS)}")
        _merge(recipe, loaded)
    for key_path, value in parse_overrides(list(overrides)):
        apply_override(recipe, key_path, value)
    for section in SECTIONS:
        if section not in OPTIONAL_SECTIONS:
            recipe.setdefault(section, {})
    lr = recipe["trainer"].get("learning_rate")
    if isinstance(lr, Mapping):
        recipe["trainer"]["learning_rate"] = flatten_paths(lr)
    return recipe


def _merge(base: dict, update: Mapping) -> None:
    for key, value in update.items():
        if isinstance(value, Mapping) and isinstance(base.get(key), dict):
            _merge(base[key], value)
        else:
            base[key] = copy.deepcopy(value)


def split_trainer_section(trainer: Mapping) -> tuple[dict, dict, list[str], dict]:
    """(`TrainingArguments` kwargs, per-module learning rates, frozen paths, loss scale) from a `trainer` section."""
    fields = {k: v for k, v in trainer.items() if k not in TRAINER_OWN_KEYS}
    rates = trainer.get("learning_rate")
    learning_rates = {}
    if isinstance(rates, Mapping):
        learning_rates = {k: _number(v, f"trainer.learning_rate.{k}") for k, v in flatten_paths(rates).items()}
        if "base" in learning_rates:
            fields["learning_rate"] = learning_rates.pop("base")
    elif rates is not None:
        fields["learning_rate"] = _number(rates, "trainer.learning_rate")
    freeze = trainer.get("freeze") or []
    if isinstance(freeze, str):
        freeze = [part.strip() for part in freeze.split(",") if part.strip()]
    if not isinstance(freeze, list) or not all(isinstance(path, str) for path in freeze):
        raise ValueError(f"trainer.freeze: expected module paths (a list, or a comma-separated string), got {freeze!r}")
    loss_scale = trainer.get("loss_scale") or {}
    if not isinstance(loss_scale, Mapping):
        raise ValueError(f"trainer.loss_scale: expected a mapping {{vla: weight, vlm: weight}}, got {loss_scale!r}")
    loss_scale = {k: _number(v, f"trainer.loss_scale.{k}") for k, v in loss_scale.items()}
    return fields, learning_rates, freeze, loss_scale


def _number(value, field: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{field}: expected a number, got {value!r}")
    return float(value)


class RecipeDumper(yaml.SafeDumper):
    """Writes what `RecipeLoader` and plain YAML 1.1 loaders both read back unchanged: a string either would take
    for a number or a boolean (`"1e5"`, `"no"`) is quoted."""


RecipeDumper.yaml_implicit_resolvers = {
    first: list(dict.fromkeys(yaml.SafeDumper.yaml_implicit_resolvers.get(first, [])
                              + RecipeLoader.yaml_implicit_resolvers.get(first, [])))
    for first in {**yaml.SafeDumper.yaml_implicit_resolvers, **RecipeLoader.yaml_implicit_resolvers}
}  # fmt: skip


def dump_recipe(recipe: Mapping, path: str | Path) -> None:
    Path(path).write_text(yaml.dump(_plain(recipe), Dumper=RecipeDumper, sort_keys=False), encoding="utf-8")


def _plain(value):
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    return value


__all__ = ["apply_override", "dump_recipe", "load_recipe", "parse_overrides", "read_yaml", "split_trainer_section"]


if __name__ == "__main__":
    from ..testing import scratch_dir

    work_dir = scratch_dir("recipe_demo_")
    (work_dir / "oft.yaml").write_text(
        "model: {variant: oft, action_horizon: 8}\n"
        "data: {lerobot: /data/libero_spatial}\n"
        "trainer:\n  max_steps: 30000\n  learning_rate: {base: 1e-4, action_head: 1e-3}\n"
        "  lr_scheduler_type: cosine_with_min_lr\n  loss_scale: {vlm: 0.5}\n",
        encoding="utf-8",
    )
    overrides = ["--trainer.max_steps", "100", "--trainer.learning_rate.vlm.model.visual", "1e-5",
                 "--trainer.freeze=vlm.model.visual,vlm.model.language_model.embed_tokens",
                 "--trainer.save_strategy", "no", "--model.variant", "gr00t", "--lora.r", "16"]  # fmt: skip
    # Values are YAML as RecipeLoader reads it: 1e-5 is a float and `no` stays the string "no" (YAML 1.1: False).
    print("overrides:", " ".join(overrides))
    recipe = load_recipe(work_dir / "oft.yaml", overrides)
    for section in SECTIONS:
        print(f"{section}: {recipe[section]}")
    fields, learning_rates, freeze, loss_scale = split_trainer_section(recipe["trainer"])
    print("→ TrainingArguments:", fields)
    print("→ VLATrainer: learning_rates", learning_rates, "freeze", freeze, "loss_scale", loss_scale)
    dump_recipe(recipe, work_dir / "resolved.yaml")  # what train_vla.py saves beside its checkpoints
    print("resolved.yaml reloads to the same recipe:", load_recipe(work_dir / "resolved.yaml") == recipe)
