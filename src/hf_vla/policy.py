"""VLAPolicy: raw observations in, robot-unit action chunks out. Shared by the server, the Space and evaluation."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch
from PIL import Image

from .modeling_vla import HUB_DOWNLOAD_KWARGS
from .normalization import describe_action_mode, is_relative, numeric_array, python_strings
from .processing_vla import VLAProcessor

OBSERVATION_KEYS = ("images", "instruction", "prompt", "state", "unnorm_key")


class VLAPolicy:
    """The processor and the model in one object.

    An observation is batch-first, as openpi / RLinf clients send it:
        {"images": {camera: uint8 [B, H, W, 3]}, "instruction": [str] * B, "state": float [B, S]}
    The state is required when the model takes one. For an embodiment that a cross-embodiment mixture padded, the
    state may be its own (narrower) one and the actions come back at its own width. Actions are absolute: a model
    trained on delta / rel actions gets them turned back with the observation's state.
    A single unbatched observation ({camera: [H, W, 3]}, one string, state [S]) is accepted too; its result is [T, D]
    instead of [B, T, D]. `prompt` is accepted as a synonym of `instruction`, and `unnorm_key` may come with the
    observation, as the server takes it; any other key is refused rather than ignored.

    `pack_linear_weights=True` runs the model's large float32 linear layers on CPU through oneDNN with weights packed
    once (`hf_vla.packed_linear`): faster CPU inference for a second copy of those weights in memory.
    """

    def __init__(
        self, model, processor: VLAProcessor, unnorm_key: str | None = None, pack_linear_weights: bool = False
    ):
        settings = ("action_dim", "action_horizon", "state_dim", "state_in_prompt")
        differ = {name: (getattr(model.config, name), getattr(processor, name)) for name in settings
                  if getattr(model.config, name) != getattr(processor, name)}  # fmt: skip
        if differ:  # e.g. a processor without state for a model that reads one would predict from no state
            raise ValueError("VLAPolicy: the processor does not match the model: "
                             + ", ".join(f"{name} {m!r} (model) vs {p!r} (processor)" for name, (m, p) in differ.items()))
        if unnorm_key is not None:  # a misspelt default key fails here, as the server's does, not at the first call
            processor.embodiment_key(unnorm_key, "unnorm_key")
        self.model = model.eval()
        self.processor = processor
        self.unnorm_key = unnorm_key
        if pack_linear_weights:
            from .packed_linear import pack_linear_weights as pack

            pack(self.model)
        # pixel tensors of finished calls, overwritten by later ones instead of allocating megabytes per control step
        # (a list because append/pop are atomic: concurrent calls never share one)
        self._pixel_buffers: list[torch.Tensor] = []

    @classmethod
    def from_pretrained(
        cls,
        path_or_repo: str,
        dtype=None,
        device=None,
        unnorm_key: str | None = None,
        pack_linear_weights: bool = False,
        **kwargs,
    ):
        from .auto import AutoModelForVLA

        model = AutoModelForVLA.from_pretrained(path_or_repo, dtype=dtype, **kwargs)
        if device is not None:
            model.to(device)
        # the statistics must come from the same place as the weights: same revision, subfolder, cache, token
        location = {key: kwargs[key] for key in (*HUB_DOWNLOAD_KWARGS, "subfolder") if key in kwargs}
        processor = VLAProcessor.from_pretrained(path_or_repo, **location)
        return cls(model, processor, unnorm_key=unnorm_key, pack_linear_weights=pack_linear_weights)

    def _batch(self, obs: Mapping) -> tuple[dict, bool]:
        if not isinstance(obs, Mapping):
            raise ValueError(f"observation: expected a dict, got {type(obs).__name__}")
        unknown = sorted(map(str, set(obs) - set(OBSERVATION_KEYS)))
        if unknown:  # a misspelt "states" or "unnorm" would otherwise be dropped without a word
            raise ValueError(f"observation: unknown key(s) {unknown}; expected {list(OBSERVATION_KEYS)}")
        if obs.get("instruction") is not None and obs.get("prompt") is not None:
            raise ValueError("observation: both 'instruction' and 'prompt' given; send one")
        images = obs.get("images")
        if not isinstance(images, Mapping):
            raise ValueError(f"images: expected a dict camera -> uint8 array, got {type(images).__name__}")
        cameras = self.processor.camera_names
        missing, unknown = [c for c in cameras if c not in images], [c for c in images if c not in cameras]
        if missing or unknown:
            raise ValueError(f"images: expected cameras {cameras}, missing {missing}, unknown {unknown}")
        arrays = {}
        for camera in cameras:
            array = images[camera]
            if isinstance(array, Image.Image):  # one unbatched view, as the processor takes it
                if array.mode != "RGB":
                    raise ValueError(f"images[{camera!r}]: expected an RGB image, got PIL mode {array.mode!r}")
                array = np.asarray(array)
            if not isinstance(array, np.ndarray):
                raise ValueError(f"images[{camera!r}]: expected a uint8 numpy array or an RGB PIL image, got "
                                 f"{type(array).__name__}")
            if array.dtype != np.uint8:
                raise ValueError(f"images[{camera!r}]: expected dtype uint8, got {array.dtype}")
            if array.ndim not in (3, 4) or array.shape[-1] != 3:
                raise ValueError(f"images[{camera!r}]: expected [B, H, W, 3] or [H, W, 3], got {list(array.shape)}")
            if min(array.shape[-3:-1]) < 1:  # named by camera here: the processor only knows sample and view indices
                raise ValueError(f"images[{camera!r}]: expected images of at least 1 × 1 pixels, got "
                                 f"{array.shape[-3]} × {array.shape[-2]}")
            arrays[camera] = array
        ranks = {a.ndim for a in arrays.values()}
        if len(ranks) != 1:
            raise ValueError("images: mix of batched [B, H, W, 3] and unbatched [H, W, 3] views")
        unbatched = ranks == {3}
        if unbatched:
            arrays = {c: a[None] for c, a in arrays.items()}
        sizes = {c: a.shape[0] for c, a in arrays.items()}
        if len(set(sizes.values())) != 1:
            raise ValueError(f"images: cameras have different batch sizes {sizes}")
        batch_size = next(iter(sizes.values()))
        if batch_size == 0:
            raise ValueError("images: expected at least one sample, got 0")  # as the server words it

        field = "prompt" if obs.get("instruction") is None and obs.get("prompt") is not None else "instruction"
        instruction = obs.get(field)
        instruction = python_strings(instruction)  # as the server takes them
        if isinstance(instruction, str):  # one instruction for the whole batch, as the server takes it
            self.processor.check_instruction(instruction, field)
            instruction = [instruction] * batch_size
        elif isinstance(instruction, (list, tuple)) and len(instruction) == batch_size:
            for b, text in enumerate(instruction):
                self.processor.check_instruction(text, f"{field}[{b}]")
        else:
            raise ValueError(f"{field}: expected a string or {batch_size} string(s), got {instruction!r:.80}")

        state = obs.get("state")
        if state is not None:
            state = numeric_array(state, "state")
            if unbatched and state.ndim == 1:
                state = state[None]
            if state.ndim != 2 or state.shape[0] != batch_size:
                expected = "[S]" if unbatched else f"[{batch_size}, S]"
                raise ValueError(f"state: expected shape {expected}, got {list(np.shape(obs['state']))}")
            if not np.isfinite(state).all():
                raise ValueError("state: contains NaN or inf")
        views = [[arrays[c][b] for c in cameras] for b in range(batch_size)]
        return {"images": views, "text": list(instruction), "state": state}, unbatched

    def _check_state_width(self, state: np.ndarray, own_width: int, key: str, sent_shape: tuple) -> None:
        """The state's width, reported in the shape the observation sent it in (`[S]` unbatched), not the processor's
        batched `[B, S]`."""
        if state.shape[-1] in (own_width, self.processor.state_dim):
            return
        lead = list(sent_shape[:-1])
        expected = str(lead + [self.processor.state_dim])
        if own_width != self.processor.state_dim:
            expected = f"{lead + [own_width]} (embodiment {key!r}'s own state) or {expected} (padded to the model's)"
        raise ValueError(f"state: expected shape {expected}, got {list(sent_shape)}")

    @torch.no_grad()
    def predict(
        self, obs: Mapping, unnorm_key: str | None = None, return_normalized: bool = False, **predict_kwargs
    ) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
        """Action chunk in robot units: `np.float32 [B, T, D]` (or `[T, D]` for an unbatched observation). With
        `return_normalized=True`, `(actions, normalized)`: the model's own output beside them, in the normalised
        space of the statistics (what StarVLA's frameworks return as `normalized_actions`)."""
        batch, unbatched = self._batch(obs)
        if obs.get("unnorm_key") is not None:
            if unnorm_key is not None and unnorm_key != obs["unnorm_key"]:
                raise ValueError(f"unnorm_key: the observation names {obs['unnorm_key']!r}, the call {unnorm_key!r}")
            unnorm_key = obs["unnorm_key"]
        if unnorm_key is not None and not isinstance(unnorm_key, str):
            raise ValueError(f"unnorm_key: expected a key (str), got {type(unnorm_key).__name__}")
        key = self.processor.embodiment_key(unnorm_key or self.unnorm_key, "unnorm_key")
        state_width = self.processor.embodiment_dims(key)[1]
        action_mode = self.processor.embodiment_action_mode(key)
        raw_state = batch["state"]
        if raw_state is None and state_width:  # actions without the state the model trained with: off-distribution
            raise ValueError(f"state: missing; this model takes a state of {state_width} values")
        if raw_state is not None and self.processor.state_dim:
            self._check_state_width(raw_state, state_width, key, np.shape(obs["state"]))
        if raw_state is None and is_relative(action_mode):
            mode = describe_action_mode(action_mode)
            raise ValueError(f"state: missing; embodiment {key!r} predicts {mode} actions, which are turned into "
                             "absolute ones from the state")
        if not self.processor.state_dim:  # a model without state ignores one (decoding may still need it)
            batch["state"] = None
        parameter = next(self.model.parameters())  # one lookup for both (model.device and model.dtype walk twice)
        device, dtype = parameter.device, parameter.dtype
        try:
            buffer = self._pixel_buffers.pop()
        except IndexError:
            buffer = None
        encoded = self.processor(**batch, embodiment=key, pixel_buffer=buffer)
        inputs = {
            name: value.to(device, dtype) if name == "pixel_values" else value.to(device)
            for name, value in encoded.items()
        }
        normalized = self.model.predict_action(**inputs, **predict_kwargs).to("cpu", torch.float32).numpy()
        # relative (delta / rel) actions come back absolute, from the state they were predicted from
        actions = self.processor.decode_actions(normalized, unnorm_key=key, state=raw_state)
        if len(self._pixel_buffers) < 2:
            self._pixel_buffers.append(encoded["pixel_values"])
        if return_normalized:
            return (actions[0], normalized[0]) if unbatched else (actions, normalized)
        return actions[0] if unbatched else actions


if __name__ == "__main__":
    from .defaults import default_model_dir, example_observation

    policy = VLAPolicy.from_pretrained(default_model_dir())
    observation = example_observation()
    chunk = policy.predict(observation)
    print(f"{observation['instruction']!r} → action chunk {list(chunk.shape)} (robot units), first step "
          f"{np.array2string(chunk[0], precision=3)}")
    try:
        policy.predict({**observation, "images": {"wrong_camera": observation["images"]["corner2"]}})
    except ValueError as error:
        print("bad observation:", error)
