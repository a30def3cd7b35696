#!/usr/bin/env python
"""Train a VLA policy with transformers' Trainer from a YAML recipe (see trainers/README.md for launch commands).

    python trainers/train_vla.py trainers/recipes/oft.yaml [--section.key value ...]

Recipe sections (every key and its default: DEFAULTS below; trainers/recipes/ shows the common ones):
  model:   variant, vlm (hub id or path; null builds a tiny random backbone into <output_dir>/tiny_vlm), action_dim /
           state_dim (null: the dataset's), action_horizon, image_size, dtype, head (variant config fields),
           action_tokenizer / fast (FAST only: a saved FAST tokenizer, or how to fit one on the training actions)
  data:    lerobot (one path or a list) or mixture (a mixture YAML), or synthetic (a generated demo dataset when
           neither is given); cameras / camera_rename / camera_names, action_mode (one, or one per dimension),
           normalization, embodiment, eval_split; video_decoder (pyav | preload: decode each video once into RAM);
           augment ({random_shift: pixels}, training samples only); vlm_chat (+ chat_batch_size, chat_max_length) for
           co-training
  trainer: TrainingArguments fields, plus learning_rate (number or {base: ..., <module path>: ...}), freeze (module
           paths) and loss_scale ({vla, vlm})
  lora:    null (full fine-tuning) or hf_vla.training.add_lora's settings: r, alpha, dropout, target, train_head,
           train_embeddings (FAST, bins: the action tokens' rows of the embeddings and lm_head), modules_to_save;
           `--lora.r 16` turns it on, the keys left out take add_lora's defaults

The output directory ends up as a model directory ready to push: weights + config, processor files, and the
resolved recipe as training_recipe.yaml (beside Trainer's checkpoint-N folders, logs and metrics). A LoRA run trains
adapters on a base saved first into <output_dir>/lora_base (the built VLA: its head and action-token rows are new, so
the hub VLM is no base for them), keeps the adapter (+ processor) in <output_dir>/lora_adapter and writes the merged
model into the output directory itself; its checkpoint-N folders hold adapters.
"""

from __future__ import annotations

import dataclasses
import difflib
import inspect
import json
import logging
import os
import shutil
import socket
import sys
import types
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import transformers
from torch.utils.data import ConcatDataset, Dataset, Subset
from transformers import TrainerCallback, TrainingArguments, set_seed
from transformers.trainer_utils import get_last_checkpoint
from transformers.trainer import TRAINING_ARGS_NAME
from transformers.utils import ADAPTER_CONFIG_NAME

from hf_vla import AutoModelForVLA, VLAProcessor
from hf_vla.auto import VARIANTS
from hf_vla.data.augment import RandomShift
from hf_vla.data.collators import CoTrainingCollator, VLACollator
from hf_vla.data.lerobot import compute_union_stats, load_lerobot
from hf_vla.modeling_vla import config_field_names
from hf_vla.normalization import normalize
from hf_vla.training import VLATrainer
from hf_vla.training.lora import add_lora, trains_tied_token_rows
from hf_vla.training.recipe import dump_recipe, load_recipe, split_trainer_section

logger = logging.getLogger("train_vla")
RECIPE_FILE = "training_recipe.yaml"
BUILT_WITH_FILE = "hf_vla_built_with.json"  # the settings a generated folder (tiny backbone, synthetic data) was made with
LORA_BASE_DIR, LORA_ADAPTER_DIR = "lora_base", "lora_adapter"
# the lora section's keys: add_lora's settings, with its defaults (the base's path is the script's to set)
LORA_DEFAULTS = {name: parameter.default for name, parameter in inspect.signature(add_lora).parameters.items()
                 if parameter.default is not inspect.Parameter.empty and name != "base_model_name_or_path"}  # fmt: skip

DEFAULTS = {
    "model": {
        "variant": "oft",
        "vlm": None,
        "tiny_vlm": {"family": "qwen2_5_vl", "hidden_size": 64, "num_layers": 2},
        "action_dim": None,
        "action_horizon": 8,
        "state_dim": None,
        "image_size": [224, 224],
        "dtype": None,
        "head": {},
        "action_tokenizer": None,
        "fast": {"scale": 10.0, "vocab_size": 1024, "fit_samples": 2000},
    },
    "data": {
        "lerobot": None,
        "mixture": None,
        "synthetic": {"num_episodes": 4, "length": 16, "size": 32, "state_dim": 4, "action_dim": 4},
        "embodiment": None,
        "cameras": None,
        "camera_rename": None,
        "camera_names": None,
        "action_mode": "abs",
        "normalization": {"action": "q99", "state": "q99"},
        "eval_split": 0.0,
        "video_decoder": "pyav",
        "augment": {"random_shift": 0},
        "vlm_chat": None,
        "chat_batch_size": 2,
        "chat_max_length": None,
    },
    "trainer": {"output_dir": "outputs/vla", "report_to": "none"},
    "lora": None,
}


# the synthetic demo set's camera features, named as the recipes' processors expect them
SYNTHETIC_CAMERA_RENAME = {"observation.images.front": "primary", "observation.images.wrist": "wrist"}


class WithEmbodiment(Dataset):
    """Adds the statistics key to every sample of a dataset (to mix several LeRobot datasets of equal dimensions)."""

    def __init__(self, dataset, embodiment: str):
        self.dataset, self.embodiment = dataset, embodiment

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, index):
        return {**self.dataset[index], "embodiment": self.embodiment}


# ---------------------------------------------------------------------------------------------------- data


def check_steps_left(checkpoint: Path, max_steps) -> None:
    """Refuses to resume a checkpoint that already reached `max_steps`: transformers' Trainer would train one more
    step past it (and save checkpoint-{max_steps + 1}) instead of stopping."""
    state = checkpoint / "trainer_state.json"
    done = json.loads(state.read_text()).get("global_step") if state.is_file() else None
    if done is not None and max_steps is not None and 0 < int(max_steps) <= done:
        raise ValueError(f"trainer.max_steps: expected more than the {done} steps {checkpoint} has trained, got "
                         f"{max_steps}; raise it to train further")


def build_once(target: Path, build: Callable[[Path], object], field: str, settings: dict) -> Path:
    """Builds `target` from `settings` (the recipe's `field`) unless it exists. Every process (one per rank) may
    build a private copy; the first rename wins. No process group is needed, so this runs before TrainingArguments
    (whose ZeRO-3 setting would otherwise route every model construction through deepspeed.zero.Init).

    The settings are recorded in the folder: an existing one built with other settings is refused, since reusing it
    would train on what the recipe no longer says (and the saved recipe would then misreport the run)."""
    settings = json.loads(json.dumps(settings))  # as the record reads back (tuples → lists)
    record = target / BUILT_WITH_FILE
    if target.exists() and record.is_file():
        built_with = json.loads(record.read_text())
        if built_with != settings:
            raise ValueError(f"{field}: expected {built_with} (the settings {target} was built with; remove that folder "
                             f"or use another trainer.output_dir to build it anew), got {settings}")
    if not target.exists():
        # the host too: ranks on other nodes of a shared filesystem may have the same process id
        private = target.with_name(f"{target.name}.tmp-{socket.gethostname()}-{os.getpid()}")
        shutil.rmtree(private, ignore_errors=True)
        build(private)
        (private / BUILT_WITH_FILE).write_text(json.dumps(settings) + "\n")
        try:
            os.replace(private, target)
        except OSError:  # another process was first
            shutil.rmtree(private, ignore_errors=True)
    return target


def absolute_data_paths(data: dict) -> None:
    """`data.lerobot` and `data.mixture` as absolute paths in the resolved recipe, where they name local files: the
    recipe travels with the model, and its card, made from another folder, would read `data/pusht` as a hub id."""
    def absolute(path):
        return str(Path(path).expanduser().resolve()) if isinstance(path, str) and Path(path).expanduser().exists() \
            else path

    if isinstance(data["lerobot"], list):
        data["lerobot"] = [absolute(root) for root in data["lerobot"]]
    else:
        data["lerobot"] = absolute(data["lerobot"])
    data["mixture"] = absolute(data["mixture"])


def lerobot_specs(data: dict, output_dir: Path) -> list[tuple[Path, str]]:
    """(dataset root, embodiment key) per LeRobot dataset; writes the synthetic demo dataset when none is given."""
    roots = data["lerobot"]
    if roots is None:
        if not data.get("synthetic"):
            raise ValueError("data: give data.lerobot (dataset path(s)) or data.mixture (a mixture YAML)")
        roots = [write_synthetic_dataset(output_dir / "synthetic_dataset", data["synthetic"])]
    roots = [Path(roots)] if isinstance(roots, (str, Path)) else [Path(r) for r in roots]
    names = data["embodiment"]
    if names is None:
        names = [r.name for r in roots]
        shared = sorted({name for name in names if names.count(name) > 1})
        if shared:  # folder names are a guess at the embodiment: the same guess twice must not merge statistics
            raise ValueError(f"data.embodiment: the datasets {[str(r) for r in roots]} would all be named after their "
                             f"folders, and {shared} repeat; give one statistics key per dataset (the same key for "
                             "datasets of one embodiment, whose statistics are then computed over both)")
    names = [names] if isinstance(names, str) else list(names)
    if len(names) != len(roots):
        raise ValueError(f"data.embodiment: {len(names)} names for {len(roots)} datasets")
    return list(zip(roots, names))


def camera_renames(rename: dict | None, roots: list[Path], cameras) -> list[dict | None]:
    """data.camera_rename per dataset. One map serves a list of folders whose cameras have different feature keys:
    each folder takes the entries of its own features, and an entry that no folder has is an error."""
    if not rename or len(roots) == 1:
        return [rename] * len(roots)
    selected = None if cameras is None else [cameras] if isinstance(cameras, str) else list(cameras)
    per_root = []
    for root in roots:
        info = root / "meta" / "info.json"
        if not info.is_file():  # load_lerobot names the problem
            return [rename] * len(roots)
        features = json.loads(info.read_text(encoding="utf-8")).get("features", {})
        per_root.append({k: v for k, v in rename.items() if k in features and (selected is None or k in selected)})
    unused = [k for k in rename if not any(k in r for r in per_root)]
    if unused:
        raise ValueError(f"data.camera_rename: {unused} not among the selected cameras of any of the datasets "
                         f"{[str(r) for r in roots]}")
    return per_root


def write_synthetic_dataset(root: Path, settings: dict) -> Path:
    from hf_vla.data.lerobot_writer import synthetic_episodes, write_lerobot_dataset

    def write(path):
        write_lerobot_dataset(path, synthetic_episodes(**settings), fps=10, robot_type="synthetic", video=False)
        logger.info(f"wrote a synthetic demo dataset to {root}")

    return build_once(root, write, "data.synthetic", settings)


def augmented(train_dataset, data: dict):
    """The training samples with `data.augment` applied (random image shifts when `random_shift` > 0)."""
    shift = int((data["augment"] or {}).get("random_shift") or 0)
    return RandomShift(train_dataset, shift) if shift else train_dataset


def load_lerobot_data(data: dict, model: dict, output_dir: Path):
    """(train dataset, eval dataset or None, {embodiment: stats}, [(training frames, embodiment)] without cameras)."""
    norm = data["normalization"] or {}
    camera_rename = data["camera_rename"]
    if camera_rename is None and data["lerobot"] is None:  # the synthetic set, of the cameras selected
        camera_rename = {k: v for k, v in SYNTHETIC_CAMERA_RENAME.items() if data["cameras"] in (None, []) or
                         k in data["cameras"]}  # fmt: skip
    train_parts, eval_parts, members, action_only, camera_names = [], [], {}, [], []
    specs = lerobot_specs(data, output_dir)
    renames = camera_renames(camera_rename, [root for root, _ in specs], data["cameras"])
    for (root, key), rename in zip(specs, renames):
        settings = dict(action_horizon=model["action_horizon"], action_mode=data["action_mode"])
        dataset = load_lerobot(root, cameras=data["cameras"], camera_rename=rename,
                               decoder=data["video_decoder"], **settings)  # fmt: skip
        members.setdefault(key, []).append(dataset)
        camera_names.append(list(dataset.camera_names))
        tagged = WithEmbodiment(dataset, key)
        num_eval = int(round(len(dataset) * data["eval_split"]))
        # the tail of the frames is held out: whole episodes except, at most, the one that straddles the cut
        train_parts.append(augmented(Subset(tagged, range(len(dataset) - num_eval)), data))
        action_only.append((Subset(dataset.without_images(), range(len(dataset) - num_eval)), key))
        if num_eval:
            eval_parts.append(Subset(tagged, range(len(dataset) - num_eval, len(dataset))))
        logger.info(f"{key}: {dataset}")
    modes = dict(action_mode=norm.get("action", "q99"), state_mode=norm.get("state", "q99"))
    stats = {key: compute_union_stats(datasets, **modes) for key, datasets in members.items()}
    dims = {(_dim(s, "action"), _dim(s, "state")) for s in stats.values()}
    if len(dims) > 1:
        raise ValueError(f"data.lerobot: datasets of different (action, state) dimensions {sorted(dims)}; "
                         "combine them with a mixture YAML (data.mixture), which pads to the largest")
    if any(set(names) != set(camera_names[0]) for names in camera_names):  # the collator reads views by name
        raise ValueError(f"data: the datasets name their cameras differently {camera_names}; use data.camera_rename")
    train = train_parts[0] if len(train_parts) == 1 else ConcatDataset(train_parts)
    evaluation = None if not eval_parts else eval_parts[0] if len(eval_parts) == 1 else ConcatDataset(eval_parts)
    return train, evaluation, stats, camera_names[0], action_only


def unknown_keys_message(section: str, unknown: list[str], known) -> str:
    """`section: unknown key(s) [...]`, with the closest known key of each (a misspelling is the usual cause)."""
    hints = {name: difflib.get_close_matches(name, list(known), n=1) for name in unknown}
    closest = ", ".join(f"{name} → {hint[0]}" for name, hint in hints.items() if hint)
    return f"{section}: unknown key(s) {unknown}" + (f" (closest known: {closest})" if closest else "")


def check_recipe_keys(recipe: dict) -> None:
    """Every `model` / `data` key is one this script reads, and so are the keys of the fixed-schema settings under
    them: a misspelt `--data.lerobt` would otherwise train on the synthetic set (`head` and `tiny_vlm` go to configs
    and builders that check their own keys). The values this script reads itself are checked too."""
    for section in ("model", "data"):
        unknown = sorted(set(recipe[section]) - set(DEFAULTS[section]))
        if unknown:
            raise ValueError(f"{unknown_keys_message(section, unknown, DEFAULTS[section])}; expected "
                             f"{sorted(DEFAULTS[section])}")
        for key in ("fast", "synthetic", "normalization", "augment"):
            value, default = recipe[section].get(key), DEFAULTS[section].get(key)
            if isinstance(value, dict) and isinstance(default, dict):
                unknown = sorted(set(value) - set(default))
                if unknown:
                    raise ValueError(f"{unknown_keys_message(f'{section}.{key}', unknown, default)}; expected "
                                     f"{sorted(default)}")
    check_recipe_values(recipe["model"], recipe["data"])
    check_lora_section(recipe["lora"], recipe["model"]["variant"])


def number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def positive_integer(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def check_recipe_values(model: dict, data: dict) -> None:
    check_model_head(model)
    horizon = model["action_horizon"]
    if not positive_integer(horizon):
        raise ValueError(f"model.action_horizon: expected a positive integer, got {horizon!r}")
    size = model["image_size"]
    if not (isinstance(size, list) and len(size) == 2 and all(isinstance(v, int) and v > 0 for v in size)):
        raise ValueError(f"model.image_size: expected [height, width] in pixels, got {size!r}")
    if model["dtype"] not in (None, "auto") and not isinstance(getattr(torch, str(model["dtype"]), None), torch.dtype):
        raise ValueError(f"model.dtype: expected null, auto or a torch dtype name (bfloat16, float16, float32), "
                         f"got {model['dtype']!r}")
    if not (number(data["eval_split"]) and 0 <= data["eval_split"] < 1):
        raise ValueError(f"data.eval_split: expected a fraction in [0, 1), got {data['eval_split']!r}")
    if data["normalization"] is not None and not isinstance(data["normalization"], dict):
        raise ValueError(f"data.normalization: expected {{action: mode, state: mode}}, got {data['normalization']!r}")
    augment = data["augment"] or {}
    shift = augment.get("random_shift") or 0 if isinstance(augment, dict) else None
    if not (isinstance(shift, int) and not isinstance(shift, bool) and shift >= 0):
        raise ValueError(f"data.augment: expected {{random_shift: pixels (an integer >= 0)}}, got {data['augment']!r}")


def check_model_head(model: dict) -> None:
    """`model.variant` and the field names of `model.head`, before the data is read (the statistics of a large dataset
    take minutes; from_vlm refuses a misspelt field only when the model is built)."""
    variants = sorted(name.removeprefix("vla_") for name in VARIANTS)
    if model["variant"] not in variants:
        raise ValueError(f"model.variant: expected one of {variants}, got {model['variant']!r}")
    head = model["head"] if model["head"] is not None else {}
    if not isinstance(head, dict):
        raise ValueError(f"model.head: expected {{field: value}} of the variant's config, got {head!r}")
    set_by_model = sorted(set(head) & set(DEFAULTS["model"]))
    if set_by_model:  # build_model passes these from the model section itself
        raise ValueError(f"model.head: {set_by_model} are set by the model section; use "
                         f"{', '.join(f'model.{key}' for key in set_by_model)} instead")
    config_class = VARIANTS[f"vla_{model['variant']}"][0]
    known = config_field_names(config_class)
    unknown = sorted(set(head) - known)
    if unknown:
        others = [name.removeprefix("vla_") for name, (other, _) in VARIANTS.items()
                  if set(unknown) <= config_field_names(other)]  # fmt: skip
        switched = f" ({others[0]} fields: to switch variants, start from that variant's recipe or reset the head " \
                   "with --model.head null)" if others else ""
        raise ValueError(f"{unknown_keys_message('model.head', unknown, known)}; expected {config_class.__name__} "
                         f"fields{switched}")


LORA_VALUES = {  # key: (what it takes, whether a value is one)
    "r": ("a positive integer", positive_integer),
    "alpha": ("a positive number", lambda v: number(v) and v > 0),
    "dropout": ("a fraction in [0, 1)", lambda v: number(v) and 0 <= v < 1),
    "target": ("language_model, attention or a regex of module names", lambda v: isinstance(v, str) and v != ""),
    "train_head": ("true or false", lambda v: isinstance(v, bool)),
    "train_embeddings": ("true or false", lambda v: isinstance(v, bool)),
    "modules_to_save": ("null or a list of module names", lambda v: v is None or (isinstance(v, list) and all(
        isinstance(name, str) for name in v))),
}  # fmt: skip


def check_lora_section(lora, variant: str) -> None:
    """The `lora` section: null, or add_lora's settings with values of their types; train_embeddings only for a
    variant with action tokens (add_lora would refuse it only after the data and the model are loaded)."""
    if lora is None:
        return
    if not isinstance(lora, dict):
        raise ValueError(f"lora: expected null (full fine-tuning) or {{key: value}} of {sorted(LORA_DEFAULTS)}, got "
                         f"{lora!r}")
    unknown = sorted(set(lora) - set(LORA_DEFAULTS))
    if unknown:
        raise ValueError(f"{unknown_keys_message('lora', unknown, LORA_DEFAULTS)}; expected {sorted(LORA_DEFAULTS)} "
                         "(add_lora's settings)")
    for key, value in lora.items():
        expected, accepts = LORA_VALUES[key]
        if not accepts(value):
            raise ValueError(f"lora.{key}: expected {expected}, got {value!r}")
    if lora.get("train_embeddings") and "action_token_offset" not in config_field_names(VARIANTS[f"vla_{variant}"][0]):
        raise ValueError(f"lora.train_embeddings: only the token heads (fast, bins) have action-token rows to train; "
                         f"model.variant is {variant}")


NUMBER_TYPES = {int: "an integer", float: "a number", bool: "true or false"}


def check_trainer_fields(fields: dict) -> None:
    """The `trainer` section's TrainingArguments fields, checked before anything is loaded or built: TrainingArguments
    is made after the model (see main), and takes any value of its numeric and boolean fields without a word
    (`max_steps: abc` would fail at the first step, after the data and the model were loaded)."""
    known = {field.name: field.type for field in dataclasses.fields(TrainingArguments) if field.init}
    unknown = sorted(set(fields) - set(known))
    if unknown:
        raise ValueError(f"{unknown_keys_message('trainer', unknown, known)}; expected TrainingArguments fields, or "
                         "learning_rate, freeze, loss_scale")
    for name, value in fields.items():
        annotated = known[name]
        options = set(annotated.__args__) if isinstance(annotated, types.UnionType) else {annotated}
        expected = options - {type(None)}
        if len(expected) != 1 or next(iter(expected)) not in NUMBER_TYPES or (value is None and type(None) in options):
            continue
        kind = next(iter(expected))
        accepted = (int, float) if kind is float else (kind,)
        if isinstance(value, bool) != (kind is bool) or not isinstance(value, accepted):
            raise ValueError(f"trainer.{name}: expected {NUMBER_TYPES[kind]}, got {value!r}")


def load_mixture_data(data: dict, model: dict):
    from hf_vla.data.mixture import load_mixture

    if data["eval_split"]:
        raise ValueError("data.eval_split: only with data.lerobot datasets (a mixture draws frames at random)")
    per_dataset = [key for key in ("embodiment", "cameras", "camera_rename", "action_mode", "normalization")
                   if data[key] != DEFAULTS["data"][key]]  # fmt: skip
    if per_dataset:  # the recipes set camera_rename for data.lerobot, so this is a note rather than an error
        logger.warning(f"data.{', data.'.join(per_dataset)}: not used with data.mixture, whose YAML sets them per "
                       "dataset (embodiment, cameras, action_mode, normalization)")
    mixture = load_mixture(data["mixture"], action_horizon=model["action_horizon"], decoder=data["video_decoder"])
    logger.info(repr(mixture))
    camera_names = [list(entry.dataset.camera_names) for entry in mixture.entries]
    if data["camera_names"] is None and any(set(names) != set(camera_names[0]) for names in camera_names):
        raise ValueError(f"data.mixture: the datasets name their cameras differently {camera_names}; rename them "
                         "in the mixture YAML (cameras: {feature: name}) or set data.camera_names")
    if data["camera_names"] is not None:  # the processor's cameras: every dataset must have each of them
        try:
            mixture.check_camera_names(data["camera_names"])
        except ValueError as err:
            raise ValueError(f"data.camera_names: {err}") from err
    action_only = [(mixture.without_images(), None)]  # the same draws, for fitting a FAST tokenizer
    return augmented(mixture, data), None, mixture.compute_norm_stats(), camera_names[0], action_only


def _dim(stats: dict, feature: str) -> int:
    return len(stats[feature]["mean"]) if feature in stats else 0


def check_model_widths(model: dict, stats: dict) -> None:
    """A recipe's model.action_dim / state_dim against the data's widths (every embodiment has them: a mixture pads
    to its widest), before anything is fitted or built for a model that could not take the data."""
    key, first = next(iter(stats.items()))
    actions, states = _dim(first, "action"), _dim(first, "state")
    if model["action_dim"] != actions:
        raise ValueError(f"model.action_dim: the data's actions ({key!r}) have {actions} dimensions, got "
                         f"{model['action_dim']}; leave it null to take the data's")
    if model["state_dim"] not in (0, states):
        expected = f"the data's state width {states} ({key!r}) or 0 (a model without state)" if states else \
            f"0: the data ({key!r}) has no state"
        raise ValueError(f"model.state_dim: expected {expected}, got {model['state_dim']}; leave it null to take the "
                         "data's")


def fit_fast_tokenizer(fast: dict, stats: dict, action_only, train_dataset, seed: int):
    """A FAST tokenizer fitted on normalised action chunks of the training data (read without camera views).

    `fit_samples` frames are drawn without replacement, uniformly over all training frames, as the Trainer draws
    them: each dataset in proportion to its size (a mixture by its weights), and exactly `fit_samples` chunks, or
    every frame when there are fewer."""
    from hf_vla.action_tokenizers import FASTTokenizer

    sources = action_only or [(train_dataset, None)]
    sizes = np.array([len(dataset) for dataset, _ in sources])
    ends = np.cumsum(sizes)
    count = min(int(fast["fit_samples"]), int(ends[-1]))
    chunks = []
    for index in np.random.default_rng(seed).choice(int(ends[-1]), size=count, replace=False):
        source = int(np.searchsorted(ends, index, side="right"))
        (dataset, key), start = sources[source], int(ends[source] - sizes[source])
        sample = dataset[int(index) - start]
        embodiment = key or sample["embodiment"]
        chunks.append(normalize(sample["actions"], stats[embodiment]["action"]))
    tokenizer = FASTTokenizer.fit(np.stack(chunks), scale=fast["scale"], vocab_size=int(fast["vocab_size"]))
    logger.info(f"fitted {tokenizer} on {len(chunks)} chunks")
    return tokenizer


def checkpoint_tokenizer(resume) -> str | None:
    """The FAST tokenizer folder of the checkpoint a run resumes (a LoRA checkpoint's is its base's): its weights
    learned those token ids, so a refit (from another seed, or a dataset that changed since) must not replace it."""
    from hf_vla.models.fast.modeling_fast import ACTION_TOKENIZER_DIR

    folder = (lora_base_of(Path(resume)) or Path(resume)) / ACTION_TOKENIZER_DIR if resume else None
    if folder is None or not folder.is_dir():
        return None
    logger.info(f"continuing with the FAST tokenizer of {resume}")
    return str(folder)


# ---------------------------------------------------------------------------------------------------- model


def resolve_vlm(model: dict, output_dir: Path) -> str:
    if model["vlm"]:
        return str(model["vlm"])
    from hf_vla.testing import build_tiny_vlm

    def build(path):
        build_tiny_vlm(path, **model["tiny_vlm"])
        logger.info(f"built a tiny random {model['tiny_vlm']['family']} backbone in {output_dir / 'tiny_vlm'}")

    return str(build_once(output_dir / "tiny_vlm", build, "model.tiny_vlm", model["tiny_vlm"]))


def build_model(model: dict, vlm: str, action_dim: int, state_dim: int, action_tokenizer=None):
    kwargs = dict(action_dim=action_dim, action_horizon=model["action_horizon"], state_dim=state_dim,
                  **(model["head"] or {}))
    if model["variant"] == "fast":
        kwargs["action_tokenizer"] = action_tokenizer
    dtype = model["dtype"]
    if isinstance(dtype, str) and dtype != "auto":
        dtype = getattr(torch, dtype)
    return AutoModelForVLA.from_vlm(vlm, variant=model["variant"], dtype=dtype, **kwargs)


def lora_base_of(checkpoint: Path) -> Path | None:
    """The base a LoRA checkpoint's adapter was trained on; None for a checkpoint of a whole model."""
    config = checkpoint / ADAPTER_CONFIG_NAME
    return Path(json.loads(config.read_text())["base_model_name_or_path"]) if config.is_file() else None


def check_resumed_kind(checkpoint: Path, lora) -> None:
    """A LoRA checkpoint resumes with a lora section and a whole model's without: Trainer would load either into the
    other model without a word about the weights it could not place."""
    base = lora_base_of(checkpoint)
    if lora is not None and base is None:
        raise ValueError(f"lora: {checkpoint} is a checkpoint of full fine-tuning (no {ADAPTER_CONFIG_NAME}); resume "
                         "it without lora (--lora null)")
    if lora is None and base is not None:
        raise ValueError(f"lora: {checkpoint} holds a LoRA adapter; resume it with the lora section of its run (its "
                         f"{RECIPE_FILE})")
    if base is not None and not (base / "config.json").is_file():
        raise ValueError(f"trainer.resume_from_checkpoint: the base of {checkpoint}'s adapter, {base}, is gone")


def with_lora(model, processor, lora: dict, output_dir: Path, resume, built_with: dict):
    """`model` wrapped in LoRA adapters on a base read from disk: the adapter records where its base lives, and the VLA
    built here (a fresh head, new action-token rows) exists nowhere else, so it is saved to <output_dir>/lora_base
    first (each process loads that copy back: every rank then trains the same base). A resumed run continues on its
    checkpoint's base."""
    base = lora_base_of(Path(resume)) if resume else None
    if base is None:
        def save(path):
            model.save_pretrained(path)
            processor.save_pretrained(path)  # the base is an untrained policy directory too

        base = build_once(output_dir / LORA_BASE_DIR, save, "model, trainer.seed (the LoRA base)", built_with).resolve()
    peft_model = add_lora(AutoModelForVLA.from_pretrained(base, dtype=model.dtype), **lora,
                          base_model_name_or_path=str(base))  # fmt: skip
    logger.info(f"LoRA on {base}: {lora}")
    return peft_model


def save_trained_model(trainer, output_dir: Path, lora) -> None:
    """The trained model into the output directory. A LoRA run's adapter (+ processor files) goes to
    <output_dir>/lora_adapter and the merged model into the output directory itself: a plain model directory, which
    from_pretrained, evaluation, serving and `hf-vla push` take as it is.

    The merge is made from the saved adapter and its base on the main process, not from the trained model: under
    DeepSpeed, Trainer saves the engine's weights (PEFT's `base_model.model.` names, which from_pretrained would drop
    for a random model), and under ZeRO-3 each rank holds only part of every tensor to merge."""
    if lora is None:
        trainer.save_model(str(output_dir))
        return
    adapter_dir = output_dir / LORA_ADAPTER_DIR
    trainer.save_model(str(adapter_dir))  # every rank: under ZeRO-3 the engine gathers the adapter's partitions
    if trainer.args.should_save:
        merged_lora_model(adapter_dir).save_pretrained(output_dir)
        trainer.processing_class.save_pretrained(output_dir)
        torch.save(trainer.args, output_dir / TRAINING_ARGS_NAME)
    trainer.accelerator.wait_for_everyone()


def merged_lora_model(adapter_dir: Path):
    """The base of the adapter in `adapter_dir` with the adapter merged into its weights, loaded whole in this process
    (a ZeRO-3 run's model construction would otherwise go through deepspeed.zero.Init, which waits for every rank)."""
    from peft import PeftModel
    from transformers.integrations import deepspeed as hf_deepspeed

    zero3_config = hf_deepspeed._hf_deepspeed_config_weak_ref  # what is_deepspeed_zero3_enabled() reads
    hf_deepspeed.unset_hf_deepspeed_config()
    try:
        base = AutoModelForVLA.from_pretrained(lora_base_of(adapter_dir))
        return PeftModel.from_pretrained(base, adapter_dir).merge_and_unload()
    finally:
        hf_deepspeed._hf_deepspeed_config_weak_ref = zero3_config


# ---------------------------------------------------------------------------------------------------- main


class RecipeIntoCheckpoints(TrainerCallback):
    """Copies the resolved recipe into every checkpoint-N, so that each one is a model directory that says how it
    was trained (and a resumed run can compare its settings)."""

    def __init__(self, recipe_file: Path):
        self.recipe_file = recipe_file

    def on_save(self, args, state, control, **kwargs):
        checkpoint = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        if state.is_world_process_zero and checkpoint.is_dir() and self.recipe_file.is_file():
            shutil.copy2(self.recipe_file, checkpoint / RECIPE_FILE)


def warn_about_changed_settings(recipe: dict, saved_file: Path) -> None:
    """A resumed run continues the checkpoint's run: model, data and LoRA settings that differ from its recipe (other
    statistics, another action mode, ...) are most likely a mistake, so they are listed."""
    if not saved_file.is_file():
        return
    saved = load_recipe(saved_file)
    # a tiny backbone built into each run's own output directory is the same backbone
    built = {str(Path(r["trainer"].get("output_dir", "")) / "tiny_vlm") for r in (saved, recipe) if "trainer" in r}
    changed = []
    for section in ("model", "data", "lora"):
        if section not in saved:
            continue
        saved_section, section_now = saved[section] or {}, recipe[section] or {}  # lora: null without LoRA
        for key in sorted(set(saved_section) | set(section_now)):
            before, after = saved_section.get(key), section_now.get(key)
            if before != after and not ((section, key) == ("model", "vlm") and {before, after} <= built):
                changed.append(f"{section}.{key}: {before!r} -> {after!r}")
    if changed:
        logger.warning(f"resuming {saved_file.parent} with model/data/lora settings other than its run's: {changed}")


def training_arguments(fields: dict) -> TrainingArguments:
    fields = dict(fields)
    if not torch.cuda.is_available():
        fields.setdefault("use_cpu", True)
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            fields.setdefault("ddp_backend", "gloo")
    try:
        return TrainingArguments(**fields)
    except TypeError as err:
        raise TypeError(f"trainer section: {err} (keys other than learning_rate, freeze and loss_scale are "
                        "TrainingArguments fields)") from err


def sharding(trainer) -> str:
    """How the launch shards the model, for the start-up log line (a launcher that silently ran plain DDP shows)."""
    if trainer.is_deepspeed_enabled:
        return f"; DeepSpeed ZeRO-{trainer.accelerator.state.deepspeed_plugin.zero_stage}"
    if trainer.is_fsdp_enabled:
        return f"; FSDP{trainer.accelerator.state.fsdp_plugin.fsdp_version}"
    if trainer.args.fsdp_plugin_args is not None or os.environ.get("ACCELERATE_USE_FSDP", "").lower() == "true":
        logger.warning("FSDP was asked for, but accelerate enables it on GPUs only: this run replicates the model on "
                       "every process (DDP). On CPU, shard with DeepSpeed ZeRO-3 instead "
                       "(trainers/deepspeed/zero3.json)")
    return ""


def check_lora_sharding(trainer, lora) -> None:
    """Refuses, before training, the LoRA setting FSDP2 cannot shard: train_embeddings on tied embeddings. accelerate
    (1.15) tells tied embeddings by `get_input_embeddings().weight is get_output_embeddings().weight`, but PEFT's
    trainable-tokens wrappers return a newly merged tensor as `weight`: accelerate then shards the embeddings and the
    LM head as two units over one weight, and torch refuses the second ("TypeError: Invariant encountered: value was
    None when it should not be")."""
    fsdp2 = trainer.is_fsdp_enabled and trainer.accelerator.state.fsdp_plugin.fsdp_version == 2
    if fsdp2 and lora is not None and lora["train_embeddings"] and trains_tied_token_rows(trainer.model):
        raise ValueError("lora.train_embeddings: the backbone ties its LM head to the input embeddings, and "
                         "accelerate's FSDP2 cannot shard PEFT's trainable tokens on a tied pair (it takes them for "
                         "untied and shards their one weight twice); train it under DDP or DeepSpeed ZeRO-3 "
                         "(trainers/deepspeed/zero3.json), or without train_embeddings")  # fmt: skip


def main(argv: list[str] | None = None) -> dict:
    argv = sys.argv[1:] if argv is None else list(argv)
    if {"-h", "--help"} & set(argv):
        print(__doc__)
        raise SystemExit(0)
    recipe_path = argv[0] if argv and not argv[0].startswith("--") else None
    recipe = load_recipe(recipe_path, argv[1:] if recipe_path else argv, defaults=DEFAULTS)
    check_recipe_keys(recipe)
    if recipe["lora"] is not None:  # the saved recipe records every setting the adapter was trained with
        recipe["lora"] = {**LORA_DEFAULTS, **recipe["lora"]}
    model_cfg, data, trainer_cfg, lora = recipe["model"], recipe["data"], recipe["trainer"], recipe["lora"]

    fields, learning_rates, freeze, loss_scale = split_trainer_section(trainer_cfg)
    resume = fields.pop("resume_from_checkpoint", None)
    # how this run started, not how the model trains: the saved recipe, run again in a new folder, starts afresh
    trainer_cfg.pop("resume_from_checkpoint", None)
    check_trainer_fields(fields)
    if "output_dir" not in fields:
        raise ValueError("trainer.output_dir: required")
    output_dir, seed = Path(fields["output_dir"]), int(fields.get("seed", 42))
    if resume in (True, "true", "last"):  # checked before anything is built: a typo'd output_dir must not start over
        resume = get_last_checkpoint(str(output_dir)) if output_dir.is_dir() else None
        if resume is None:
            raise ValueError(f"trainer.resume_from_checkpoint: true, but {output_dir} holds no checkpoint-N to resume")
    if resume and not (isinstance(resume, str) and Path(resume).is_dir()):  # Trainer says so only after the build
        raise ValueError(f"trainer.resume_from_checkpoint: expected true (the latest checkpoint-N of output_dir) or a "
                         f"checkpoint folder, got {resume!r}, which is not a folder")
    if resume:
        check_steps_left(Path(resume), fields.get("max_steps"))
        check_resumed_kind(Path(resume), lora)
    is_main = int(os.environ.get("RANK", "0")) == 0
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.WARNING)
    logger.setLevel(logging.INFO if is_main else logging.WARNING)

    # Data, model and processor come first: TrainingArguments(deepspeed=ZeRO-3) would make every later
    # from_pretrained / from_config run under deepspeed.zero.Init, which from_vlm's head initialisation cannot take.
    absolute_data_paths(data)
    if data["mixture"]:
        train, evaluation, stats, camera_names, action_only = load_mixture_data(data, model_cfg)
    else:
        train, evaluation, stats, camera_names, action_only = load_lerobot_data(data, model_cfg, output_dir)
    camera_names = data["camera_names"] or camera_names
    first = next(iter(stats.values()))
    if model_cfg["action_dim"] is None:
        model_cfg["action_dim"] = _dim(first, "action")
    if model_cfg["state_dim"] is None:
        model_cfg["state_dim"] = _dim(first, "state")
    check_model_widths(model_cfg, stats)
    action_dim, state_dim = model_cfg["action_dim"], model_cfg["state_dim"]

    vlm = model_cfg["vlm"] = resolve_vlm(model_cfg, output_dir)
    set_seed(seed)
    action_tokenizer = None
    if model_cfg["variant"] == "fast":
        action_tokenizer = model_cfg["action_tokenizer"] or checkpoint_tokenizer(resume) or fit_fast_tokenizer(
            model_cfg["fast"], stats, action_only, train, seed
        )
    model = build_model(model_cfg, vlm, action_dim, state_dim, action_tokenizer)
    processor = VLAProcessor.from_vlm(vlm, model.config, camera_names=camera_names, image_size=model_cfg["image_size"])
    for key, embodiment_stats in stats.items():
        if state_dim == 0:
            embodiment_stats = {k: v for k, v in embodiment_stats.items() if k != "state"}
        processor.set_norm_stats(key, embodiment_stats)
    if lora is not None:
        model = with_lora(model, processor, lora, output_dir, resume, built_with={"model": model_cfg, "seed": seed})

    args = training_arguments(fields)
    transformers.utils.logging.set_verbosity(args.get_process_log_level())
    if resume:
        warn_about_changed_settings(recipe, Path(resume) / RECIPE_FILE)
    if args.should_save:  # written now, and into every checkpoint: a crashed run still says how it was trained
        output_dir.mkdir(parents=True, exist_ok=True)
        dump_recipe(recipe, output_dir / RECIPE_FILE)

    collator = VLACollator(processor)
    if data["vlm_chat"]:
        from hf_vla.data.vlm_chat import VLMChatCollator, load_vlm_chat

        chat = load_vlm_chat(data["vlm_chat"])
        collator = CoTrainingCollator(collator, chat, VLMChatCollator(processor, max_length=data["chat_max_length"]),
                                      chat_batch_size=int(data["chat_batch_size"]), seed=args.seed)
        logger.info(f"co-training with {chat}")
    trainer = VLATrainer(
        model, args, data_collator=collator, train_dataset=train, eval_dataset=evaluation,
        processing_class=processor, learning_rates=learning_rates, freeze=freeze, loss_scale=loss_scale,
        callbacks=[RecipeIntoCheckpoints(output_dir / RECIPE_FILE)],
    )  # fmt: skip
    check_lora_sharding(trainer, lora)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    name = type(model).__name__ if lora is None else f"{type(model.get_base_model()).__name__} with LoRA r={lora['r']}"
    logger.info(f"{name}: {model.num_parameters():,} parameters, {trainable:,} trainable; "
                f"{len(train)} training samples; world size {args.world_size}{sharding(trainer)}")

    result = trainer.train(resume_from_checkpoint=resume or None)
    save_trained_model(trainer, output_dir, lora)
    trainer.log_metrics("train", result.metrics)
    trainer.save_metrics("train", result.metrics)
    trainer.save_state()
    metrics = dict(result.metrics)
    if evaluation is not None:
        eval_metrics = trainer.evaluate()
        trainer.log_metrics("eval", eval_metrics)
        trainer.save_metrics("eval", eval_metrics)
        metrics.update(eval_metrics)
    if args.should_save:
        dump_recipe(recipe, output_dir / RECIPE_FILE)
        logger.info(f"model directory ready: {output_dir}")
    trainer.end()  # waits for every rank, finishes trackers and destroys the process group so every rank exits
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    return metrics


if __name__ == "__main__":
    main()
