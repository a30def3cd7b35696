"""VLAProcessor: raw samples ↔ model inputs.

In: per sample one image per camera, an instruction, optionally the robot state and a target action chunk.
Out: the backbone's chat prompt (image tokens expanded), pixel tensors, and state/actions normalised with the
embodiment's statistics. Back: `decode_actions` maps a predicted chunk to robot units.
"""

from __future__ import annotations

import functools
import json
import re
from collections import OrderedDict
from collections.abc import Mapping, Sequence

import numpy as np
import torch
from PIL import Image
from transformers import AutoImageProcessor, AutoTokenizer, BatchFeature
from transformers.processing_utils import ProcessorMixin

from .action_tokenizers.bins import UniformBins
from .backbones import get_backbone_adapter
from .normalization import (
    FeatureNormalizer, absolute_actions, compact_action_mode, compute_stats, describe_action_mode, expand_action_modes,
    finite_float32, is_relative, numeric_array, relative_state_width, validate_feature_stats
)

PROMPT_CACHE_SIZE = 64  # tokenised prompt batches kept by `VLAProcessor._text_inputs`
STATE_BINS = 256  # uniform bins over [-1, 1] of StarVLA's state text


def _json_copy(stats: Mapping, field: str) -> dict:
    """A deep copy in JSON types, as `save_pretrained` writes it: later edits to the caller's lists cannot reach the
    stored statistics (whose normalisers are cached), and numpy values cannot break the save."""

    def plain(value):
        if hasattr(value, "tolist"):  # numpy arrays and scalars, tensors
            return value.tolist()
        raise TypeError(f"{type(value).__name__} is not a JSON value")

    try:
        return json.loads(json.dumps(stats, default=plain))
    except (TypeError, ValueError) as error:
        raise ValueError(f"{field}: statistics must be numbers, strings, lists and maps ({error})") from None


@functools.lru_cache(maxsize=8)
def _reserved_tokens(tokenizer, vocabulary_size: int) -> re.Pattern:
    """The tokenizer's added tokens (chat markers, image and action-query placeholders, action tokens) as one pattern,
    made once per tokenizer and vocabulary size: an instruction holding one would change the prompt's structure, and
    the image placeholder must be one (see `_tokenize_prompts`)."""
    tokens = sorted(tokenizer.get_added_vocab(), key=len, reverse=True)
    return re.compile("|".join(map(re.escape, tokens)) or "(?!)")


@functools.lru_cache(maxsize=8)
def _bin_edges(num_bins: int) -> np.ndarray:
    edges = np.linspace(-1.0, 1.0, num_bins + 1)[:-1]  # made once: a control loop writes the state at every step
    edges.flags.writeable = False
    return edges


@functools.lru_cache(maxsize=8)
def _uniform_bins(num_bins: int) -> UniformBins:
    return UniformBins(num_bins)


def _positive_ints(values, field: str) -> list[int]:
    """`[height, width]` as two integers ≥ 1 (a 0 would fail inside PIL at the first call, 56.7 be cut to 56)."""
    sizes = list(values) if isinstance(values, (list, tuple, np.ndarray)) else None
    if (sizes is None or len(sizes) != 2
            or not all(isinstance(s, (int, np.integer)) and not isinstance(s, bool) and s >= 1 for s in sizes)):
        raise ValueError(f"{field}: expected [height, width], two integers ≥ 1, got {values!r}")
    return [int(s) for s in sizes]


def state_to_text(normalized_state: np.ndarray, token_template: str | None = None, num_bins: int = STATE_BINS) -> str:
    """`[STATE] b1 b2 ... [ACTION]` with each normalised dimension as its bin index among `num_bins` uniform bins
    over [-1, 1] (StarVLA's state text: values below -1 give -1), or, with `token_template` (e.g.
    "<robot_action_{}>"), as the action tokens `UniformBins(num_bins)` gives it (the bins variant: LLaVA-VLA writes
    the state with OpenVLA's action tokenizer)."""
    if token_template is not None:
        tokens = _uniform_bins(num_bins).encode(normalized_state)
        return "[STATE] " + "".join(token_template.format(int(t)) for t in tokens) + " [ACTION]"
    bins = np.digitize(normalized_state, _bin_edges(num_bins)) - 1
    return "[STATE] " + " ".join(str(int(b)) for b in bins) + " [ACTION]"


class VLAProcessor(ProcessorMixin):
    r"""
    Args:
        image_processor: the backbone's image processor (e.g. `Qwen2VLImageProcessorPil`).
        tokenizer: the backbone's tokenizer; its chat template builds the prompt unless `chat_template` is given.
        chat_template (`str`, *optional*): a Jinja chat template overriding the tokenizer's.
        norm_stats (`dict`, *optional*): per-embodiment statistics, `{key: {"action": {...}, "state": {...}}}`
            (format in `hf_vla.normalization`).
        camera_names (`list[str]`): the camera views each sample carries, in prompt order.
        image_size (`list[int]`): `[height, width]` every view is resized to (bicubic) before the image processor. A
            size the backbone's processor would change (Qwen: sides not multiples of patch × merge, or a pixel count
            outside its bounds) is resized again by it to the nearest one it takes (`smart_resize`), as in StarVLA.
        action_dim, action_horizon, state_dim, state_in_prompt, prompt_template: as in `VLAConfig`.
        action_query_token / action_query_suffix: OFT's placeholder token and the text that carries it.
        state_token_template (`str`, *optional*): write state bins as these tokens (bins variant) instead of numbers.
        state_bins (`int`): how many uniform bins over [-1, 1] the state text uses (256, StarVLA's), or, when the state
            is written as action tokens, the bins variant's `num_action_tokens` (OpenVLA's grid, see `UniformBins`).
        concat_views (`bool`): stack the camera views vertically into one image (LLaVA-VLA).
        backbone (`str`): the VLM's model_type, which picks the image-token layout.
    """

    def __init__(
        self,
        image_processor=None,
        tokenizer=None,
        chat_template=None,
        norm_stats: dict | None = None,
        camera_names: Sequence[str] = ("primary",),
        image_size: Sequence[int] = (224, 224),
        action_dim: int = 7,
        action_horizon: int = 16,
        state_dim: int = 0,
        state_in_prompt: bool = False,
        prompt_template: str = "{instruction}",
        action_query_token: str | None = None,
        action_query_suffix: str | None = None,
        state_token_template: str | None = None,
        state_bins: int = STATE_BINS,
        concat_views: bool = False,
        backbone: str = "qwen2_5_vl",
        **kwargs,
    ):
        self.norm_stats = {}
        if isinstance(camera_names, str) or not all(isinstance(name, str) and name for name in camera_names):
            raise ValueError(f"camera_names: expected a list of camera names, got {camera_names!r}")
        if len(set(camera_names)) != len(camera_names):
            raise ValueError(f"camera_names: expected distinct names, got {list(camera_names)}")
        self.camera_names = list(camera_names)
        self.image_size = _positive_ints(image_size, "image_size")
        self.action_dim = int(action_dim)
        self.action_horizon = int(action_horizon)
        self.state_dim = int(state_dim)
        self.state_in_prompt = bool(state_in_prompt)
        self.prompt_template = prompt_template
        self.action_query_token = action_query_token
        self.action_query_suffix = action_query_suffix
        self.state_token_template = state_token_template
        self.state_bins = int(state_bins)
        if self.state_bins < 2 or self.state_bins != state_bins:  # fewer bins would write every state as one value
            raise ValueError(f"state_bins: expected an integer ≥ 2, got {state_bins!r}")
        self.concat_views = bool(concat_views)
        self.backbone = backbone
        if "{instruction}" not in self.prompt_template:  # as VLAConfig: without it every prompt would be the same
            raise ValueError(f"prompt_template: expected a text containing '{{instruction}}', got {prompt_template!r}")
        if not self.camera_names:
            raise ValueError("camera_names: at least one camera is required")
        super().__init__(image_processor, tokenizer, chat_template=chat_template or getattr(tokenizer, "chat_template", None))
        self._prompt_cache: OrderedDict[tuple, dict] = OrderedDict()  # see _text_inputs
        self._normalizers: dict[int, tuple] = {}  # see _normalizer
        for key, stats in (norm_stats or {}).items():
            self.set_norm_stats(key, stats)

    # ------------------------------------------------------------------ construction

    @classmethod
    def from_vlm(cls, vlm_name_or_path: str, config, **kwargs) -> VLAProcessor:
        """The processor matching `config` (a VLAConfig) on top of a VLM's tokenizer and image processor."""
        settings = dict(
            action_dim=config.action_dim,
            action_horizon=config.action_horizon,
            state_dim=config.state_dim,
            state_in_prompt=config.state_in_prompt,
            prompt_template=config.prompt_template,
            action_query_token=getattr(config, "action_token", None),
            action_query_suffix=getattr(config, "action_query_suffix", None),
            state_token_template=(
                config.action_token_template if getattr(config, "state_as_action_tokens", False) else None
            ),
            state_bins=(config.num_action_tokens if getattr(config, "state_as_action_tokens", False) else STATE_BINS),
            concat_views=getattr(config, "concat_views", False),
            backbone=config.vlm_config.model_type,
        )
        settings.update(kwargs)
        tokenizer = AutoTokenizer.from_pretrained(vlm_name_or_path)
        if getattr(config, "num_action_tokens", None):  # token heads: the same action tokens as the model's vocabulary
            from .models.token_actions import add_action_tokens

            offset = add_action_tokens(tokenizer, config.action_token_template, config.num_action_tokens)
            if config.action_token_offset not in (None, offset):
                raise ValueError(f"action_token_offset: the model expects {config.action_token_offset}, "
                                 f"the tokenizer gives {offset}")
        image_processor = AutoImageProcessor.from_pretrained(vlm_name_or_path)
        return cls(image_processor=image_processor, tokenizer=tokenizer, **settings)

    # ------------------------------------------------------------------ statistics

    def set_norm_stats(self, key: str, stats: Mapping) -> None:
        """Registers one embodiment's statistics (`{"action": {...}, "state": {...}}`) after checking dimensions."""
        if not isinstance(key, str) or not key:  # keys are JSON object keys and name the embodiment in requests
            raise ValueError(f"norm_stats: expected a non-empty string key, got {key!r}")
        if not isinstance(stats, Mapping):
            raise ValueError(f"norm_stats[{key!r}]: expected a dict of 'action' (and 'state') statistics, got "
                             f"{type(stats).__name__}")
        if "action" not in stats:
            raise ValueError(f"norm_stats[{key!r}]: missing 'action' statistics")
        dims = {"action": self.action_dim, "state": self.state_dim}
        for feature in ("action", "state"):
            if feature in stats:
                got = validate_feature_stats(stats[feature], f"norm_stats[{key!r}][{feature!r}]")
                if got != dims[feature]:
                    raise ValueError(f"norm_stats[{key!r}][{feature!r}]: expected {dims[feature]} dimensions, got {got}")
        field = f"norm_stats[{key!r}]['action_mode']"
        modes = expand_action_modes(stats.get("action_mode", "abs"), self.action_dim, field)
        own = stats["action"].get("embodiment_dim", self.action_dim)
        if is_relative(modes[own:]):  # a padded dimension has no state value to be relative to
            raise ValueError(f"{field}: expected 'abs' on the padded dimensions {own}..{self.action_dim - 1}, got "
                             f"{modes[own:]}")
        needed = relative_state_width(modes, self.action_dim)
        state_width = stats["state"].get("embodiment_dim", self.state_dim) if "state" in stats else self.state_dim
        # action dimension i is relative to state dimension i (a model without state decodes from any raw state given)
        if state_width and state_width < needed:
            raise ValueError(f"{field}: {describe_action_mode(compact_action_mode(modes))} needs state values for "
                             f"action dimensions 0..{needed - 1}, but the embodiment's state has {state_width}")
        if "action_mode" in stats:  # one form per meaning: "rel" and ["rel"] * D compare equal afterwards
            stats = {**stats, "action_mode": compact_action_mode(modes)}
        self.norm_stats[key] = _json_copy(stats, f"norm_stats[{key!r}]")
        self._normalizers.clear()

    def compute_norm_stats(self, key: str, actions, states=None, action_mode="q99", state_mode="q99") -> dict:
        """Computes and registers statistics from arrays: actions `[N, D]` (or `[N, T, D]`), states `[N, S]`."""
        if not isinstance(key, str) or not key:
            raise ValueError(f"norm_stats: expected a non-empty string key, got {key!r}")
        actions = self._flatten_rows(actions, self.action_dim, f"compute_norm_stats({key!r}).actions")
        stats = {"action": compute_stats(actions, action_mode, f"compute_norm_stats({key!r}).action_mode"),
                 "num_transitions": int(actions.shape[0])}
        if states is not None:
            states = self._flatten_rows(states, self.state_dim, f"compute_norm_stats({key!r}).states")
            stats["state"] = compute_stats(states, state_mode, f"compute_norm_stats({key!r}).state_mode")
        self.set_norm_stats(key, stats)
        return stats

    @staticmethod
    def _flatten_rows(values, dim: int, field: str) -> np.ndarray:
        try:
            array = np.asarray(values, dtype=np.float64)
        except (TypeError, ValueError):
            raise ValueError(f"{field}: expected a numeric array [N, {dim}] or [N, T, {dim}]") from None
        if array.ndim < 2 or array.shape[-1] != dim or array.shape[0] == 0:
            raise ValueError(f"{field}: expected shape [N, {dim}] or [N, T, {dim}] with N ≥ 1, got {list(array.shape)}")
        if not np.isfinite(array).all():
            raise ValueError(f"{field}: contains NaN or inf")
        return array.reshape(-1, dim)

    def _normalize_rows(self, raw: np.ndarray, keys: list, feature: str, field: str, inverse: bool = False):
        """Normalises (or, `inverse`, un-normalises) each sample with its embodiment's statistics (one call per
        distinct key)."""

        def apply(key, values):
            normalizer = self._normalizer(self._feature_stats(key, feature, field))
            return normalizer.unnormalize(values) if inverse else normalizer.normalize(values)

        if len(set(keys)) == 1:
            return apply(keys[0], raw)
        out = np.empty_like(raw)
        for key in dict.fromkeys(keys):
            rows = [b for b, k in enumerate(keys) if k == key]
            out[rows] = apply(key, raw[rows])
        return out

    def _feature_stats(self, key: str | None, feature: str, field: str) -> dict:
        stats = self._stats_for(key, field)
        if feature not in stats:
            raise ValueError(f"{field}: embodiment {key!r} has no {feature!r} statistics")
        return stats[feature]

    def _normalizer(self, feature_stats: Mapping) -> FeatureNormalizer:
        """The compiled form of one feature's statistics, made on first use and kept until `set_norm_stats` changes
        the statistics (which stores copies, so the identity of a feature's stats dict is a safe key; the entry holds
        the dict, so its id cannot be reused while cached)."""
        key = id(feature_stats)
        if key not in self._normalizers:
            self._normalizers[key] = (feature_stats, FeatureNormalizer(feature_stats))
        return self._normalizers[key][1]

    def embodiment_key(self, key: str | None, field: str = "embodiment") -> str:
        """The statistics key `key` names (None: the only one); errors name `field` and list the known keys."""
        if not self.norm_stats:
            raise ValueError(f"{field}: this processor has no normalisation statistics; add them with "
                             "processor.compute_norm_stats(key, actions, states) or set_norm_stats(key, stats)")
        if key is None:
            if len(self.norm_stats) > 1:
                raise ValueError(f"{field}: several embodiments are known, name one of {sorted(self.norm_stats)}")
            return next(iter(self.norm_stats))
        if key not in self.norm_stats:
            raise ValueError(f"{field}: unknown key {key!r}; known keys: {sorted(self.norm_stats)}")
        return key

    def _stats_for(self, key: str | None, field: str) -> dict:
        return self.norm_stats[self.embodiment_key(key, field)]

    def embodiment_dims(self, key: str | None) -> tuple[int, int]:
        """(action, state) widths of embodiment `key` itself. A cross-embodiment mixture pads every embodiment to the
        model's widths and records the real ones as `embodiment_dim`; other statistics span the model's widths."""
        stats = (self.norm_stats or {}).get(key) if key is not None else None
        if stats is None:
            return self.action_dim, self.state_dim
        action = stats["action"].get("embodiment_dim", self.action_dim)
        state = stats["state"].get("embodiment_dim", self.state_dim) if "state" in stats else self.state_dim
        return action, state

    def embodiment_action_mode(self, key: str | None) -> str | list[str]:
        """The action mode embodiment `key`'s statistics record (one mode, or one per action dimension; see
        `hf_vla.normalization`): "abs" when they record none, or for an unknown key."""
        stats = (self.norm_stats or {}).get(key) if key is not None else None
        return "abs" if stats is None else stats.get("action_mode", "abs")

    # ------------------------------------------------------------------ inputs

    def _check_views(self, images, batch_size: int) -> list[list[np.ndarray]]:
        """Validates the per-sample camera views and returns them as uint8 [H, W, 3] arrays at `image_size`."""
        if not isinstance(images, (list, tuple)) or len(images) != batch_size:
            got = len(images) if isinstance(images, (list, tuple)) else type(images).__name__
            raise ValueError(f"images: expected a list of {batch_size} samples (one per text), got {got}")
        height, width = self.image_size
        samples = []
        for b, views in enumerate(images):
            if not isinstance(views, (list, tuple)):
                views = [views]
            if len(views) != len(self.camera_names):
                raise ValueError(f"images[{b}]: expected {len(self.camera_names)} camera views "
                                 f"{self.camera_names}, got {len(views)}")
            resized = [self._resized(view, f"images[{b}][{v}]", height, width) for v, view in enumerate(views)]
            samples.append([np.concatenate(resized, axis=0)] if self.concat_views else resized)
        return samples

    @staticmethod
    def _resized(view, field: str, height: int, width: int) -> np.ndarray:
        if isinstance(view, Image.Image):
            if view.mode != "RGB":
                raise ValueError(f"{field}: expected an RGB image, got PIL mode {view.mode!r}")
        elif not isinstance(view, np.ndarray):
            raise ValueError(f"{field}: expected a uint8 numpy array [H, W, 3] or a PIL image, got {type(view).__name__}")
        elif view.dtype != np.uint8:
            raise ValueError(f"{field}: expected dtype uint8, got {view.dtype}")
        elif view.ndim != 3 or view.shape[-1] != 3:
            raise ValueError(f"{field}: expected shape [H, W, 3], got {list(view.shape)}")
        size = view.size if isinstance(view, Image.Image) else (view.shape[1], view.shape[0])
        if min(size) < 1:
            raise ValueError(f"{field}: expected an image of at least 1 × 1 pixels, got {size[1]} × {size[0]}")
        if size != (width, height):
            image = view if isinstance(view, Image.Image) else Image.fromarray(view)
            # bicubic, as Qwen's image processor and StarVLA (PIL's default) resize: the pixels a checkpoint trained on
            return np.asarray(image.resize((width, height), Image.BICUBIC))
        return np.asarray(view)

    def _own_state_width(self, keys: list) -> int:
        """The state width the batch's embodiment gives itself (the model's unless a mixture padded it)."""
        try:
            widths = {self.embodiment_dims(self.embodiment_key(key))[1] for key in set(keys)}
        except ValueError:  # no statistics, or no key among several: normalising the state reports it, if given
            return self.state_dim
        return widths.pop() if len(widths) == 1 else self.state_dim

    def _padded_state(self, state, width: int, keys: list, batch_size: int) -> np.ndarray:
        """The raw state at the model's width; an embodiment's own, narrower state is zero-padded as in training."""
        shape = tuple(np.shape(state))
        if width < self.state_dim and shape == (batch_size, width):
            raw = self._check_array(state, "state", (batch_size, width))
            return np.pad(raw, ((0, 0), (0, self.state_dim - width)))
        if width < self.state_dim and shape != (batch_size, self.state_dim):
            raise ValueError(f"state: expected shape [{batch_size}, {width}] (embodiment {keys[0]!r}'s own state) or "
                             f"[{batch_size}, {self.state_dim}] (padded to the model's), got {list(shape)}")
        return self._check_array(state, "state", (batch_size, self.state_dim))

    def _check_array(self, value, field: str, shape: tuple, kinds: str = "fiu") -> np.ndarray:
        """A finite float32 array of `shape` (None for the batch axis) with a dtype among `kinds` (see
        `normalization.numeric_array`)."""
        array = numeric_array(value, field, kinds)
        if array.ndim != len(shape) or any(e is not None and e != g for e, g in zip(shape, array.shape)):
            expected = "[" + ", ".join("B" if e is None else str(e) for e in shape) + "]"
            raise ValueError(f"{field}: expected shape {expected}, got {list(array.shape)}")
        return finite_float32(array, field)

    def check_instruction(self, instruction, field: str = "text") -> None:
        """Raises unless `instruction` is a string free of the tokenizer's added tokens: `<|im_end|>` would end the
        user turn early, `<|image_pad|>` claim an image's place."""
        if not isinstance(instruction, str):
            raise ValueError(f"{field}: expected str, got {type(instruction).__name__}")
        reserved = _reserved_tokens(self.tokenizer, len(self.tokenizer)).search(instruction)
        if reserved:
            raise ValueError(f"{field}: the instruction may not contain the reserved token {reserved.group(0)!r}")

    def _instruction_text(self, instruction: str, normalized_state: np.ndarray | None, b: int) -> str:
        self.check_instruction(instruction, f"text[{b}]")
        text = instruction
        if normalized_state is not None and self.state_in_prompt:
            text += " " + state_to_text(normalized_state, self.state_token_template, self.state_bins)
        if self.action_query_token:
            text += self.action_query_suffix.format(
                horizon=self.action_horizon, queries=self.action_query_token * self.action_horizon
            )
        return self.prompt_template.replace("{instruction}", text)

    def build_prompt(self, text: str, num_views: int) -> str:
        content = [{"type": "image"} for _ in range(num_views)] + [{"type": "text", "text": text}]
        return self.tokenizer.apply_chat_template(
            [{"role": "user", "content": content}],
            chat_template=self.chat_template,
            tokenize=False,
            add_generation_prompt=True,
        )

    def __call__(
        self,
        images=None,
        text=None,
        state=None,
        actions=None,
        action_mask=None,
        embodiment: str | None = None,
        return_tensors: str = "pt",
        pixel_buffer: torch.Tensor | None = None,
        **kwargs,
    ) -> BatchFeature:
        """
        Args:
            images: per sample, a list with one view per camera (`uint8 [H, W, 3]` arrays or RGB PIL images).
            text: the instructions, one per sample (a single string for a batch of one).
            state: raw robot state `[B, state_dim]` (or a padded embodiment's own `[B, S]`); required when the model
                writes it into its prompt (a head's state encoder checks its own).
            actions: raw target chunks `[B, action_horizon, action_dim]` (training).
            embodiment: which statistics normalise state and actions: one key, or one per sample for mixed batches
                (optional when only one is known).
            action_mask: `[B, action_horizon]` valid steps, or `[B, action_horizon, action_dim]` valid entries
                (padded dimensions of a cross-embodiment mixture).
            pixel_buffer: the `pixel_values` of an earlier call, to be overwritten with this call's pixels when the
                shapes match (a control loop that has consumed the earlier batch saves the allocation).
        Returns a BatchFeature with `input_ids, attention_mask, pixel_values, image_grid_thw, mm_token_type_ids`,
        plus `state`, `actions`, `action_mask` when given.
        """
        if kwargs:  # a misspelt `action=` or `states=` would otherwise drop the targets or the state silently
            raise TypeError(f"VLAProcessor: unexpected argument(s) {sorted(kwargs)}; expected images, text, state, "
                            "actions, action_mask, embodiment, return_tensors, pixel_buffer")
        if return_tensors != "pt":
            raise ValueError(f"return_tensors: only 'pt' is supported, got {return_tensors!r}")
        if isinstance(text, str):
            text = [text]
        if not isinstance(text, (list, tuple)) or not text:
            raise ValueError(f"text: expected a non-empty list of instructions, got {type(text).__name__}")
        batch_size = len(text)
        views = self._check_views(images, batch_size)

        if isinstance(embodiment, (list, tuple)):
            if len(embodiment) != batch_size:
                raise ValueError(f"embodiment: expected one key per sample ({batch_size}), got {len(embodiment)}")
            keys = list(embodiment)
        else:
            keys = [embodiment] * batch_size
        if state is not None or actions is not None:  # before the values, so a bad key is named as the key
            for key in set(keys):
                self.embodiment_key(key)

        extra = {}
        normalized_state = None
        if state is not None and self.state_dim == 0:
            raise ValueError("state: this model takes no state (state_dim=0)")
        own_state = self._own_state_width(keys) if self.state_dim else 0
        if state is None and self.state_dim and own_state == 0:
            state = np.zeros((batch_size, 0), np.float32)  # an embodiment without state: zeros, as a mixture pads it
        if state is None and self.state_dim and self.state_in_prompt:  # (a head's state encoder checks its own)
            raise ValueError(f"state: missing; this model reads a state of {own_state} values in its prompt")
        if state is not None:
            raw = self._padded_state(state, own_state, keys, batch_size)
            normalized_state = self._normalize_rows(raw, keys, "state", "state")
            extra["state"] = torch.from_numpy(normalized_state)
        if actions is not None:
            raw = self._check_array(actions, "actions", (batch_size, self.action_horizon, self.action_dim))
            extra["actions"] = torch.from_numpy(self._normalize_rows(raw, keys, "action", "actions"))
        if action_mask is not None:
            full = (batch_size, self.action_horizon, self.action_dim)
            mask = numeric_array(action_mask, "action_mask", kinds="fiub")
            mask = self._check_array(mask, "action_mask", full if mask.ndim == 3 else full[:2], kinds="fiub")
            if not np.isin(mask, (0, 1)).all():  # other values would weigh the loss, or flip its sign
                raise ValueError(f"action_mask: expected booleans or 0 / 1, got values {np.unique(mask)[:8].tolist()}")
            extra["action_mask"] = torch.from_numpy(mask)

        for b, instruction in enumerate(text):
            if not isinstance(instruction, str):
                raise ValueError(f"text[{b}]: expected str, got {type(instruction).__name__}")
        adapter = get_backbone_adapter(self.backbone)
        image_inputs = adapter.preprocess_images(
            self.image_processor, [image for sample in views for image in sample], out=pixel_buffer
        )
        return BatchFeature({**self._text_inputs(text, normalized_state, image_inputs), **image_inputs, **extra})

    def _text_inputs(self, text: Sequence[str], normalized_state: np.ndarray | None, image_inputs) -> dict:
        """Left-padded `input_ids`, `attention_mask` and `mm_token_type_ids` for the prompts. A control loop sends
        the same instruction with same-sized images at every step, so recent results are kept in a small cache keyed
        by what determines them (returned as copies)."""
        adapter = get_backbone_adapter(self.backbone)
        counts = adapter.image_token_counts(image_inputs, self.image_processor.merge_size)
        views_per_prompt = 1 if self.concat_views else len(self.camera_names)
        state_texts = None
        if self.state_in_prompt and normalized_state is not None:
            state_texts = tuple(
                state_to_text(row, self.state_token_template, self.state_bins) for row in normalized_state
            )
        # another tokenizer attached, or tokens added to this one later, change the ids: both are in the key
        template = (self.chat_template, self.prompt_template, self.action_query_suffix, self.action_query_token,
                    self.action_horizon)  # fmt: skip
        key = (id(self.tokenizer), len(self.tokenizer), self.tokenizer.pad_token_id, template, views_per_prompt,
               tuple(counts), tuple(text), state_texts)  # fmt: skip
        encoded = self._prompt_cache.get(key)
        if encoded is None:
            instructions = [
                self._instruction_text(instruction, None if normalized_state is None else normalized_state[b], b)
                for b, instruction in enumerate(text)
            ]
            prompts = [self.build_prompt(instruction, views_per_prompt) for instruction in instructions]
            encoded = self._tokenize_prompts(prompts, counts, adapter.image_token)
            self._prompt_cache[key] = encoded
            while len(self._prompt_cache) > PROMPT_CACHE_SIZE:
                self._prompt_cache.popitem(last=False)
        else:
            self._prompt_cache.move_to_end(key)
        return {name: tensor.clone() for name, tensor in encoded.items()}

    def _tokenize_prompts(self, prompts: list[str], counts: list[int], image_token: str) -> dict:
        """Tokenises the prompts with one placeholder per image, then repeats each placeholder id as many times as
        its image has tokens (`counts`), and left-pads. The image token is an added token, which the tokenizer splits
        out before anything else, so this equals tokenising the expanded text; it spares the tokenizer hundreds of
        placeholders at every control step whose state text changes the prompt."""
        image_token_id = self.tokenizer.convert_tokens_to_ids(image_token)
        if not _reserved_tokens(self.tokenizer, len(self.tokenizer)).fullmatch(image_token):  # i.e. an added token
            raise ValueError(f"tokenizer: the image token {image_token!r} must be an added token of the vocabulary")
        placeholder_rows = self.tokenizer(prompts)["input_ids"]
        slots = sum(ids.count(image_token_id) for ids in placeholder_rows)
        if slots != len(counts):
            raise ValueError(f"images: the prompts hold {slots} image slots but {len(counts)} images were given")
        runs, rows = iter(counts), []
        for ids in placeholder_rows:
            row = []
            for token in ids:
                row.extend([token] * next(runs) if token == image_token_id else (token,))
            rows.append(row)
        length = max(len(row) for row in rows)
        if self.tokenizer.pad_token_id is None and any(len(row) != length for row in rows):
            raise ValueError("tokenizer: prompts of different lengths need a pad token, and this tokenizer has none")
        pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0  # 0: never used
        input_ids = torch.full((len(rows), length), pad_id, dtype=torch.long)
        attention_mask = torch.zeros((len(rows), length), dtype=torch.long)
        for b, row in enumerate(rows):
            input_ids[b, length - len(row):] = torch.tensor(row, dtype=torch.long)
            attention_mask[b, length - len(row):] = 1
        return {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "mm_token_type_ids": (input_ids == image_token_id).int(),
        }

    def _expand_image_tokens(self, prompts: list[str], counts: list[int]) -> list[str]:
        """Each image placeholder, in order, repeated as many times as its image has tokens (`counts`)."""
        token = get_backbone_adapter(self.backbone).image_token
        expanded, index = [], 0
        for prompt in prompts:
            parts = prompt.split(token)
            out = parts[0]
            for part in parts[1:]:
                out += token * counts[index] + part
                index += 1
            expanded.append(out)
        if index != len(counts):
            raise ValueError(f"images: the prompts hold {index} image slots but {len(counts)} images were given")
        return expanded

    def encode_chat(self, samples: list[dict], max_length: int | None = None) -> BatchFeature:
        """VLM chat samples (`{"images": [...], "messages": [...]}`, see `hf_vla.data.vlm_chat`) → a right-padded
        training batch: `input_ids, attention_mask, pixel_values, image_grid_thw, mm_token_type_ids, labels`.

        Labels are -100 except on each assistant reply and its end-of-turn token. Images are resized to
        `image_size`; a batch without images has no pixel tensors. `max_length` truncates, and raises rather than
        cut into a sample's image tokens or cut away every token of its replies.
        """
        from .data.vlm_chat import render_with_reply_spans, spans_after_expansion

        if not isinstance(samples, (list, tuple)) or not samples:
            raise ValueError("encode_chat: expected a non-empty list of chat samples")
        adapter = get_backbone_adapter(self.backbone)
        height, width = self.image_size

        def render(messages, add_generation_prompt):
            return self.tokenizer.apply_chat_template(messages, chat_template=self.chat_template, tokenize=False,
                                                      add_generation_prompt=add_generation_prompt)

        texts, spans, images, images_per_sample = [], [], [], []
        for b, sample in enumerate(samples):
            try:
                text, reply_spans = render_with_reply_spans(sample["messages"], render)
            except ValueError as err:  # which sample of the chat batch
                raise ValueError(f"samples[{b}]: {err}") from err
            views = list(sample.get("images") or [])
            if text.count(adapter.image_token) != len(views):
                raise ValueError(f"samples[{b}]: {len(views)} image(s) for {text.count(adapter.image_token)} "
                                 "image placeholder(s) in the messages")
            images += [self._resized(view, f"samples[{b}]['images'][{k}]", height, width)
                       for k, view in enumerate(views)]
            texts.append(text)
            spans.append(reply_spans)
            images_per_sample.append(len(views))

        image_inputs = {}
        if images:
            image_inputs = adapter.preprocess_images(self.image_processor, images)
            counts = adapter.image_token_counts(image_inputs, self.image_processor.merge_size)
            firsts = np.cumsum([0] + images_per_sample)
            spans = [spans_after_expansion(text, reply_spans, adapter.image_token, counts[firsts[b]:firsts[b + 1]])
                     for b, (text, reply_spans) in enumerate(zip(texts, spans))]
            texts = self._expand_image_tokens(texts, counts)

        encoded = self.tokenizer(texts, add_special_tokens=False, return_offsets_mapping=True)
        image_token_id = self.tokenizer.convert_tokens_to_ids(adapter.image_token)
        rows = []
        for b, (ids, offsets) in enumerate(zip(encoded["input_ids"], encoded["offset_mapping"])):
            labels = [
                token if token != image_token_id and any(lo <= start < hi for lo, hi in spans[b]) else -100
                for token, (start, _) in zip(ids, offsets)
            ]
            if max_length is not None and len(ids) > max_length:
                if image_token_id in ids[max_length:]:
                    raise ValueError(f"samples[{b}]: max_length={max_length} would cut into its image tokens (the "
                                     f"sample has {len(ids)} tokens); raise max_length or drop the sample")
                kept = labels[1:max_length]  # the first position is never scored (labels shift by one)
                if all(label == -100 for label in kept) and any(label != -100 for label in labels[1:]):
                    raise ValueError(f"samples[{b}]: max_length={max_length} would cut away every reply token (the "
                                     f"sample has {len(ids)} tokens, its reply starts at token "
                                     f"{next(i for i, label in enumerate(labels) if label != -100)}); raise "
                                     "max_length or drop the sample")
                ids, labels = ids[:max_length], labels[:max_length]
            rows.append((ids, labels))

        length = max(len(ids) for ids, _ in rows)
        pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.tokenizer.eos_token_id
        input_ids = torch.full((len(rows), length), pad_id, dtype=torch.long)
        labels = torch.full((len(rows), length), -100, dtype=torch.long)
        attention_mask = torch.zeros((len(rows), length), dtype=torch.long)
        for b, (ids, row_labels) in enumerate(rows):
            input_ids[b, : len(ids)] = torch.tensor(ids, dtype=torch.long)
            labels[b, : len(ids)] = torch.tensor(row_labels, dtype=torch.long)
            attention_mask[b, : len(ids)] = 1
        return BatchFeature({
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            **image_inputs,
            "mm_token_type_ids": (input_ids == image_token_id).int(),
            "labels": labels,
        })

    # ------------------------------------------------------------------ outputs

    def decode_actions(self, actions, unnorm_key: str | Sequence[str] | None = None, state=None) -> np.ndarray:
        """Normalised chunk (`torch` or numpy, `[..., action_dim]`) → robot units, `np.float32` of the same shape.
        `unnorm_key`: one embodiment's statistics, or one key per sample (first axis) for a mixed batch (then at the
        model's width; one key gives its embodiment's own width).

        `state` (one key only): the raw state the chunk was predicted from, `[S]` or `[B, S]`. For an embodiment
        trained on relative actions (statistics `action_mode` "rel" or "delta", for all dimensions or per dimension;
        see `hf_vla.normalization`) the chunk then comes back absolute; without it, as the model predicts it."""
        actions = numeric_array(actions, "actions").astype(np.float32)  # NaN kept: a token row that did not decode
        if actions.ndim == 0 or actions.shape[-1] != self.action_dim:
            raise ValueError(f"actions: expected last dimension {self.action_dim}, got shape {list(actions.shape)}")
        if isinstance(unnorm_key, (list, tuple)):
            if actions.ndim < 2 or len(unnorm_key) != actions.shape[0]:
                raise ValueError(f"unnorm_key: expected one key per sample of actions {list(actions.shape)}, got "
                                 f"{len(unnorm_key)} keys")
            modes = {k: self.embodiment_action_mode(self.embodiment_key(k, "unnorm_key")) for k in unnorm_key}
            relative = sorted(k for k, mode in modes.items() if is_relative(mode))
            if state is not None and relative:
                raise ValueError(f"state: absolute actions for {relative} (relative action modes) are decoded one "
                                 "unnorm_key at a time")
            return self._normalize_rows(actions, list(unnorm_key), "action", "unnorm_key", inverse=True)
        if unnorm_key is not None and not isinstance(unnorm_key, str):
            raise ValueError(f"unnorm_key: expected a key (str) or one per sample, got {type(unnorm_key).__name__}")
        key = self.embodiment_key(unnorm_key, "unnorm_key")
        width = self.embodiment_dims(key)[0]
        decoded = self._normalizer(self.norm_stats[key]["action"]).unnormalize(actions)[..., :width]
        mode = self.embodiment_action_mode(key)
        if state is None or not is_relative(mode):
            return decoded
        state = numeric_array(state, "state").astype(np.float32)
        if state.ndim != decoded.ndim - 1 or state.shape[:-1] != decoded.shape[:-2] or not np.isfinite(state).all():
            expected = ", ".join([*map(str, decoded.shape[:-2]), "S"])
            raise ValueError(f"state: expected finite values of shape [{expected}] for actions {list(decoded.shape)}, "
                             f"got {list(state.shape)}")
        own_state = self.embodiment_dims(key)[1]
        modes = expand_action_modes(mode, self.action_dim)[:width]  # the statistics' width is the model's
        needed = relative_state_width(modes, width)  # action dimension i is relative to state dimension i
        if state.shape[-1] < needed or (self.state_dim and state.shape[-1] not in (own_state, self.state_dim)):
            widths = (f"{self.state_dim} (the model's state width) or {own_state} (the embodiment's own)"
                      if own_state != self.state_dim else f"{self.state_dim} (the model's state width)")
            expected = widths if self.state_dim else f"at least {needed}"
            raise ValueError(f"state: {describe_action_mode(mode)} actions of embodiment {key!r} are relative to its "
                             f"first {needed} state values; expected {expected} values, got {state.shape[-1]}")
        return absolute_actions(decoded, state, modes)

    @property
    def model_input_names(self):
        return ["input_ids", "attention_mask", "pixel_values", "image_grid_thw", "mm_token_type_ids", "state"]


__all__ = ["VLAProcessor", "state_to_text"]


if __name__ == "__main__":
    from .testing import build_tiny_vla, random_observation

    _, processor = build_tiny_vla("oft")
    batch = processor(**random_observation(processor, with_actions=True), embodiment="demo")
    print({name: list(value.shape) for name, value in batch.items()})
    print("prompt:", processor.tokenizer.decode(batch["input_ids"][0]).replace("<|image_pad|>", "")[:200])
    decoded = processor.decode_actions(batch["actions"], unnorm_key="demo")
    raw = np.asarray(random_observation(processor, with_actions=True)["actions"], dtype=np.float32)
    print("normalise → decode round trip, max |Δ| inside the q99 range:",
          float(np.abs(decoded - raw)[np.abs(batch["actions"].numpy()) < 1].max()))
