"""Collators: lists of raw samples → model batches, the only place a Trainer's DataLoader meets the processor.

`VLACollator` turns raw VLA samples (what `load_lerobot` and mixtures yield) into the processor's BatchFeature. Besides
the model inputs, each batch carries the targets in robot units (`raw_actions`) and the per-sample `embodiment`, so
evaluation can score predictions in robot units; `VLATrainer` strips both before calling the model.

`CoTrainingCollator` implements StarVLA's co-training step: every batch holds one VLA batch plus one VLM chat batch
under `"vlm_batch"`. The VLA dataset defines the epoch (the Trainer's sampler walks it as usual); chat samples are
drawn from a shuffled cycle over the chat dataset that restarts whenever it runs out, so chat data never ends an
epoch and is repeated or only partly seen depending on the relative sizes.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence

import numpy as np
import torch
from transformers import BatchFeature

# Batch entries that are not model inputs; `VLATrainer` removes them before `model(**batch)`.
METADATA_KEYS = ("raw_actions", "embodiment")
VLM_BATCH_KEY = "vlm_batch"


class VLACollator:
    """Raw VLA samples → the processor's BatchFeature (plus `raw_actions` and `embodiment` when targets are present).

    Args:
        processor (`VLAProcessor`): builds prompts and pixel tensors, and normalises state and actions.
        embodiment (`str`, *optional*): statistics key for samples without an `"embodiment"` entry; with None, such
            samples use the processor's only embodiment (an error when it knows several).
    """

    def __init__(self, processor, embodiment: str | None = None):
        self.processor = processor
        self.embodiment = embodiment

    def __call__(self, samples: Sequence[Mapping]) -> BatchFeature:
        if not samples:
            raise ValueError("VLACollator: received an empty list of samples")
        cameras = self.processor.camera_names
        images = [[self._view(sample, b, camera) for camera in cameras] for b, sample in enumerate(samples)]
        embodiments = [sample.get("embodiment", self.embodiment) for sample in samples]
        if len(self.processor.norm_stats) == 1:  # unnamed samples take the only statistics; named ones keep their key
            only = next(iter(self.processor.norm_stats))
            embodiments = [only if key is None else key for key in embodiments]
        for field in ("state", "actions", "action_mask"):  # batch-wide: all samples carry one, or none does
            carriers = [field in sample for sample in samples]
            if any(carriers) and not all(carriers):
                raise ValueError(f"VLACollator: sample {carriers.index(not carriers[0])} "
                                 f"{'lacks' if carriers[0] else 'has'} {field!r}, sample 0 "
                                 f"{'has' if carriers[0] else 'does not'}; mix samples with and without it apart")
        kwargs = {}
        if "state" in samples[0] and self.processor.state_dim > 0:
            kwargs["state"] = _stack(samples, "state")
        has_actions = "actions" in samples[0]
        if has_actions:
            kwargs["actions"] = _stack(samples, "actions")
            if "action_mask" in samples[0]:
                kwargs["action_mask"] = _stack(samples, "action_mask")
        missing = [b for b, sample in enumerate(samples) if "instruction" not in sample]
        if missing:
            raise ValueError(f"VLACollator: sample(s) {missing} have no 'instruction'")
        batch = self.processor(
            images=images,
            text=[sample["instruction"] for sample in samples],
            embodiment=embodiments,
            **kwargs,
        )
        if has_actions:
            batch["raw_actions"] = torch.from_numpy(np.asarray(kwargs["actions"], dtype=np.float32))
            batch["embodiment"] = embodiments
        return batch

    def _view(self, sample: Mapping, index: int, camera: str):
        views = sample.get("images", {})
        if not isinstance(views, Mapping):
            raise ValueError(f"VLACollator: sample {index}: images: expected a dict camera -> image, got "
                             f"{type(views).__name__}")
        if camera not in views:
            raise KeyError(
                f"VLACollator: sample {index} has no image for camera {camera!r} (the processor expects "
                f"{self.processor.camera_names}; the sample has {sorted(views)}). Select or rename cameras when "
                "loading the data (cameras=..., camera_rename=...) to match processor.camera_names."
            )
        return views[camera]


def _stack(samples: Sequence[Mapping], field: str) -> np.ndarray:
    shapes = [np.shape(sample[field]) for sample in samples]
    if len(set(shapes)) != 1:  # e.g. two embodiments' widths that no mixture padded to one
        other = next(b for b, shape in enumerate(shapes) if shape != shapes[0])
        raise ValueError(f"VLACollator: {field!r} of sample {other} has shape {list(shapes[other])}, sample 0's "
                         f"{list(shapes[0])}; a batch needs one shape")
    return np.stack([sample[field] for sample in samples])


class CoTrainingCollator:
    """One VLA batch plus one VLM chat batch per step (StarVLA's co-training); see the module docstring.

    Args:
        vla_collator: collates the VLA samples the Trainer's sampler hands over (e.g. a `VLACollator`).
        chat_dataset: a map-style dataset of chat samples (e.g. `load_vlm_chat(path)`).
        chat_collator: collates a list of chat samples into the VLM batch (e.g. `VLMChatCollator(processor)`).
        chat_batch_size (`int`): chat samples per step.
        seed (`int`, *optional*): seed of the chat order; by default derived from torch's seed, so runs under
            `TrainingArguments(seed=...)` are reproducible. Each DataLoader worker and each distributed rank draws
            its own order.
    """

    def __init__(
        self,
        vla_collator: Callable,
        chat_dataset,
        chat_collator: Callable,
        chat_batch_size: int = 1,
        seed: int | None = None,
    ):
        if len(chat_dataset) == 0:
            raise ValueError("CoTrainingCollator: the chat dataset is empty")
        if chat_batch_size < 1:
            raise ValueError(f"chat_batch_size: expected a positive integer, got {chat_batch_size}")
        self.vla_collator = vla_collator
        self.chat_dataset = chat_dataset
        self.chat_collator = chat_collator
        self.chat_batch_size = chat_batch_size
        self.seed = seed
        self._rng: np.random.Generator | None = None
        self._order: list[int] = []
        self._stream_owner: tuple | None = None  # the process (and DataLoader worker) that drew from `_rng`

    def __call__(self, samples: Sequence[Mapping]) -> BatchFeature:
        batch = self.vla_collator(samples)
        batch[VLM_BATCH_KEY] = self.chat_collator([self._next_chat_sample() for _ in range(self.chat_batch_size)])
        return batch

    def _next_chat_sample(self):
        return self.chat_dataset[self._next_chat_index()]

    def _next_chat_index(self) -> int:
        owner = _stream_owner()
        if self._rng is None or owner != self._stream_owner:
            # created lazily, inside the DataLoader worker that uses it; a worker's copy of a collator that already
            # drew in the main process (a batch looked at before training) must not replay the main process's stream
            self._rng, self._order, self._stream_owner = np.random.default_rng(self._stream_seed()), [], owner
        if not self._order:
            self._order = self._rng.permutation(len(self.chat_dataset)).tolist()
        return self._order.pop()

    def skip(self, batches: int) -> None:
        """Moves the chat stream past `batches` calls' draws without reading any sample: what a resumed run does
        to continue the stream where the interrupted one stood (in-process collation only)."""
        for _ in range(batches * self.chat_batch_size):
            self._next_chat_index()

    def _stream_seed(self) -> list[int]:
        worker = torch.utils.data.get_worker_info()
        rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
        base = self.seed if self.seed is not None else torch.initial_seed()
        # DataLoader workers get a copy of this collator, made again every epoch (unless persistent): their seed,
        # drawn per worker and per epoch from the (seeded) main process, keeps them from replaying one stream.
        return [int(base) % 2**63, rank, 0 if worker is None else int(worker.seed) % 2**63]


def _stream_owner() -> tuple:
    """Who is drawing: the process, and the DataLoader worker (whose seed changes every epoch) when in one."""
    worker = torch.utils.data.get_worker_info()
    return os.getpid(), None if worker is None else (worker.id, worker.seed)


__all__ = ["CoTrainingCollator", "METADATA_KEYS", "VLACollator", "VLM_BATCH_KEY"]


if __name__ == "__main__":
    from ..testing import build_tiny_vla
    from .vlm_chat import VLMChatCollator

    _, processor = build_tiny_vla("oft")
    rng = np.random.default_rng(0)
    horizon, action_dim = processor.action_horizon, processor.action_dim

    def view():  # any size: the processor resizes every view to its image_size
        return rng.integers(0, 256, (48, 64, 3), dtype=np.uint8)

    samples = [{"images": {camera: view() for camera in processor.camera_names}, "instruction": instruction,
                "state": rng.normal(size=processor.state_dim), "actions": rng.normal(size=(horizon, action_dim)),
                "action_mask": np.arange(horizon) < horizon - k}  # sample k ends k steps before the chunk does
               for k, instruction in enumerate(["open the drawer", "close the door", "push the button"])]

    def shapes(batch):
        return {key: list(value.shape) if hasattr(value, "shape") else value for key, value in batch.items()}

    batch = VLACollator(processor)(samples)
    print("VLACollator, 3 raw samples →", shapes(batch))
    print(f"valid action steps per sample: {batch['action_mask'].sum(-1).int().tolist()}; actions normalised with "
          f"the {batch['embodiment'][0]!r} statistics to [{batch['actions'].min():.2f}, {batch['actions'].max():.2f}], "
          f"raw_actions kept in robot units for evaluation")
    chat = [  # what load_vlm_chat yields: images plus messages with one <image> placeholder per image
        {"images": [view()], "messages": [{"role": "user", "content": "<image>\nWhat is on the table?"},
                                          {"role": "assistant", "content": "A red block."}]},
        {"images": [], "messages": [{"role": "user", "content": "Say hi."}, {"role": "assistant", "content": "Hi."}]},
    ]  # fmt: skip
    co_training = CoTrainingCollator(VLACollator(processor), chat, VLMChatCollator(processor), chat_batch_size=2,
                                     seed=0)  # fmt: skip
    print("CoTrainingCollator, 2 samples → vlm_batch", shapes(co_training(samples[:2])[VLM_BATCH_KEY]))
