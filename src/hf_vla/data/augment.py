"""Training-time image augmentation on raw samples (before the processor), as a dataset wrapper.

`RandomShift(dataset, pad=4)` shifts every camera view by up to `pad` pixels in each direction (edge-replicated
padding, then a random crop back to the original size), the augmentation DrQ and most small-data visuomotor policies
use against overfitting to exact pixel positions. Each view of a sample draws its own offsets (a wrist camera is not
moved with the scene camera). Offsets come from torch's generator, so `set_seed` / the Trainer's seed make runs
reproducible and each DataLoader worker draws its own.

    python -m hf_vla.data.augment      # shifts a test pattern and prints the offsets it found
"""

from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import Dataset


def random_shift(image: np.ndarray, pad: int, generator: torch.Generator | None = None) -> np.ndarray:
    """`image` (uint8 [H, W, C]) shifted by up to `pad` pixels along each axis, edges replicated."""
    _check_pad(pad)
    if image.ndim != 3 or image.shape[-1] not in (1, 3, 4):  # a channel-first [3, H, W] would be shifted across colours
        raise ValueError(f"image: expected channel-last [H, W, C], got shape {list(image.shape)}")
    if pad == 0:
        return image
    height, width = image.shape[:2]
    dy, dx = (int(v) for v in torch.randint(0, 2 * pad + 1, (2,), generator=generator))
    padded = np.pad(image, ((pad, pad), (pad, pad), (0, 0)), mode="edge")
    return padded[dy : dy + height, dx : dx + width]


def _check_pad(pad) -> None:
    if isinstance(pad, bool) or not isinstance(pad, (int, np.integer)) or pad < 0:
        raise ValueError(f"pad: expected a non-negative number of pixels, got {pad!r}")


class RandomShift(Dataset):
    """Wraps a dataset of raw samples (`{"images": {camera: uint8 [H, W, 3]}, ...}`); see the module docstring."""

    def __init__(self, dataset, pad: int = 4):
        _check_pad(pad)
        self.dataset, self.pad = dataset, pad

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index):
        sample = dict(self.dataset[index])
        sample["images"] = {name: random_shift(view, self.pad) for name, view in sample["images"].items()}
        return sample

    def __getattr__(self, name):  # camera_names, fps, ... of the wrapped dataset
        if name == "dataset":
            raise AttributeError(name)
        return getattr(self.dataset, name)


if __name__ == "__main__":
    pattern = np.zeros((16, 16, 1), np.uint8)
    pattern[8, 8] = 255
    for _ in range(3):
        y, x = np.argwhere(random_shift(pattern, 3)[..., 0] == 255)[0]
        print(f"bright pixel moved by ({y - 8:+d}, {x - 8:+d})")
