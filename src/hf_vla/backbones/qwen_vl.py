"""Qwen2.5-VL and Qwen3-VL (transformers' own classes): images become `<|image_pad|>` runs between vision markers."""

from __future__ import annotations

import torch

from .base import BackboneAdapter


class QwenVLAdapter(BackboneAdapter):
    image_token = "<|image_pad|>"
    image_wrapper = ("<|vision_start|>", "<|vision_end|>")

    def image_token_counts(self, image_inputs: dict, merge_size: int) -> torch.Tensor:
        # Each image is a (t, h, w) grid of patches; spatial merging folds merge_size² patches into one token.
        return torch.as_tensor(image_inputs["image_grid_thw"]).prod(-1) // (merge_size**2)

