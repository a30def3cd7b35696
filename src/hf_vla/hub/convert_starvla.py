"""Convert a StarVLA training run into an hf_vla model directory (`hf-vla convert-starvla RUN_DIR OUT_DIR`).

A StarVLA run directory holds `config.yaml` (OmegaConf YAML), `dataset_statistics.json` and flat state-dict
checkpoints (`checkpoints/steps_N_pytorch_model.pt` or `steps_N_model.safetensors`, `final_model/pytorch_model.pt`).
The converter

1. maps `framework.name` to a variant (QwenOFT → oft, QwenGR00T → gr00t, QwenPI and its alias QwenFM → pi,
   QwenPI_v3 → pi_v3, QwenFast → fast) and `framework.qwenvl.base_vlm` to a backbone family by substring;
2. builds the variant's config on the base VLM's config (embedding rows taken from the checkpoint) from the run's
   `framework.action_model` and `datasets.vla_data` fields, deciding the flow heads' attention mode;
3. renames every checkpoint key (`qwen_vl_interface.model.` → `vlm.`, `action_model.` → `action_head.`, ...;
   DDP's `module.` and torch.compile's `_orig_mod.` prefixes removed first) and
   refuses, with a report of missing / unexpected / mis-shaped keys, unless the checkpoint fills the model exactly;
4. writes `save_pretrained` of the model and of a `VLAProcessor` (StarVLA's prompt, cameras, image size, and the
   statistics with explicit per-dimension normalisation modes), plus `conversion_report.json`.

A run trained on actions relative to the state (`datasets.vla_data.action_mode` delta / rel) is converted only with
an explicit `relative_actions` (one mode, or one per action dimension): StarVLA picks the relative dimensions by
modality key (`apply_keys`, `state_map`), which the run directory does not map to indices.

Reading a `.pt` checkpoint is the only place hf_vla unpickles anything, and it does so with `weights_only=True`.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml
from transformers import AutoConfig, AutoTokenizer

from ..auto import VARIANTS
from ..modeling_vla import base_vlm_reference
from ..models.flow_matching_config import CONDITION_MASKS
from ..normalization import (
    ACTION_MODES, NORM_MODES, STAT_NAMES, compact_action_mode, describe_action_mode, expand_action_modes, is_relative
)
from ..processing_vla import VLAProcessor

FRAMEWORKS = {
    "QwenOFT": "oft", "QwenGR00T": "gr00t", "QwenPI": "pi", "QwenFM": "pi", "QwenPI_v3": "pi_v3", "QwenFast": "fast",
}  # fmt: skip
BACKBONES = (("Qwen2.5-VL", "qwen2_5_vl"), ("nora", "qwen2_5_vl"), ("Qwen3-VL", "qwen3_vl"))
FLOW_VARIANTS = ("gr00t", "pi", "pi_v3")
OFT_PLACEHOLDER = "🔍"
GR00T_DIT_TYPES = {
    "DiT-B": {"input_embedding_dim": 768, "attention_head_dim": 64, "num_attention_heads": 12},
    "DiT-L": {"input_embedding_dim": 1536, "attention_head_dim": 48, "num_attention_heads": 32},
}
LAYERWISE_FIX_DATE = "2026-06-16"  # StarVLA PR #373: before it, layer-wise heads cross-attend in every block
# By StarVLA PRs #434/#435 every flow head hands the prompt's padding mask to the DiT's cross-attention, in training
# and inference; before issue #330 (GR00T, 2026-05-13) and #184 (layer-wise) none did.
CONDITION_MASK_DATE = "2026-08-09"
LAYERWISE_MLP_HIDDEN = 1024  # QwenPI / QwenPI_v3 hard-code the width of their state encoder and action decoder
# Benchmark families whose StarVLA DataConfig is documented (starvla.md §5, §7; the LIBERO data registry's
# Libero4in1 / Libero4in1Q99 / OpenPILibero4in1 configs, gr00t_lerobot/data_config.py's OxeBridge / OxeRT1 configs),
# matched by substrings of data_mix, the first match winning. Modes are per dimension in the DataConfig's key order,
# which is the order of the statistics; a key the DataConfig gives no mode passes through raw ("identity").
# State keys: LIBERO x y z roll pitch yaw pad gripper (Libero4in1 transforms no state key), bridge the same,
# RT-1 x y z rx ry rz rw gripper.
OXE_STATE_MODES = ["q99"] * 7 + ["binary"]
KNOWN_MIXTURES = {
    "openpi_libero": {"cameras": ["primary", "wrist"], "action_modes": ["q99"] * 7, "state_modes": ["q99"] * 8},
    "libero+q99": {"cameras": ["primary", "wrist"], "action_modes": ["q99"] * 6 + ["identity"],
                   "state_modes": ["q99"] * 8},
    "libero": {"cameras": ["primary", "wrist"], "action_modes": ["min_max"] * 6 + ["identity"],
               "state_modes": ["identity"] * 8},
    "bridge": {"cameras": ["primary"], "state_modes": OXE_STATE_MODES},
    "rt_1": {"cameras": ["primary"], "state_modes": OXE_STATE_MODES},
    "fractal": {"cameras": ["primary"], "state_modes": OXE_STATE_MODES},
    "oxe": {"cameras": ["primary"]},
}  # fmt: skip
REPORT_NAME = "conversion_report.json"


class StarVLAConversionError(ValueError):
    """The run cannot be converted; `report` holds the details (missing / unexpected / mismatched keys)."""

    def __init__(self, message: str, report: dict | None = None):
        super().__init__(message)
        self.report = report or {}


def _get(tree: dict, dotted: str, default=None):
    for part in dotted.split("."):
        if not isinstance(tree, dict) or tree.get(part) is None:
            return default
        tree = tree[part]
    return tree


# ---------------------------------------------------------------------------------------------------- the run's files


@dataclass
class RunFiles:
    run_dir: Path | None
    config: Path
    statistics: Path
    checkpoint: Path


def step_checkpoints(run_dir: Path) -> list[tuple[int, bool, Path]]:
    """`checkpoints/steps_N_*` files as (N, is safetensors, path)."""
    steps = []
    for path in (run_dir / "checkpoints").glob("steps_*"):
        match = re.fullmatch(r"steps_(\d+)_(pytorch_model\.pt|model\.safetensors)", path.name)
        if match:
            steps.append((int(match[1]), path.suffix == ".safetensors", path))
    return steps


def find_checkpoint(run_dir: Path) -> Path:
    """`final_model/` (written when training ends) if present, else the highest `checkpoints/steps_N_*`."""
    for name in ("model.safetensors", "pytorch_model.pt"):
        if (run_dir / "final_model" / name).is_file():
            return run_dir / "final_model" / name
    steps = step_checkpoints(run_dir)
    if not steps:
        raise StarVLAConversionError(
            f"no checkpoint in {run_dir}: expected checkpoints/steps_N_pytorch_model.pt, "
            "checkpoints/steps_N_model.safetensors or final_model/pytorch_model.pt (or pass --checkpoint)"
        )
    return max(steps)[2]


def later_step_checkpoints(run_dir: Path, final_model: Path) -> list[str]:
    """`checkpoints/steps_N_*` files written after `final_model/`'s: a run resumed from that folder and stopped
    before its own end leaves its newer steps there."""
    written = final_model.stat().st_mtime
    return [path.name for _, _, path in sorted(step_checkpoints(run_dir)) if path.stat().st_mtime > written]


def locate_files(run_dir=None, config_path=None, statistics_path=None, checkpoint_path=None) -> RunFiles:
    # absolute, so that `.` (or a checkpoint named from inside checkpoints/) has parents and a name to date the run by,
    # and the report's sources say where the files were wherever it is read
    run_dir = Path(os.path.abspath(run_dir)) if run_dir is not None else None
    if run_dir is not None and run_dir.is_file():  # a checkpoint path, as StarVLA's from_pretrained takes
        checkpoint_path = checkpoint_path or run_dir
        run_dir = run_dir.parent if (run_dir.parent / "config.yaml").is_file() else run_dir.parent.parent
    found = {}
    for name, given, default in (("config", config_path, "config.yaml"),
                                 ("statistics", statistics_path, "dataset_statistics.json")):  # fmt: skip
        if given is None and run_dir is None:
            raise StarVLAConversionError(f"no run directory and no --{name} file given")
        found[name] = Path(os.path.abspath(given)) if given is not None else run_dir / default
        if not found[name].is_file():
            raise StarVLAConversionError(f"{name} file not found: {found[name]}")
    if checkpoint_path is None and run_dir is None:
        raise StarVLAConversionError("no run directory and no --checkpoint file given")
    checkpoint = Path(os.path.abspath(checkpoint_path)) if checkpoint_path is not None else find_checkpoint(run_dir)
    return RunFiles(run_dir, found["config"], found["statistics"], checkpoint)


def read_mapping(path: Path, parse) -> dict:
    """config.yaml / dataset_statistics.json as a dict (empty for an empty file), or the parser's own message."""
    try:
        tree = parse(path.read_text(encoding="utf-8"))
    except (ValueError, yaml.YAMLError) as error:  # json.JSONDecodeError (and a bad encoding) is a ValueError
        mark = getattr(error, "problem_mark", None)  # YAML's message spans lines; its problem and place suffice
        detail = f"{error.problem}, line {mark.line + 1} column {mark.column + 1}" if mark else str(error)
        raise StarVLAConversionError(f"{path}: not readable ({type(error).__name__}: {detail})") from error
    if tree is None:
        return {}
    if not isinstance(tree, dict):
        raise StarVLAConversionError(f"{path}: expected a mapping at the top level, got {type(tree).__name__}")
    return tree


def load_checkpoint(path: Path) -> dict[str, torch.Tensor]:
    if not Path(path).is_file():
        raise StarVLAConversionError(f"checkpoint file not found: {path}")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # a truncated or foreign file: its own loader's message, without the traceback
        raise StarVLAConversionError(f"{path}: not a readable checkpoint ({type(error).__name__}: "
                                     f"{str(error).splitlines()[0] if str(error) else ''})") from error
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise StarVLAConversionError(f"{path}: expected a flat state dict of tensors (StarVLA's checkpoint format)")
    return state


def unwrap_keys(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], list[str]]:
    """`state` without the wrappers' key prefixes, and the prefixes removed: torch.compile's `_orig_mod.` (before
    the keys of the compiled module, which may be a submodule) and DDP / DeepSpeed's `module.` (before every key)."""
    removed = []
    if any(re.search(r"(^|\.)_orig_mod\.", k) for k in state):
        state, removed = {re.sub(r"(^|\.)_orig_mod\.", r"\1", k): v for k, v in state.items()}, ["_orig_mod."]
    if state and all(k.startswith("module.") for k in state):
        state, removed = {k[len("module."):]: v for k, v in state.items()}, ["module.", *removed]
    return state, removed


# ---------------------------------------------------------------------------------------------------- key mapping

VLM_KEY_RULES = (
    ("qwen_vl_interface.model.lm_head.", "vlm.lm_head."),
    ("qwen_vl_interface.model.model.visual.", "vlm.model.visual."),
    ("qwen_vl_interface.model.model.language_model.", "vlm.model.language_model."),
    # transformers < 4.52 layout of Qwen2.5-VL: the vision tower beside the decoder, decoder layers directly in model
    ("qwen_vl_interface.model.visual.", "vlm.model.visual."),
    ("qwen_vl_interface.model.model.", "vlm.model.language_model."),
)


def map_key(key: str, variant: str) -> str | None:
    """StarVLA's name of a parameter → hf_vla's, or None when it has no place in the variant."""
    for old, new in VLM_KEY_RULES:
        if key.startswith(old):
            return new + key[len(old):]
    if variant == "pi_v3" and key.startswith("project_layers."):  # StarVLA keeps them beside action_model
        return "action_head." + key
    prefix = {"oft": "action_model.model.", "gr00t": "action_model.", "pi": "action_model.", "pi_v3": "action_model."}
    if variant in prefix and key.startswith(prefix[variant]):
        return "action_head." + key[len(prefix[variant]):]
    return None


def _format_keys(title: str, keys: list[str], limit: int = 20) -> str:
    lines = [f"  {title} ({len(keys)}):"] + [f"    {k}" for k in keys[:limit]]
    if len(keys) > limit:
        lines.append(f"    ... and {len(keys) - limit} more")
    return "\n".join(lines)


def map_state_dict(state: dict, variant: str, expected: dict[str, tuple], tied: dict[str, str]) -> tuple[dict, dict]:
    """Renames `state` onto the model's keys (`expected`: name → shape; `tied`: tied name → its source); raises with
    a full report unless every key maps exactly."""
    mapped, sources, unexpected = {}, {}, []
    for key, tensor in state.items():
        new = map_key(key, variant)
        if new is None or new not in expected or new in mapped:
            unexpected.append(key)
        else:
            mapped[new], sources[new] = tensor, key
    # StarVLA saves tied embeddings under both names; the backbone re-ties them when it loads.
    duplicates = 0
    for target, source in tied.items():
        if target in mapped and source in mapped:
            if mapped[target].shape != mapped[source].shape:
                unexpected.append(f"{sources[target]} (tied to {sources[source]}, but of shape "
                                  f"{list(mapped[target].shape)} against {list(mapped[source].shape)})")
            elif not torch.equal(mapped[target], mapped[source]):
                unexpected.append(f"{sources[target]} (tied to {sources[source]}, but holds different values)")
            del mapped[target]
            duplicates += 1
    required = [k for k in expected if k not in tied]
    missing = [k for k in required if k not in mapped]
    mismatched = [
        f"{sources[k]} -> {k}: checkpoint {list(mapped[k].shape)}, model {list(expected[k])}"
        for k in required
        if k in mapped and tuple(mapped[k].shape) != tuple(expected[k])
    ]
    if missing or unexpected or mismatched:
        sections = (("missing (hf_vla names)", missing), ("unexpected (StarVLA names)", unexpected),
                    ("shape mismatches", mismatched))  # fmt: skip
        note = ""
        if any("lm_head" in line or "embed_tokens" in line for line in mismatched):
            note = "\n(the model's vocabulary size is the number of rows of the checkpoint's embed_tokens)"
        raise StarVLAConversionError(
            f"the checkpoint does not map exactly onto vla_{variant}; refusing to convert:\n"
            + "\n".join(_format_keys(title, keys) for title, keys in sections if keys) + note,
            {"missing": missing, "unexpected": unexpected, "mismatched": mismatched},
        )
    return mapped, {"checkpoint": len(state), "loaded": len(mapped), "tied_duplicates": duplicates}


# ---------------------------------------------------------------------------------------------------- decisions


def variant_for(framework: str | None) -> str:
    if framework not in FRAMEWORKS:
        raise StarVLAConversionError(f"unsupported framework {framework!r}: supported are {sorted(FRAMEWORKS)}")
    return FRAMEWORKS[framework]


def backbone_for(base_vlm: str | None) -> str | None:
    for needle, family in BACKBONES:
        if base_vlm and needle.lower() in base_vlm.lower():
            return family
    return None


def _run_date(config: dict, run_dir: Path | None) -> str | None:
    """A full date (YYYY-MM-DD) from a date field, the run id or the run directory's name."""
    texts = [str(config[k]) for k in ("run_date", "date", "created_at", "timestamp") if config.get(k)]
    texts += [str(config.get("run_id") or ""), run_dir.name if run_dir else ""]
    for text in texts:
        match = re.search(r"(?<!\d)(20[2-3]\d)[-_]?(0[1-9]|1[0-2])[-_]?(0[1-9]|[12]\d|3[01])(?!\d)", text)
        if match:
            return "-".join(match.groups())
    return None


def choose_attention_mode(variant: str, config: dict, run_dir: Path | None = None, override: bool | None = None):
    """`(interleave_self_attention, reason)` for the flow heads, `(None, reason)` otherwise.

    Layer-wise heads (PI, PI_v3) ignored `interleave_self_attention` before StarVLA PR #373 and cross-attended in
    every block; `use_canonical_forward` (False restores that forward) exists only in code after it. Without
    evidence that a run used the fixed code (that key, or a run date on/after the fix) the legacy all-cross forward
    is assumed, as every released checkpoint needs. GR00T's head always honoured the flag; when its config lacks
    the flag, `None` asks the caller to read it from the checkpoint's shapes.
    """
    if variant not in FLOW_VARIANTS:
        return None, "not a flow-matching head"
    if override is not None:
        return bool(override), "explicit argument"
    am = _get(config, "framework.action_model", {}) or {}
    settings = {**am, **(am.get("diffusion_model_cfg") or {})}
    flag, canonical = settings.get("interleave_self_attention"), settings.get("use_canonical_forward")
    if variant == "gr00t":
        if canonical is False:
            return False, "config: use_canonical_forward=false (all-cross forward)"
        if flag is None:
            return None, "config has no interleave_self_attention; read from the checkpoint's block shapes"
        return bool(flag), f"config: interleave_self_attention={str(bool(flag)).lower()}"
    if flag is False:
        return False, "config: interleave_self_attention=false (all-cross in every StarVLA version)"
    configured = True if flag else variant == "pi"  # unset: QwenPI interleaves, QwenPI_v3 (#434) does not
    if canonical is not None:
        return bool(canonical) and configured, f"config: use_canonical_forward={str(bool(canonical)).lower()}"
    date = _run_date(config, run_dir)
    if date is not None and date >= LAYERWISE_FIX_DATE:
        return configured, f"run date {date} is on/after PR #373 ({LAYERWISE_FIX_DATE}): the configured mode holds"
    if date is not None:
        return False, f"run date {date} is before PR #373 ({LAYERWISE_FIX_DATE}): legacy all-cross forward"
    return False, ("no use_canonical_forward and no run date: assuming a run from before PR #373 (legacy all-cross "
                   "forward); pass --attention-mode interleaved for a run trained with interleaving after it")


def choose_condition_mask(variant: str, config: dict, run_dir: Path | None = None, override: str | None = None):
    """`(condition_mask, reason)` for the flow heads, `(None, reason)` otherwise: whether the DiT's cross-attention
    ignores the prompt's left padding ("always") or attends to it ("never"), as the StarVLA code that trained the
    run did. Only left-padded batches (several prompts of different lengths) are affected.

    Older StarVLA passed no mask to any flow head (issues #184, #330); current code passes it in training and
    inference. The change landed between 2026-05 and 2026-08-09 (PRs #434/#435): a run dated on/after that date is
    masked, an earlier or undated one is taken as unmasked (as released checkpoints are), unless overridden.
    """
    if variant not in FLOW_VARIANTS:
        return None, "not a flow-matching head"
    if override is not None:
        if override not in CONDITION_MASKS:
            raise StarVLAConversionError(f"condition_mask: expected one of {CONDITION_MASKS}, got {override!r}")
        return override, "explicit argument"
    date = _run_date(config, run_dir)
    if date is not None and date >= CONDITION_MASK_DATE:
        return "always", f"run date {date} is on/after {CONDITION_MASK_DATE}: StarVLA masks prompt padding"
    when = f"run date {date} is before {CONDITION_MASK_DATE}" if date else "no run date"
    return "never", (f"{when}: assuming StarVLA code that attends to prompt padding (before its masking fix); pass "
                     "--condition-mask always for a run trained with the masking code")


def _parse_modes(modes, dim: int, field: str) -> list[str]:
    modes = [m.strip() for m in modes.split(",")] if isinstance(modes, str) else list(modes)
    if len(modes) == 1:
        modes = modes * dim
    if len(modes) != dim or not set(modes) <= set(NORM_MODES):
        raise StarVLAConversionError(
            f"{field}: expected one mode or {dim} comma-separated modes from {list(NORM_MODES)}, got {modes}"
        )
    return modes


def _known_mixture(config: dict) -> tuple[str | None, dict]:
    data_mix = str(_get(config, "datasets.vla_data.data_mix", "")).lower()
    for name, facts in KNOWN_MIXTURES.items():
        if all(part in data_mix for part in name.split("+")):
            return name, facts
    return None, {}


def _known_modes(feature: str, dim: int, config: dict, override=None) -> tuple[list[str] | None, str | None]:
    """`feature`'s modes from an explicit argument or the data_mix's known DataConfig, else `(None, None)`."""
    if override is not None:
        return _parse_modes(override, dim, f"{feature}_modes"), "explicit argument"
    name, facts = _known_mixture(config)
    if len(facts.get(f"{feature}_modes", [])) == dim:
        return list(facts[f"{feature}_modes"]), f"data_mix matches {name!r} (StarVLA's {name} DataConfig)"
    return None, None


def choose_relative_actions(config: dict, action_dim: int, override=None) -> tuple[str | list[str], str]:
    """How the checkpoint's actions relate to the state (hf_vla's statistics `action_mode`): explicit, else the run's
    `datasets.vla_data.action_mode` when it is abs. A relative run is refused without an explicit value: hf_vla makes
    action dimension i absolute from state dimension i, and only the user knows how StarVLA's `apply_keys` and
    `state_map` (modality keys of the dataset) line up with that."""
    run_mode = _get(config, "datasets.vla_data.action_mode") or "abs"
    if run_mode not in ACTION_MODES:
        raise StarVLAConversionError(f"datasets.vla_data.action_mode: expected one of {list(ACTION_MODES)}, got "
                                     f"{run_mode!r}")
    if override is not None:
        modes = [m.strip() for m in override.split(",")] if isinstance(override, str) else list(override)
        try:
            modes = expand_action_modes(modes[0] if len(modes) == 1 else modes, action_dim, "relative_actions")
        except ValueError as err:
            raise StarVLAConversionError(str(err)) from None
        other = sorted({m for m in modes if m not in ("abs", run_mode)})
        if other:  # "rel" decodes a + s_0, "delta" s_0 + cumsum(a): only the run's own kind gives its actions back
            raise StarVLAConversionError(f"relative_actions: expected 'abs' or the run's {run_mode!r} "
                                         f"(datasets.vla_data.action_mode) per dimension, got {other}")
        return compact_action_mode(modes), "explicit argument"
    if run_mode == "abs":
        return "abs", "datasets.vla_data.action_mode"
    apply_keys = _get(config, "datasets.vla_data.apply_keys")
    raise StarVLAConversionError(
        f"datasets.vla_data.action_mode is {run_mode!r}: the checkpoint predicts actions relative to the state"
        + (f" on the keys {apply_keys}" if apply_keys else "") + ". Say which action dimensions are relative with "
        f"--relative-actions: one of {list(ACTION_MODES)}, or one per action dimension ({action_dim}), e.g. "
        f"{','.join([run_mode] * (action_dim - 1) + ['abs'])} for a gripper kept absolute. hf_vla adds state "
        "dimension i back to action dimension i, so the state you pass must be laid out to match."
    )


def choose_action_modes(action_stats: dict, config: dict, override=None) -> tuple[list[str], str]:
    """Per-dimension action modes: explicit > the documented LIBERO DataConfig > StarVLA's mask (True → q99,
    False → binary: StarVLA sets mask=False exactly on its binary-mode dimensions, e.g. OXE grippers)."""
    dim = len(action_stats["q01"])
    modes, source = _known_modes("action", dim, config, override)
    if modes is not None:
        return modes, source
    mask = action_stats.get("mask") or [True] * dim
    return ["q99" if m else "binary" for m in mask], "statistics mask (True → q99, False → binary)"


def choose_state_modes(state_stats: dict, config: dict, override=None) -> tuple[list[str], str]:
    """Per-dimension state modes: explicit > the data_mix's documented DataConfig > q99.

    StarVLA's dataloader normalises the state with the DataConfig's transform (LIBERO's default config leaves it
    raw) and every framework takes it as given. dataset_statistics.json keeps no state modes and no state mask, so
    an unknown DataConfig gets q99: the mode of the state-normalising benchmark configs, and bounded to [-1, 1].
    """
    dim = len(state_stats["q01"])
    modes, source = _known_modes("state", dim, config, override)
    if modes is None:
        modes, source = ["q99"] * dim, ("default q99 (StarVLA records no state modes and no known DataConfig of this "
                                        "width matches the data_mix; pass --state-modes if the run's DataConfig used "
                                        "others)")
    # StarVLA's q99 passes a constant dimension (q01 == q99) through raw where hf_vla's maps it to 0
    constant = [low == high for low, high in zip(state_stats["q01"], state_stats.get("q99", [None] * dim))]
    if any(mode == "q99" and same for mode, same in zip(modes, constant)):
        modes = ["identity" if mode == "q99" and same else mode for mode, same in zip(modes, constant)]
        source += "; q99 on a constant dimension (q01 == q99) → identity, which keeps its raw value as StarVLA does"
    return modes, source


def choose_cameras(config: dict, override=None) -> tuple[list[str], str]:
    if override:
        return ([override] if isinstance(override, str) else list(override)), "explicit argument"
    observed = _get(config, "datasets.vla_data.obs")
    if isinstance(observed, list) and observed:
        return [str(v) for v in observed], "config: datasets.vla_data.obs"
    name, facts = _known_mixture(config)
    if "cameras" in facts:
        return list(facts["cameras"]), f"data_mix matches {name!r}"
    return ["primary"], "default (one camera)"


def prompt_template_for(config: dict) -> str:
    # StarVLA substitutes the instruction into CoT_prompt when it has the key, and sends the raw instruction otherwise.
    prompt = _get(config, "datasets.vla_data.CoT_prompt")
    return prompt if isinstance(prompt, str) and "{instruction}" in prompt else "{instruction}"


def image_size_for(config: dict) -> list[int]:
    """`[height, width]` every view is resized to. StarVLA resizes at inference to `obs_image_size` — a PIL size,
    (width, height) — read from `framework` (QwenGR00T) or `datasets.vla_data` (the others); without one it sends the
    frames as they come, but its training dataloader resized every view to 224 × 224, so that is the size used here
    (older runs record `default_image_resolution` as [3, H, W])."""
    vla_data = _get(config, "datasets.vla_data", {})
    pil_size = _get(config, "framework.obs_image_size") or vla_data.get("obs_image_size")
    if pil_size:
        pil_size = [int(s) for s in pil_size]
        return pil_size * 2 if len(pil_size) == 1 else pil_size[::-1]
    resolution = vla_data.get("default_image_resolution")
    return [int(s) for s in resolution][-2:] if resolution else [224, 224]


# ---------------------------------------------------------------------------------------------------- config


def head_fields(variant: str, config: dict, text_config, state: dict[str, torch.Tensor],
                statistics: dict | None = None) -> dict:  # fmt: skip
    """Our config fields from StarVLA's `framework.action_model` and the per-framework constants (starvla.md §1)."""
    am = _get(config, "framework.action_model", {}) or {}
    dcfg = am.get("diffusion_model_cfg") or {}
    window = am.get("future_action_window_size")
    # neither given: the framework class's own default (QwenGR00T 8; the others a 15-step window, i.e. 16)
    horizon = am.get("action_horizon") or (window + 1 if window is not None else (8 if variant == "gr00t" else 16))
    fields = {"action_dim": int(am.get("action_dim") or 7), "action_horizon": int(horizon)}
    if variant == "oft":  # the state only reaches OFT as prompt text, and only when the run fed it
        include_state = bool(_get(config, "datasets.vla_data.include_state", False))
        state_dim = int(am.get("state_dim") or 0)
        if include_state and not state_dim:  # QwenOFT never reads state_dim itself: the statistics know it
            widths = {len(s["state"]["q01"]) for s in (statistics or {}).values()
                      if isinstance(s, dict) and isinstance(s.get("state"), dict) and "q01" in s["state"]}  # fmt: skip
            if len(widths) != 1:
                raise StarVLAConversionError(
                    "framework.action_model.state_dim: the run fed the state (datasets.vla_data.include_state) but "
                    f"neither its config nor dataset_statistics.json gives one state width (found {sorted(widths)})")
            state_dim = widths.pop()
        fields["state_dim"] = state_dim if include_state else 0
    if variant not in FLOW_VARIANTS:
        return fields
    if int(am.get("num_timestep_buckets") or 1000) != 1000:
        raise StarVLAConversionError(f"num_timestep_buckets={am['num_timestep_buckets']}: hf_vla's flow heads use 1000")
    encoder = state.get("action_model.state_encoder.layer1.weight")  # config silent: the checkpoint tells
    state_dim = am.get("state_dim") if am.get("state_dim") is not None else 0 if encoder is None else encoder.shape[1]
    fields.update(
        state_dim=int(state_dim),
        num_inference_steps=int(am.get("num_inference_timesteps") or 4),
        num_future_tokens=int(am.get("num_target_vision_tokens") or 32),
        max_seq_len=int(am.get("max_seq_len") or 1024),
        time_beta_alpha=float(am.get("noise_beta_alpha") or 1.5),
        time_beta_beta=float(am.get("noise_beta_beta") or 1.0),
        time_noise_s=float(am.get("noise_s") or 0.999),
        dropout=float(dcfg.get("dropout", 0.2)),
        final_dropout=bool(dcfg.get("final_dropout", True)),
    )  # fmt: skip
    if variant == "gr00t":
        # StarVLA merges its DiT-type table under diffusion_model_cfg, which may override any of the three sizes.
        dims = {**GR00T_DIT_TYPES.get(am.get("action_model_type"), {}),
                **{k: dcfg[k] for k in GR00T_DIT_TYPES["DiT-B"] if k in dcfg}}  # fmt: skip
        if not {"num_attention_heads", "attention_head_dim"} <= set(dims):
            raise StarVLAConversionError(
                f"action_model_type {am.get('action_model_type')!r}: expected one of {sorted(GR00T_DIT_TYPES)}"
            )
        width = int(dims["num_attention_heads"]) * int(dims["attention_head_dim"])
        if int(dims.get("input_embedding_dim", width)) != width:
            raise StarVLAConversionError(f"diffusion_model_cfg: input_embedding_dim {dims['input_embedding_dim']} "
                                         f"!= num_attention_heads x attention_head_dim = {width}")  # fmt: skip
        return {
            **fields, "dit_hidden_size": width, "attention_head_dim": int(dims["attention_head_dim"]),
            "num_dit_layers": int(dcfg.get("num_layers", 16)),
            "dit_output_dim": int(dcfg.get("output_dim") or am.get("hidden_size") or 1024),
            "head_hidden_size": int(am.get("hidden_size") or 1024),
            "repeated_diffusion_steps": int(am.get("repeated_diffusion_steps") or 8),
        }  # fmt: skip
    for name, ours in (("vl_hidden_dim", text_config.hidden_size), ("num_vl_layers", text_config.num_hidden_layers)):
        theirs = _get(config, f"framework.qwenvl.{name}")
        if theirs not in (None, ours):
            raise StarVLAConversionError(f"framework.qwenvl.{name}={theirs}, but the base VLM has {ours}")
    fields.update(dit_output_dim=int(dcfg.get("output_dim") or 26), head_hidden_size=LAYERWISE_MLP_HIDDEN)
    if variant == "pi":  # D = the VLM width in heads of 64; QwenPI hard-codes 2 repeated diffusion steps
        return {**fields, "attention_head_dim": 64, "repeated_diffusion_steps": 2}
    width = int(dcfg.get("action_dit_hidden_dim") or am.get("action_dit_hidden_dim") or 1024)
    if width % 16:
        raise StarVLAConversionError(f"action_dit_hidden_dim={width}: QwenPI_v3 uses 16 heads, so it must divide by 16")
    # QwenPI_v3 reads its repeats from trainer.*, not from action_model.*
    repeats = int(_get(config, "trainer.repeated_diffusion_steps") or 16)
    return {**fields, "dit_hidden_size": width, "attention_head_dim": width // 16, "repeated_diffusion_steps": repeats}


def _load_base_config(base_vlm: str):
    try:
        return AutoConfig.from_pretrained(base_vlm)
    except Exception as err:  # noqa: BLE001 - every loading failure gets the same advice
        name = Path(base_vlm.rstrip("/")).name
        hint = f"StarVLA/{name}" if name.endswith("-Action") else f"Qwen/{name}"
        raise StarVLAConversionError(
            f"could not load the base VLM config from {base_vlm!r} ({type(err).__name__}: {err}). StarVLA records a "
            f"local path; pass --base-vlm with a local copy or a hub id such as {hint}"
        ) from err


def build_config(variant: str, config: dict, state: dict, base_vlm: str, run_dir: Path | None, interleave=None,
                 statistics: dict | None = None, condition_mask: str | None = None):  # fmt: skip
    """The variant's config on the base VLM's, and what the report says about the choices."""
    configured_vlm = _get(config, "framework.qwenvl.base_vlm")
    vlm_config = _load_base_config(base_vlm)
    family = backbone_for(configured_vlm) or backbone_for(base_vlm)
    if vlm_config.model_type not in ("qwen2_5_vl", "qwen3_vl") or family not in (None, vlm_config.model_type):
        raise StarVLAConversionError(
            f"backbone: the run's base_vlm {configured_vlm!r} names {family or 'an unsupported family'}, the VLM at "
            f"{base_vlm!r} is {vlm_config.model_type!r}; supported: Qwen2.5-VL, Qwen3-VL"
        )
    text_config = vlm_config.get_text_config()
    # -Action models (QwenFast) carry 2048 more embedding rows than their base: the checkpoint decides.
    names = ("qwen_vl_interface.model.model.language_model.embed_tokens.weight",
             "qwen_vl_interface.model.model.embed_tokens.weight")  # fmt: skip
    embeddings = next((state[k] for k in names if k in state), None)
    vocab = {"base": int(text_config.vocab_size), "checkpoint": None if embeddings is None else embeddings.shape[0]}
    if embeddings is not None:
        text_config.vocab_size = int(embeddings.shape[0])

    fields = head_fields(variant, config, text_config, state, statistics)
    fields.update(prompt_template=prompt_template_for(config), base_vlm=base_vlm_reference(base_vlm))
    interleave, reason = choose_attention_mode(variant, config, run_dir, interleave)
    if variant == "gr00t" and interleave is None:  # odd blocks attend to themselves iff their k/v width is D
        odd = state.get("action_model.model.transformer_blocks.1.attn1.to_k.weight")
        interleave = odd is not None and odd.shape[1] == fields["dit_hidden_size"] != text_config.hidden_size
    if interleave is not None:
        fields["interleave_self_attention"] = interleave
    condition_mask, mask_reason = choose_condition_mask(variant, config, run_dir, condition_mask)
    if condition_mask is not None:
        fields["condition_mask"] = condition_mask

    config_class, model_class = VARIANTS[f"vla_{variant}"]
    if variant in ("oft", "fast"):
        tokenizer = AutoTokenizer.from_pretrained(base_vlm)
        if variant == "oft":
            ids = tokenizer.encode(OFT_PLACEHOLDER, add_special_tokens=False)
            if len(ids) != 1:
                raise StarVLAConversionError(
                    f"QwenOFT's placeholder {OFT_PLACEHOLDER!r} is {len(ids)} tokens {ids} under the tokenizer of "
                    f"{base_vlm!r}; the run used it as one token, so this tokenizer cannot reproduce its prompts"
                )
            fields["action_token"] = OFT_PLACEHOLDER
        fields = model_class.config_kwargs_from_tokenizer(tokenizer, fields)
    if variant == "fast":
        end = fields["action_token_offset"] + fields.get("num_action_tokens", 2048)
        if end > text_config.vocab_size:
            raise StarVLAConversionError(
                f"QwenFast: the action tokens end at id {end}, but the checkpoint has {text_config.vocab_size} "
                "embedding rows; pass the -Action base VLM the run was trained from"
            )
    attention = None if interleave is None else ("interleaved" if interleave else "all_cross")
    info = {"backbone": vlm_config.model_type, "vocab_rows": vocab, "attention_mode": attention,
            "attention_mode_reason": reason, "condition_mask": condition_mask, "condition_mask_reason": mask_reason,
            "config_fields": {k: v for k, v in fields.items() if k != "base_vlm"}}
    return config_class(vlm_config=vlm_config, **fields), info


# ---------------------------------------------------------------------------------------------------- model, processor


def _resolve_dtype(dtype, state: dict[str, torch.Tensor]) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype:
        resolved = getattr(torch, str(dtype).removeprefix("torch."), None)
        if not isinstance(resolved, torch.dtype) or not resolved.is_floating_point:
            raise StarVLAConversionError(f"dtype: expected a floating-point torch dtype, got {dtype!r}")
        return resolved
    counts = Counter(t.dtype for t in state.values() if t.is_floating_point())
    return counts.most_common(1)[0][0] if counts else torch.float32


def build_model(model_class, config, state: dict, variant: str, dtype: torch.dtype):
    """Checks the keys on a meta-device skeleton, then loads the backbone through its own `from_pretrained` (buffers,
    tied weights) and every other child strictly."""
    with torch.device("meta"):
        model = model_class(config)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    mapped, counts = map_state_dict(state, variant, expected, dict(model.all_tied_weights_keys or {}))
    vlm_state = {k[len("vlm."):]: v for k, v in mapped.items() if k.startswith("vlm.")}
    vlm, info = type(model.vlm).from_pretrained(
        None, config=config.vlm_config, state_dict=vlm_state, dtype=dtype, output_loading_info=True
    )
    problems = {k: v for k, v in info.items() if v and k in ("missing_keys", "unexpected_keys", "mismatched_keys")}
    if problems:
        raise StarVLAConversionError(f"the backbone did not load cleanly: {problems}")
    model.vlm = vlm
    for name, child in model.named_children():
        if name != "vlm":
            child.to_empty(device="cpu")
            child.load_state_dict({k[len(name) + 1:]: v for k, v in mapped.items() if k.startswith(name + ".")})
            child.to(dtype)
    return model.eval(), counts


def build_processor(base_vlm: str, model_config, config: dict, statistics: dict, action_modes=None,
                    state_modes=None, cameras=None, relative_actions=None) -> tuple[VLAProcessor, dict, list[str]]:
    """StarVLA's prompt, cameras and image size; its statistics with explicit per-dimension modes."""
    camera_names, cameras_source = choose_cameras(config, cameras)
    try:
        processor = VLAProcessor.from_vlm(
            base_vlm, model_config, camera_names=camera_names, image_size=image_size_for(config)
        )
    except ValueError as err:  # e.g. a camera named twice
        raise StarVLAConversionError(str(err)) from err
    state_dim, modes, notes, action_source, state_source = model_config.state_dim, {}, [], None, None
    relative, relative_source = choose_relative_actions(config, model_config.action_dim, relative_actions)
    for key, stats in statistics.items():
        if not isinstance(stats, dict) or "action" not in stats:
            continue
        for feature in ("action", "state") if stats.get("state") and state_dim else ("action",):
            missing = [k for k in STAT_NAMES if k not in stats[feature]]
            if missing:
                raise StarVLAConversionError(f"dataset_statistics.json: {key}.{feature}: missing {missing}")
        action_mode, action_source = choose_action_modes(stats["action"], config, action_modes)
        entry = {"action": {**{k: stats["action"][k] for k in STAT_NAMES}, "mode": action_mode}}
        entry.update({k: stats[k] for k in ("num_transitions", "num_trajectories") if k in stats})
        if is_relative(relative):
            entry["action_mode"] = relative
        if stats.get("state") and state_dim:
            if len(stats["state"]["q01"]) == state_dim:
                state_mode, state_source = choose_state_modes(stats["state"], config, state_modes)
                entry["state"] = {**{k: stats["state"][k] for k in STAT_NAMES}, "mode": state_mode}
            else:
                notes.append(f"{key}: the state statistics have {len(stats['state']['q01'])} dimensions, the model "
                             f"{state_dim}; they are not stored")  # fmt: skip
        try:
            processor.set_norm_stats(key, entry)
        except ValueError as err:
            raise StarVLAConversionError(f"dataset_statistics.json: {err}") from err
        modes[key] = {"action": action_mode, "state": entry.get("state", {}).get("mode")}
    if sum(mode["state"] is not None for mode in modes.values()) > 1:
        notes.append("several embodiments with state: StarVLA writes each one's state statistics in the order its "
                     "keys first appear across the mixture (bridge_rt_1: oxe_rt1's gripper comes 4th, its state "
                     "vector has it last); check each entry's order against the state you pass")  # fmt: skip
    if not modes:  # the processor could not decode a single action
        raise StarVLAConversionError(f"dataset_statistics.json: no entry has 'action' statistics (keys: "
                                     f"{sorted(statistics)[:10]})")
    if is_relative(relative):
        notes.append(f"actions {describe_action_mode(relative)} relative to the state: VLAPolicy.predict and "
                     "decode_actions(..., state=...) make them absolute from the raw state, dimension i to dimension i")
    info = {"cameras": camera_names, "cameras_source": cameras_source, "image_size": processor.image_size,
            "normalization_modes": modes, "action_modes_source": action_source,
            "state_modes_source": state_source, "action_mode": relative,
            "action_mode_source": relative_source}  # fmt: skip
    return processor, info, notes


# ---------------------------------------------------------------------------------------------------- entry points


def check_output_dir(out_dir: Path) -> None:
    # Written over, an earlier model's files that this conversion does not write (a FAST run's action_tokenizer/)
    # would stay beside it and be loaded with it.
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise StarVLAConversionError(f"{out_dir} exists and is not an empty folder; remove it or choose another output "
                                     "folder (a converted model is written into a new or empty one only)")


def convert_starvla(
    run_dir=None,
    out_dir=None,
    config_path=None,
    statistics_path=None,
    checkpoint_path=None,
    base_vlm=None,
    dtype=None,
    *,
    action_modes=None,
    state_modes=None,
    cameras=None,
    interleave_self_attention: bool | None = None,
    condition_mask: str | None = None,
    fast_tokenizer=None,
    relative_actions=None,
) -> Path:
    """Converts a StarVLA run into an hf_vla model directory at `out_dir` (a new or empty folder) and returns its path.

    Args:
        run_dir: the StarVLA run directory, or a checkpoint file inside it (as StarVLA's `from_pretrained` takes).
        config_path / statistics_path / checkpoint_path: explicit files, overriding those found in `run_dir`.
        base_vlm: local directory or hub id of the base VLM (default: the config's `framework.qwenvl.base_vlm`);
            its config gives the backbone skeleton, its tokenizer and image processor the processor.
        dtype: weights dtype (default: the checkpoint's).
        action_modes / state_modes: one normalisation mode or one per dimension (list or comma-separated string);
            see `choose_action_modes` / `choose_state_modes` for the defaults.
        cameras: camera names in prompt order (default: see `choose_cameras`).
        interleave_self_attention: force the flow head's attention mode (default: see `choose_attention_mode`).
        condition_mask: force whether the flow head masks prompt padding, "always" / "training" / "never" (default:
            see `choose_condition_mask`).
        fast_tokenizer: FAST tokenizer (object, directory or hub id) to attach to a QwenFast conversion.
        relative_actions: for a run trained on relative actions (`datasets.vla_data.action_mode` delta / rel), which
            action dimensions are relative: one mode or one per dimension (list or comma-separated string), see
            `choose_relative_actions`.
    """
    if out_dir is None:
        raise StarVLAConversionError("out_dir is required")
    check_output_dir(Path(out_dir))
    files = locate_files(run_dir, config_path, statistics_path, checkpoint_path)
    config = read_mapping(files.config, yaml.safe_load)
    statistics = read_mapping(files.statistics, json.loads)
    framework = _get(config, "framework.name") or _get(config, "framework.framework_py")
    variant = variant_for(framework)
    base_vlm = str(base_vlm or _get(config, "framework.qwenvl.base_vlm") or "")
    if not base_vlm:
        raise StarVLAConversionError("config.yaml has no framework.qwenvl.base_vlm; pass --base-vlm")
    state, prefixes = unwrap_keys(load_checkpoint(files.checkpoint))
    later = []
    chosen_here = checkpoint_path is None and not Path(run_dir).is_file()  # not named by --checkpoint or as the run
    if chosen_here and files.checkpoint.parent.name == "final_model":
        later = later_step_checkpoints(files.run_dir, files.checkpoint)

    model_config, config_info = build_config(variant, config, state, base_vlm, files.run_dir, interleave_self_attention,
                                             statistics, condition_mask)  # fmt: skip
    # the statistics are checked before the weights are built into a model: minutes at 3B
    processor, processor_info, notes = build_processor(
        base_vlm, model_config, config, statistics, action_modes, state_modes, cameras, relative_actions
    )
    torch_dtype = _resolve_dtype(dtype, state)
    model, key_counts = build_model(VARIANTS[f"vla_{variant}"][1], model_config, state, variant, torch_dtype)
    include_state = bool(_get(config, "datasets.vla_data.include_state", False))
    if later:
        notes.append(f"checkpoints/ holds steps written after final_model/ ({', '.join(later)}); final_model/ was "
                     "converted, pass --checkpoint to convert one of those instead")  # fmt: skip
    if prefixes:
        notes.append(f"the checkpoint's keys carried the wrapper prefixes {prefixes} (DDP / DeepSpeed 'module.', "
                     "torch.compile '_orig_mod.'); they were removed")
    if variant == "fast":
        if fast_tokenizer is not None:
            try:
                model.set_action_tokenizer(fast_tokenizer)
            except (OSError, ValueError) as err:  # not found, or fitted for another horizon / width / vocabulary
                raise StarVLAConversionError(f"fast_tokenizer: {err}") from err
        else:
            notes.append("no FAST tokenizer attached: attach StarVLA's universal one (physical-intelligence/fast) "
                         "with model.set_action_tokenizer(...) before decoding actions")  # fmt: skip
    if model.config.state_dim and not include_state:
        notes.append("datasets.vla_data.include_state is not set: the run was trained without state, so pass none")
    if any("q99" in feature for entry in processor_info["normalization_modes"].values() for feature in entry.values()
           if feature):  # fmt: skip
        notes.append("q99: StarVLA clamps normalised values to [-2.2, 2.2], hf_vla to [-1, 1]")

    out_dir = Path(out_dir)
    model.save_pretrained(out_dir)
    processor.save_pretrained(out_dir)
    report = {
        "framework": framework, "variant": variant, "model_type": f"vla_{variant}", "base_vlm": base_vlm,
        "version_id": config.get("version_id"),
        "sources": {"run_dir": str(files.run_dir) if files.run_dir else None, "config": str(files.config),
                    "statistics": str(files.statistics), "checkpoint": str(files.checkpoint)},
        "dtype": str(torch_dtype).removeprefix("torch."), **config_info, "keys": key_counts,
        "include_state": include_state, **processor_info, "notes": notes,
    }  # fmt: skip
    (out_dir / REPORT_NAME).write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n")
    return out_dir


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="hf-vla convert-starvla", description="StarVLA run → hf_vla model dir")
    parser.add_argument("run_dir", help="StarVLA run directory (or a checkpoint file inside it)")
    parser.add_argument("out_dir", help="output model directory (new or empty; a non-empty one is refused)")
    parser.add_argument("--config", help="config.yaml (default: RUN_DIR/config.yaml)")
    parser.add_argument("--statistics", help="dataset_statistics.json (default: RUN_DIR/dataset_statistics.json)")
    parser.add_argument("--checkpoint", help=".pt or .safetensors state dict (default: RUN_DIR/final_model/, else "
                        "the highest checkpoints/steps_N)")
    parser.add_argument("--base-vlm", help="local directory or hub id of the base VLM (default: the config's)")
    parser.add_argument("--dtype", help="weights dtype, e.g. bfloat16 (default: the checkpoint's)")
    parser.add_argument("--action-modes", help=f"one mode, or one per dimension comma-separated, of {list(NORM_MODES)}")
    parser.add_argument("--state-modes", help="as --action-modes, for the state (default: the run's DataConfig "
                        "where known, else q99; q99 on a constant dimension becomes identity, as StarVLA keeps it raw)")
    parser.add_argument("--cameras", help="comma-separated camera names, in prompt order")
    parser.add_argument("--attention-mode", choices=("interleaved", "all-cross"), help="flow heads: force the mode")
    parser.add_argument("--condition-mask", choices=CONDITION_MASKS,
                        help="flow heads: force whether prompt padding is masked (default: from the run's date)")
    parser.add_argument("--fast-tokenizer", help="QwenFast: FAST tokenizer directory or hub id to attach")
    parser.add_argument("--relative-actions", help=f"a run trained on relative actions: one of {list(ACTION_MODES)}, "
                        "or one per action dimension comma-separated (e.g. delta,delta,delta,delta,delta,delta,abs)")
    args = parser.parse_args(argv)
    cameras = [name.strip() for name in args.cameras.split(",")] if args.cameras else None
    try:
        out = convert_starvla(
            args.run_dir, args.out_dir, config_path=args.config, statistics_path=args.statistics,
            checkpoint_path=args.checkpoint, base_vlm=args.base_vlm, dtype=args.dtype, action_modes=args.action_modes,
            state_modes=args.state_modes, cameras=cameras,
            interleave_self_attention=None if args.attention_mode is None else args.attention_mode == "interleaved",
            condition_mask=args.condition_mask, fast_tokenizer=args.fast_tokenizer,
            relative_actions=args.relative_actions,
        )  # fmt: skip
    except StarVLAConversionError as err:
        print(f"hf-vla convert-starvla: {err}", file=sys.stderr)  # as the other hf-vla commands report bad input
        return 1
    report = json.loads((out / REPORT_NAME).read_text(encoding="utf-8"))
    print(f"converted {report['framework']} -> {report['model_type']} ({report['backbone']}) into {out}")
    print(f"checkpoint: {report['sources']['checkpoint']}")
    if report["attention_mode"]:
        print(f"attention mode: {report['attention_mode']} ({report['attention_mode_reason']})")
    if report["condition_mask"]:
        print(f"condition mask: {report['condition_mask']} ({report['condition_mask_reason']})")
    if is_relative(report["action_mode"]):
        print(f"actions: {describe_action_mode(report['action_mode'])} relative to the state "
              f"({report['action_mode_source']})")
    for key, modes in report["normalization_modes"].items():
        state = f", state {modes['state']} ({report['state_modes_source']})" if modes["state"] else ""
        print(f"normalisation [{key}]: action {modes['action']} ({report['action_modes_source']}){state}")
    for note in report["notes"]:
        print(f"note: {note}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
