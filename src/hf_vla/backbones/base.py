"""The contract a VLM family fulfils so that every action head can sit on it."""

from __future__ import annotations

import torch
from torch import nn
from transformers import AutoModelForImageTextToText


class BackboneAdapter:
    """Defaults fit transformers' image-text-to-text models; a family overrides what differs."""

    image_token = "<image>"
    image_wrapper = ("", "")  # text around the expanded image tokens, e.g. vision start/end markers

    def build(self, vlm_config) -> nn.Module:
        return self.prepare(AutoModelForImageTextToText.from_config(vlm_config))

    def prepare(self, vlm: nn.Module) -> nn.Module:
        """Equivalent, faster forms of the family's modules, applied to every backbone a VLA holds."""
        return vlm

    def text_config(self, vlm_config):
        return vlm_config.get_text_config()

    def hidden_size(self, vlm_config) -> int:
        return self.text_config(vlm_config).hidden_size

    def num_layers(self, vlm_config) -> int:
        return self.text_config(vlm_config).num_hidden_layers

    def language_model(self, vlm: nn.Module) -> nn.Module:
        return vlm.model.language_model

    def encode(self, vlm: nn.Module, **inputs) -> "transformers.modeling_outputs.BaseModelOutputWithPast":  # noqa: F821
        """Runs the VLM without its LM head; returns hidden states (and the KV cache when `use_cache=True`)."""
        return vlm.model(**inputs)

    def image_token_counts(self, image_inputs: dict, merge_size: int) -> list[int]:
        """Number of placeholder tokens each image occupies after the vision encoder."""
        raise NotImplementedError

    def preprocess_images(self, image_processor, views: list, out: torch.Tensor | None = None) -> dict:
        """Pixel inputs for a list of views (uint8 [H, W, 3]); a family may add a faster path than the processor's,
        and may write the pixels into `out` (an earlier result's `pixel_values`) when its shape fits."""
        return image_processor(images=views, return_tensors="pt")

