"""The policy server's protocol: the request forms it reads, validated into rows of one sample each, and the
per-connection post-processing of the action chunks it returns. The forms and replies are described in
`hf_vla.serving.server`."""

from __future__ import annotations

import reprlib
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from typing import Any

import numpy as np

from ..normalization import describe_action_mode, finite_float32, is_relative, numeric_array, python_strings

FLAT_IMAGE_PREFIXES = ("", "observation/", "observation/images/", "observation.images.")
# openpi's LIBERO clients send `observation/image` (the main view) and `observation/wrist_image`: the main view's
# names belong to a one-camera model's camera or to the camera named `primary`, `observation/<camera>_image` to each
MAIN_VIEW_ALIASES = ("image", "observation/image")
MAIN_CAMERA = "primary"
STATE_KEYS = ("state", "observation/state", "observation.state")
STARVLA_MARKERS = ("type", "payload", "examples", "batch_images")
INFER_TYPES = ("infer", "predict_action")
# in the error reply to a request whose chunk does not decode; evaluation clients count such episodes as failures
UNDECODABLE_CHUNK = "is not a valid action chunk"


# ---------------------------------------------------------------- post-processing


@dataclass(frozen=True)
class PostProcess:
    """Per-sample action post-processing (delta → absolute, gripper binarisation, first N steps)."""

    execute_steps: int | None = None
    delta_dims: tuple[int, ...] = ()
    delta_state_dims: tuple[int, ...] | None = None
    gripper_dims: tuple[int, ...] = ()
    gripper_threshold: float = 0.5
    gripper_low: float = 0.0
    gripper_high: float = 1.0

    def updated(self, options: Mapping) -> PostProcess:
        """A copy with `options` applied (None resets an option to its default); raises ValueError on bad input."""
        names = set(self.__dataclass_fields__)
        unknown = sorted(str(k) for k in options if k not in names)
        if unknown:
            raise ValueError(f"configure: unknown option(s) {unknown}; known: {sorted(names)}")
        defaults, values = PostProcess(), {}
        for name, value in options.items():
            if value is None:
                values[name] = getattr(defaults, name)
            elif name == "execute_steps":
                values[name] = _as_int(value, name)
            elif name.endswith("_dims"):
                if not isinstance(value, (list, tuple, np.ndarray)) or np.ndim(value) != 1:
                    raise ValueError(f"{name}: expected a list of dimension indices, got {reprlib.repr(value)}")
                values[name] = tuple(_as_int(v, f"{name}[{i}]") for i, v in enumerate(value))
            else:
                if isinstance(value, bool) or not isinstance(value, (int, float, np.number)):
                    raise ValueError(f"{name}: expected a finite number, got {reprlib.repr(value)}")
                values[name] = float(value)
        return replace(self, **values)

    def check(self, action_horizon: int, action_dim: int, state_dim: int) -> None:
        for name in ("gripper_threshold", "gripper_low", "gripper_high"):
            if not np.isfinite(getattr(self, name)):
                raise ValueError(f"{name}: expected a finite number, got {getattr(self, name)}")
        if self.execute_steps is not None and not 1 <= self.execute_steps <= action_horizon:
            raise ValueError(f"execute_steps: expected 1..{action_horizon}, got {self.execute_steps}")
        for name in ("delta_dims", "gripper_dims"):
            bad = [d for d in getattr(self, name) if not 0 <= d < action_dim]
            if bad:
                raise ValueError(f"{name}: indices {bad} out of range for action_dim {action_dim}")
        if self.delta_state_dims is not None and len(self.delta_state_dims) != len(self.delta_dims):
            raise ValueError(f"delta_state_dims: expected {len(self.delta_dims)} indices (one per delta_dims), "
                             f"got {len(self.delta_state_dims)}")
        # the state indices the delta integration reads: delta_state_dims, or else delta_dims themselves
        name = "delta_state_dims" if self.delta_state_dims is not None else "delta_dims"
        bad = [d for d in getattr(self, name) if d < 0 or (state_dim and d >= state_dim)]
        if self.delta_dims and bad:
            raise ValueError(f"{name}: state indices {bad} out of range for state_dim {state_dim}")

    @property
    def needs_state(self) -> bool:
        return bool(self.delta_dims)

    def apply(self, actions: np.ndarray, state: np.ndarray | None) -> np.ndarray:
        """`actions` float32 [T, D] of one sample, `state` its raw state [S] → post-processed [T', D]."""
        out = np.array(actions, dtype=np.float32)
        if self.delta_dims:
            dims = list(self.delta_dims)
            state_dims = list(self.delta_state_dims if self.delta_state_dims is not None else self.delta_dims)
            if state is None or max(state_dims) >= state.shape[-1]:
                raise ValueError(f"state: delta_dims post-processing needs a state with indices {state_dims}")
            out[:, dims] = state[state_dims].astype(np.float32) + np.cumsum(out[:, dims], axis=0)
        if self.gripper_dims:
            dims = list(self.gripper_dims)
            out[:, dims] = np.where(out[:, dims] > self.gripper_threshold, self.gripper_high, self.gripper_low)
        if self.execute_steps is not None:
            out = out[: self.execute_steps]
        return out

    def as_dict(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}


def _as_int(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise ValueError(f"{name}: expected an integer, got {reprlib.repr(value)}")
    return int(value)


# ---------------------------------------------------------------- requests


@dataclass
class Row:
    """One sample: a view per camera (uint8 [H, W, 3]), its instruction, raw state and unnorm key."""

    views: tuple[np.ndarray, ...]
    instruction: str
    state: np.ndarray | None
    unnorm_key: str | None

    def group_key(self) -> tuple:
        return self.unnorm_key, tuple(v.shape for v in self.views), self.state is not None


@dataclass
class Request:
    rows: list[Row]
    unbatched: bool = False


@dataclass
class Limits:
    max_frame_bytes: int = 64 << 20
    max_array_bytes: int = 32 << 20
    max_request_rows: int = 64
    max_instruction_chars: int = 4096


class RequestParser:
    """Validates decoded messages against the model (cameras, dtypes, shapes, keys) and turns them into rows."""

    def __init__(self, processor, default_unnorm_key: str | None, limits: Limits, default_prompt: str | None = None):
        self.cameras = list(processor.camera_names)
        self.camera_keys = _flat_camera_keys(self.cameras)
        self.state_dim = int(processor.state_dim)
        self.check_instruction = processor.check_instruction
        self.embodiment_dims = processor.embodiment_dims
        self.embodiment_action_mode = processor.embodiment_action_mode
        self.unnorm_keys = sorted(processor.norm_stats or {})
        if default_unnorm_key is None and len(self.unnorm_keys) == 1:
            default_unnorm_key = self.unnorm_keys[0]
        if default_unnorm_key is not None and default_unnorm_key not in self.unnorm_keys:
            raise ValueError(f"unnorm_key: unknown default key {default_unnorm_key!r}; available: {self.unnorm_keys}")
        self.default_unnorm_key = default_unnorm_key
        self.limits = limits
        self.default_prompt = None
        if default_prompt is not None:  # checked now, as a request's instruction would be
            self._instructions(default_prompt, 1, "default_prompt")
        self.default_prompt = default_prompt

    def openpi(self, obs: Mapping) -> Request:
        images = obs.get("images")
        if images is None:
            images, prefix = self._flat_images(obs), ""
        elif not isinstance(images, Mapping):
            raise ValueError(f"images: expected a map camera -> uint8 array, got {type(images).__name__}")
        else:
            flat = sorted(str(name) for name in self._flat_image_names() if obs.get(name) is not None)
            if flat:
                raise ValueError(f"images: sent both as an `images` map and as {flat}; send one")
            unknown = [str(c) for c in images if c not in self.cameras]
            if unknown:
                raise ValueError(f"images: unknown camera(s) {unknown}; this model takes {self.cameras}")
            prefix = "images."
        arrays = {}
        for camera in self.cameras:
            if camera not in images:
                raise ValueError(f"images.{camera}: missing; this model takes cameras {self.cameras}")
            arrays[camera] = self._image(images[camera], f"{prefix}{camera}", ranks=(3, 4))
        ranks = {a.ndim for a in arrays.values()}
        if len(ranks) > 1:
            raise ValueError("images: mix of batched [B, H, W, 3] and unbatched [H, W, 3] views")
        unbatched = ranks == {3}
        if unbatched:
            arrays = {c: a[None] for c, a in arrays.items()}
        sizes = {c: a.shape[0] for c, a in arrays.items()}
        batch = next(iter(sizes.values()))
        if len(set(sizes.values())) > 1:
            raise ValueError(f"images: cameras have different batch sizes {sizes}")
        self._check_rows(batch, "images")

        text_key = _one_of(obs, ("instruction", "prompt"), "") or "prompt"
        instructions = self._instructions(obs.get(text_key), batch, text_key)
        key = self._unnorm_key(obs.get("unnorm_key"), "unnorm_key")
        state_key = _one_of(obs, STATE_KEYS, "")
        states = [None] * batch
        if state_key is not None:
            state = self._numeric(obs[state_key], state_key)
            if state.ndim == 1 and batch == 1:
                state = state[None]
            if state.ndim != 2 or state.shape[0] != batch:
                raise ValueError(f"{state_key}: expected [S] or [{batch}, S], got {list(state.shape)}")
            states = list(self._state_at_model_width(state, state_key, key))
        else:
            self._check_state_given("state", key, f" (as {', '.join(STATE_KEYS[:-1])} or {STATE_KEYS[-1]})")
        rows = [
            Row(tuple(arrays[c][b] for c in self.cameras), instructions[b], states[b], key) for b in range(batch)
        ]
        return Request(rows, unbatched=unbatched)

    def starvla(self, message: Mapping) -> Request:
        payload, where = message, ""
        if "payload" in message:
            payload, where = message["payload"], "payload."
            if not isinstance(payload, Mapping):
                raise ValueError(f"payload: expected a map, got {type(payload).__name__}")
            beside = [name for name in ("examples", "batch_images", "unnorm_key") if name in message]
            if beside:
                raise ValueError(f"{beside}: sent beside `payload`, which holds the request; send them inside it")
        if "examples" not in payload and "batch_images" in payload:
            return self._starvla_batch_images(payload, where)
        examples = payload.get("examples")
        if not isinstance(examples, list) or not examples:
            raise ValueError(f"{where}examples: expected a non-empty list of examples, got {reprlib.repr(examples)}")
        self._check_rows(len(examples), f"{where}examples")
        key = self._unnorm_key(payload.get("unnorm_key"), f"{where}unnorm_key")
        rows = []
        for i, example in enumerate(examples):
            field_name = f"{where}examples[{i}]"
            if not isinstance(example, Mapping):
                raise ValueError(f"{field_name}: expected a map, got {type(example).__name__}")
            text_key = _one_of(example, ("lang", "instruction", "prompt"), f"{field_name}.") or "lang"
            (instruction,) = self._instructions(example.get(text_key), 1, f"{field_name}.{text_key}")
            views = self._views(example.get("image"), f"{field_name}.image")
            state = None
            if example.get("state") is not None:
                state = self._example_state(example["state"], f"{field_name}.state", key)
            else:
                self._check_state_given(f"{field_name}.state", key)
            rows.append(Row(views, instruction, state, key))
        return Request(rows)

    def _starvla_batch_images(self, payload: Mapping, where: str) -> Request:
        """StarVLA's request before `examples` (2025 clients, e.g. LIBERO's `M1Inference`): `batch_images` (per
        sample, a list of views), `instructions` (one per sample) and an optional `state` ([B, S] or [B, 1, S])."""
        images = payload["batch_images"]
        if not isinstance(images, list) or not images:
            raise ValueError(f"{where}batch_images: expected a non-empty list (per sample, a list of camera views), "
                             f"got {reprlib.repr(images)}")
        self._check_rows(len(images), f"{where}batch_images")
        instructions = self._instructions(payload.get("instructions"), len(images), f"{where}instructions")
        key = self._unnorm_key(payload.get("unnorm_key"), f"{where}unnorm_key")
        states = [None] * len(images)
        if payload.get("state") is not None:
            state = self._numeric(payload["state"], f"{where}state", batch_of_one_step=True)  # as StarVLA took it
            if state.ndim != 2 or state.shape[0] != len(images):
                raise ValueError(f"{where}state: expected [{len(images)}, S] or [{len(images)}, 1, S] (one row per "
                                 f"sample of batch_images), got {list(state.shape)}")
            states = list(self._state_at_model_width(state, f"{where}state", key))
        else:
            self._check_state_given(f"{where}state", key)
        rows = [Row(self._views(views, f"{where}batch_images[{b}]"), instructions[b], states[b], key)
                for b, views in enumerate(images)]  # fmt: skip
        return Request(rows)

    def _views(self, views: Any, name: str) -> tuple[np.ndarray, ...]:
        views = [views] if isinstance(views, np.ndarray) else views
        if not isinstance(views, list) or len(views) != len(self.cameras):
            got = len(views) if isinstance(views, list) else type(views).__name__
            raise ValueError(f"{name}: expected a list of {len(self.cameras)} uint8 [H, W, 3] arrays "
                             f"(cameras {self.cameras}), got {got}")
        return tuple(self._image(v, f"{name}[{j}]", ranks=(3,)) for j, v in enumerate(views))

    def _example_state(self, value: Any, name: str, key: str | None) -> np.ndarray:
        state = self._numeric(value, name)
        if state.ndim == 2 and state.shape[0] != 1:
            raise ValueError(f"{name}: expected [S] or [1, S] for one example, got {list(state.shape)}")
        return self._state_at_model_width(state.reshape(1, -1), name, key)[0]

    # -- field checks

    def _flat_image_names(self, camera: str | None = None) -> list[str]:
        """The keys a camera (by default, any camera) may be sent under without an `images` map."""
        return list(dict.fromkeys(name for c in ([camera] if camera else self.cameras) for name in self.camera_keys[c]))

    def _flat_images(self, obs: Mapping) -> dict:
        found = {}
        for camera in self.cameras:
            names = self._flat_image_names(camera)
            name = _one_of(obs, names, "")
            if name is None:
                keys = sorted(str(k) for k in obs)[:12]
                raise ValueError(f"images.{camera}: missing; send an `images` map or a key among {names} "
                                 f"(got keys {keys})")
            found[camera] = obs[name]
        return found

    def _image(self, array: Any, name: str, ranks: tuple[int, ...]) -> np.ndarray:
        if not isinstance(array, np.ndarray):
            raise ValueError(f"{name}: expected a uint8 numpy array, got {type(array).__name__}")
        if array.dtype != np.uint8:
            raise ValueError(f"{name}: expected dtype uint8, got {array.dtype}")
        if array.ndim in ranks and array.shape[-3] == 3 and array.shape[-1] != 3:  # channels first: openpi's ALOHA
            array = np.moveaxis(array, -3, -1)  # clients send [3, H, W], as its own server accepts
        shapes = " or ".join({3: "[H, W, 3]", 4: "[B, H, W, 3]"}[r] for r in ranks)
        if array.ndim not in ranks or array.shape[-1] != 3 or min(array.shape[-3:-1]) < 1:
            raise ValueError(f"{name}: expected shape {shapes} (or channels first), got {list(array.shape)}")
        return array

    def _instructions(self, value: Any, batch: int, name: str) -> list[str]:
        if value is None and self.default_prompt is not None:  # clients that send none (openpi's ALOHA sim)
            value = self.default_prompt
        if value is None:
            raise ValueError(f"{name}: missing; send the instruction as `prompt` or `instruction`"
                             if name in ("prompt", "instruction") else f"{name}: missing instruction")
        value = python_strings(value)  # as openpi's own server takes them
        texts = {name: value} if isinstance(value, str) else None
        if texts is None:
            if not isinstance(value, (list, tuple)) or len(value) != batch or not all(isinstance(v, str) for v in value):
                raise ValueError(f"{name}: expected a string or {batch} string(s), got {reprlib.repr(value)}")
            texts = {f"{name}[{i}]": text for i, text in enumerate(value)}
        if any(len(text) > self.limits.max_instruction_chars for text in texts.values()):
            raise ValueError(f"{name}: longer than {self.limits.max_instruction_chars} characters")
        for field, text in texts.items():
            self.check_instruction(text, field)
        return [value] * batch if isinstance(value, str) else list(value)

    def _numeric(self, value: Any, name: str, batch_of_one_step: bool = False) -> np.ndarray:
        """A finite float32 `[S]` or `[B, S]` array (`batch_of_one_step`: also StarVLA's `[B, 1, S]`, squeezed)."""
        value = numeric_array(value, name)
        if batch_of_one_step and value.ndim == 3 and value.shape[1] == 1:
            value = value[:, 0]
        if value.ndim not in (1, 2):
            raise ValueError(f"{name}: expected [S] or [B, S]{' or [B, 1, S]' if batch_of_one_step else ''}, got "
                             f"{list(value.shape)}")
        return finite_float32(value, name)

    def _check_state_given(self, name: str, key: str | None, where: str = "") -> None:
        # Actions predicted without the state a model was trained with are off-distribution: refuse, do not guess.
        width = self.embodiment_dims(key)[1]
        if width:
            raise ValueError(f"{name}: missing; this model takes a state of {width} values{where}")
        mode = self.embodiment_action_mode(key)
        if is_relative(mode):
            raise ValueError(f"{name}: missing; embodiment {key!r} predicts {describe_action_mode(mode)} actions, "
                             f"which are made absolute from the state{where}")

    def _state_at_model_width(self, state: np.ndarray, name: str, key: str | None) -> np.ndarray:
        """`[B, S]` rows at the model's width: an embodiment that a mixture padded may send its own, narrower state,
        zero-padded here as in training. A model without state takes any (decoding relative actions and post-processing
        may read it)."""
        width = state.shape[1]
        own = self.embodiment_dims(key)[1]
        if self.state_dim and width == own < self.state_dim:
            return np.pad(state, ((0, 0), (0, self.state_dim - own)))
        if self.state_dim and width != self.state_dim:
            expected = f"{own} (embodiment {key!r}'s own) or {self.state_dim}" if own < self.state_dim else self.state_dim
            raise ValueError(f"{name}: expected {expected} values per sample, got {width}")
        return state

    def _check_rows(self, rows: int, name: str) -> None:
        if rows < 1:
            raise ValueError(f"{name}: expected at least one sample, got 0")
        if rows > self.limits.max_request_rows:
            limit = self.limits.max_request_rows
            raise ValueError(f"{name}: {rows} samples exceed the server's max_request_rows={limit}")

    def _unnorm_key(self, key: Any, name: str) -> str | None:
        key = self.default_unnorm_key if key is None else key
        if key is None:
            if len(self.unnorm_keys) > 1:
                raise ValueError(f"{name}: several embodiments are known, name one of {self.unnorm_keys}")
            return None  # no statistics at all: predict reports it
        if not isinstance(key, str) or key not in self.unnorm_keys:
            raise ValueError(f"{name}: unknown key {reprlib.repr(key)}; available: {self.unnorm_keys}")
        return key


def _flat_camera_keys(cameras: Sequence[str]) -> dict[str, list[str]]:
    """Per camera, the top-level keys it may be sent under: its name with each prefix, then openpi's LIBERO names
    unless they are another camera's own (a model with cameras `primary` and `image` reads `observation/image` as
    the second)."""
    own = {camera: [prefix + camera for prefix in FLAT_IMAGE_PREFIXES] for camera in cameras}
    taken = {name for names in own.values() for name in names}
    keys = {}
    for camera in cameras:
        aliases = [f"observation/{camera}_image"]
        if len(cameras) == 1 or camera == MAIN_CAMERA:
            aliases += MAIN_VIEW_ALIASES
        keys[camera] = list(dict.fromkeys(own[camera] + [a for a in aliases if a not in taken]))
    return keys


def _one_of(message: Mapping, names: Sequence[str], where: str) -> str | None:
    """The one key among `names` (synonyms of one field) that `message` sets, or None; two set is an error, since
    which one the client meant is a guess."""
    present = [name for name in names if message.get(name) is not None]
    if len(present) > 1:
        raise ValueError(f"{', '.join(where + name for name in present)}: the same field sent under several names; "
                         "send one")
    return present[0] if present else None


if __name__ == "__main__":
    from ..testing import build_tiny_vla

    _, processor = build_tiny_vla("oft")
    parser = RequestParser(processor, default_unnorm_key=None, limits=Limits())
    rng = np.random.default_rng(0)
    frame = rng.integers(0, 256, (480, 640, 3), dtype=np.uint8)
    openpi = {"observation/primary": frame, "observation/wrist": frame, "prompt": "open the drawer",
              "observation/state": rng.normal(size=processor.state_dim)}  # fmt: skip
    state = rng.normal(size=processor.state_dim)
    starvla = {"type": "infer", "payload": {"examples": [{"image": [frame, frame], "lang": "close the door",
                                                          "state": state}] * 2}}  # fmt: skip
    legacy = {"batch_images": [[frame, frame]], "instructions": ["push the button"], "state": state[None]}
    for name, message, read in (("openpi", openpi, parser.openpi), ("StarVLA", starvla, parser.starvla),
                                ("StarVLA 2025", legacy, parser.starvla)):  # fmt: skip
        request = read(message)
        print(f"{name:>12} form → {len(request.rows)} row(s): views {[list(v.shape) for v in request.rows[0].views]}, "
              f"{request.rows[0].instruction!r}, state {'yes' if request.rows[0].state is not None else 'no'}, "
              f"unbatched {request.unbatched}")
    try:
        parser.openpi({**openpi, "observation/state": np.zeros(3)})
    except ValueError as error:
        print("bad request:", error)
    steps = np.linspace(0.1, 0.9, processor.action_horizon, dtype=np.float32)
    chunk = np.tile(steps[:, None], (1, processor.action_dim))
    post = PostProcess().updated({"delta_dims": [0, 1], "gripper_dims": [6], "execute_steps": 3})
    post.check(processor.action_horizon, processor.action_dim, processor.state_dim)
    state = np.arange(processor.state_dim, dtype=np.float32)
    print(f"post-processing {post.as_dict()}:\n{np.array2string(post.apply(chunk, state), precision=2)}")
