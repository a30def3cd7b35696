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

    def check_inputs(self, vlm_config, inputs: dict) -> None:
        """Refuses image placeholders without pixels: the backbone would embed them as text and act blind."""
        token, input_ids = getattr(vlm_config, "image_token_id", None), inputs.get("input_ids")
        if inputs.get("pixel_values") is None and token is not None and input_ids is not None:
            count = int((input_ids == token).sum())
            if count:
                raise ValueError(f"pixel_values: missing, but input_ids hold {count} image tokens")

    def encode(self, vlm: nn.Module, **inputs) -> "transformers.modeling_outputs.BaseModelOutputWithPast":  # noqa: F821
        """Runs the VLM without its LM head; returns hidden states (and the KV cache when `use_cache=True`: off by
        default, since the backbone config's default, on, would build a cache every forward and drop it)."""
        return vlm.model(**{"use_cache": False, **inputs})

    def image_token_counts(self, image_inputs: dict, merge_size: int) -> list[int]:
        """Number of placeholder tokens each image occupies after the vision encoder."""
        raise NotImplementedError

    def preprocess_images(self, image_processor, views: list, out: torch.Tensor | None = None) -> dict:
        """Pixel inputs for a list of views (uint8 [H, W, 3]); a family may add a faster path than the processor's,
        and may write the pixels into `out` (an earlier result's `pixel_values`) when its shape fits. The layout is
        stated: left to guess, transformers reads a view 1 or 3 pixels high as channels-first."""
        return image_processor(images=views, return_tensors="pt", input_data_format="channels_last")



if __name__ == "__main__":
    import numpy as np

    from ..backbones import BACKBONE_ADAPTERS
    from ..testing import build_image_processor, build_tiny_tokenizer, tiny_vlm_config

    views = list(np.random.default_rng(0).integers(0, 256, (2, 56, 56, 3), dtype=np.uint8))
    for model_type, adapter in BACKBONE_ADAPTERS.items():
        tokenizer = build_tiny_tokenizer(model_type)
        config = tiny_vlm_config(model_type, tokenizer)
        vlm = adapter.build(config)
        image_inputs = adapter.preprocess_images(build_image_processor(model_type), views)
        tokens = adapter.image_token_counts(image_inputs, config.vision_config.spatial_merge_size)
        prompt = "open the drawer"
        hidden = adapter.encode(vlm, input_ids=torch.tensor([tokenizer.encode(prompt)]), output_hidden_states=True)
        start, end = adapter.image_wrapper
        print(f"{model_type}: {type(adapter).__name__} builds {type(vlm).__name__} "
              f"({vlm.num_parameters():,} parameters), text {adapter.hidden_size(config)} wide × "
              f"{adapter.num_layers(config)} layers")
        print(f"  a 56×56 view → {start}{adapter.image_token}×n{end}, n per view {tokens}; encode({prompt!r}) → "
              f"{len(hidden.hidden_states)} hidden states of {list(hidden.last_hidden_state.shape)}")
