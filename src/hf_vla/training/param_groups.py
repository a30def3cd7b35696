"""Per-module learning rates and freezing, addressed by module paths such as `vlm.model.visual` or `action_head`.

A path matches a parameter when the parameter's name equals it or starts with it followed by a dot; when several
paths match, the longest wins (so `vlm.model.language_model.layers.0` can override `vlm.model.language_model`).
StarVLA names its modules differently (`qwen_vl_interface.model.model.visual`); these paths are the module names of
the hf_vla model, as `model.named_modules()` lists them; inside a PEFT model the names PEFT adds are ignored (the
`base_model.model.` prefix, and the `modules_to_save.<adapter>` / `original_module` / `base_layer` wrappers of
trained or adapted modules), so the same paths work with LoRA.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping

from torch import nn

PEFT_PREFIX = "base_model.model."
PEFT_WRAPPERS = re.compile(r"\.(?:modules_to_save\.[^.]+|original_module|base_layer)(?=\.)")


def flatten_paths(tree: Mapping | None, prefix: str = "") -> dict:
    """`{"vlm": {"model": {"visual": 1e-5}}}` or `{"vlm.model.visual": 1e-5}` → `{"vlm.model.visual": 1e-5}`."""
    flat = {}
    for key, value in (tree or {}).items():
        path = f"{prefix}.{key}" if prefix else str(key)
        if isinstance(value, Mapping):
            flat.update(flatten_paths(value, path))
        else:
            flat[path] = value
    return flat


def matching_path(name: str, paths: Iterable[str]) -> str | None:
    """The longest of `paths` that is `name` or a dotted prefix of it."""
    name = PEFT_WRAPPERS.sub("", name.removeprefix(PEFT_PREFIX))
    best = None
    for path in paths:
        if (name == path or name.startswith(path + ".")) and (best is None or len(path) > len(best)):
            best = path
    return best


def check_paths(model: nn.Module, paths: Iterable[str], field: str) -> None:
    """Raises when a path matches no parameter (a typo would otherwise silently train at the default rate)."""
    names = [name for name, _ in model.named_parameters()]
    unknown = [path for path in paths if not any(matching_path(name, [path]) for name in names)]
    if unknown:
        top = sorted({name.split(".")[0] for name in names})
        raise ValueError(
            f"{field}: {unknown} match no parameter of {type(model).__name__}. Paths are module names as "
            f"model.named_modules() lists them, e.g. 'vlm.model.visual', 'vlm.model.language_model', "
            f"'action_head'; top-level modules: {top}"
        )


def freeze_modules(model: nn.Module, paths: Iterable[str]) -> int:
    """Sets `requires_grad=False` on every parameter under `paths`; returns how many parameters were frozen."""
    paths = list(paths)
    check_paths(model, paths, "freeze")
    frozen = 0
    for name, param in model.named_parameters():
        if matching_path(name, paths) is not None:
            param.requires_grad_(False)
            frozen += param.numel()
    return frozen


def build_param_groups(
    model: nn.Module,
    base_learning_rate: float,
    weight_decay: float,
    decay_parameter_names: Iterable[str],
    learning_rates: Mapping[str, float] | None = None,
) -> list[dict]:
    """AdamW parameter groups: one pair (decay, no decay) per learning-rate path, plus one pair for the rest at
    `base_learning_rate`. Frozen parameters are left out; empty groups are dropped. Each group carries a `name`."""
    learning_rates = dict(learning_rates or {})
    check_paths(model, learning_rates, "learning_rates")
    decay_names = set(decay_parameter_names)
    groups: dict[tuple[str, bool], list] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        path = matching_path(name, learning_rates) or "base"
        groups.setdefault((path, name in decay_names), []).append(param)
    ordered = sorted(groups, key=lambda key: (key[0] != "base", key[0], not key[1]))
    return [
        {
            "name": f"{path}{'' if decays else ' (no decay)'}",
            "params": groups[(path, decays)],
            "lr": base_learning_rate if path == "base" else float(learning_rates[path]),
            "weight_decay": weight_decay if decays else 0.0,
        }
        for path, decays in ordered
    ]


__all__ = ["build_param_groups", "check_paths", "flatten_paths", "freeze_modules", "matching_path"]


if __name__ == "__main__":
    from ..testing import build_tiny_vla

    model, _ = build_tiny_vla("oft")
    learning_rates = flatten_paths({"vlm": {"model": {"language_model": 2e-5}}, "action_head": 1e-3,
                                    "vlm.model.language_model.layers.0": 5e-6})
    print("learning rates by path:", learning_rates)
    print("vlm.model.language_model.layers.0.mlp.up_proj.weight → rate of",
          repr(matching_path("vlm.model.language_model.layers.0.mlp.up_proj.weight", learning_rates)))
    total = model.num_parameters()
    print(f"froze {freeze_modules(model, ['vlm.model.visual']):,} of {total:,} parameters (vlm.model.visual)")
    decay = [name for name, param in model.named_parameters() if param.ndim > 1]  # Trainer's rule, roughly
    for group in build_param_groups(model, 1e-4, 0.01, decay, learning_rates):
        print(f"  {group['name']:<46} lr {group['lr']:.0e}  weight_decay {group['weight_decay']:<5}"
              f"{sum(param.numel() for param in group['params']):>9,} parameters")
    try:
        build_param_groups(model, 1e-4, 0.01, decay, {"vlm.visual": 1e-5})
    except ValueError as err:
        print("a misspelt path fails loudly:", str(err).split(". ")[0])
