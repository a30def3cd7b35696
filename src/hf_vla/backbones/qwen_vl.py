"""Qwen2.5-VL and Qwen3-VL (transformers' own classes): images become `<|image_pad|>` runs between vision markers."""

from __future__ import annotations

import functools

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize

from .base import BackboneAdapter


class PatchConv3d(nn.Conv3d):
    """Qwen's patch embedding: a Conv3d whose kernel equals its stride, applied to inputs that are exactly one kernel
    each. That is one matrix product, which CPU backends run several times faster than a 3-D convolution (its weight
    gradient most of all); same parameters, same state-dict keys, other input shapes fall back to the convolution."""

    def forward(self, patches: torch.Tensor) -> torch.Tensor:
        if tuple(patches.shape[1:]) != (self.in_channels, *self.kernel_size) or self.groups != 1:
            return super().forward(patches)
        flat = F.linear(patches.reshape(patches.shape[0], -1), self.weight.reshape(self.out_channels, -1), self.bias)
        return flat.reshape(patches.shape[0], self.out_channels, 1, 1, 1)


class QwenVLAdapter(BackboneAdapter):
    image_token = "<|image_pad|>"
    image_wrapper = ("<|vision_start|>", "<|vision_end|>")

    def prepare(self, vlm: nn.Module) -> nn.Module:
        conv = getattr(getattr(getattr(vlm.model, "visual", None), "patch_embed", None), "proj", None)
        if type(conv) is nn.Conv3d and conv.stride == conv.kernel_size:
            conv.__class__ = PatchConv3d  # same module, matmul forward
        return vlm

    def check_inputs(self, vlm_config, inputs: dict) -> None:
        super().check_inputs(vlm_config, inputs)
        if inputs.get("pixel_values") is not None and inputs.get("image_grid_thw") is None:
            raise ValueError("image_grid_thw: missing; Qwen-VL reads each image's (t, h, w) patch grid beside its "
                             "pixel_values (the processor returns both)")

    def image_token_counts(self, image_inputs: dict, merge_size: int) -> list[int]:
        # Each image is a (t, h, w) grid of patches; spatial merging folds merge_size² patches into one token.
        return [t * h * w // merge_size**2 for t, h, w in torch.as_tensor(image_inputs["image_grid_thw"]).tolist()]

    def preprocess_images(self, image_processor, views: list, out: torch.Tensor | None = None) -> dict:
        """Qwen's image processor works image by image; views that already have one shape at a size Qwen keeps
        (sides multiple of patch × merge, pixel count within bounds) go through the same arithmetic for the whole
        batch at once instead (tested equal to the processor's output within 1e-6). `out`, a float32 tensor of the
        result's shape (an earlier call's `pixel_values`), receives the pixels instead of a new allocation."""
        if not _batchable(image_processor, views):
            return super().preprocess_images(image_processor, views)
        p = image_processor
        patch, merge, temporal = p.patch_size, p.merge_size, p.temporal_patch_size
        pixels = torch.from_numpy(np.stack(views))  # uint8 [N, H, W, C]
        n, height, width, channels = pixels.shape
        grid_h, grid_w = height // patch, width // patch
        # [N, gh/m, m, p, gw/m, m, p, C] read as [N, gh/m, gw/m, m, m, C, p, p]: Qwen's patch order (merge windows
        # row-major, then the patches inside a window, each channel-first), gathered by the pass that scales
        pixels = pixels.view(n, grid_h // merge, merge, patch, grid_w // merge, merge, patch, channels)
        pixels = pixels.permute(0, 1, 4, 2, 5, 7, 3, 6)
        shape = (n * grid_h * grid_w, channels * temporal * patch * patch)
        if not _reusable(out, shape):
            out = torch.empty(shape)
        frames = out.view(*pixels.shape[:-2], temporal, patch, patch)
        multiplier, offset = _affine_constants(p)
        torch.addcmul(offset, pixels, multiplier, out=frames[..., 0, :, :])
        frames[..., 1:, :, :] = frames[..., :1, :, :]  # Qwen repeats a still image along the temporal patch axis
        grids = torch.tensor([[1, grid_h, grid_w]] * n, dtype=torch.int64)
        return {"pixel_values": out, "image_grid_thw": grids}


def _reusable(out: torch.Tensor | None, shape: tuple) -> bool:
    """Whether an earlier `pixel_values` can take these pixels in place: a plain CPU float32 tensor of this shape (one
    moved to the GPU, or one autograd tracks, cannot be an `out=` of the CPU pass: a fresh one is made instead)."""
    return (out is not None and tuple(out.shape) == shape and out.dtype == torch.float32 and out.is_contiguous()
            and out.device.type == "cpu" and not out.requires_grad)


def _affine_constants(p) -> tuple[torch.Tensor, torch.Tensor]:
    """Qwen's `(x · scale − mean) / std` as one multiply-add `x · multiplier + offset` per channel (within 2 float32
    ulps of the processor's three roundings), made once per setting."""
    setting = (p.do_rescale, p.rescale_factor, p.do_normalize, _as_tuple(p.image_mean), _as_tuple(p.image_std))
    return _channel_affine(*setting)


def _as_tuple(value) -> tuple:
    return tuple(value) if isinstance(value, (list, tuple)) else (value,)


@functools.lru_cache(maxsize=8)
def _channel_affine(do_rescale, rescale_factor, do_normalize, mean, std) -> tuple[torch.Tensor, torch.Tensor]:
    scale = rescale_factor if do_rescale else 1.0
    mean = torch.tensor(mean if do_normalize else 0.0, dtype=torch.float32).expand(3)
    std = torch.tensor(std if do_normalize else 1.0, dtype=torch.float32).expand(3)
    return (scale / std).view(3, 1, 1), (-mean / std).view(3, 1, 1)


def _batchable(image_processor, views: list) -> bool:
    needed = ("patch_size", "merge_size", "temporal_patch_size", "size", "do_rescale", "do_normalize")
    if not views or not all(hasattr(image_processor, name) for name in needed):
        return False
    shapes = {np.shape(view) for view in views}
    if len(shapes) != 1 or not all(isinstance(view, np.ndarray) and view.dtype == np.uint8 for view in views):
        return False
    height, width, channels = next(iter(shapes))
    size = image_processor.size
    factor = image_processor.patch_size * image_processor.merge_size
    bounds = size.get("shortest_edge"), size.get("longest_edge")
    if channels != 3 or None in bounds:
        return False
    return smart_resize(height, width, factor, *bounds) == (height, width)


if __name__ == "__main__":
    from ..testing import build_image_processor, build_tiny_tokenizer, tiny_vlm_config

    adapter = QwenVLAdapter()
    rng = np.random.default_rng(0)
    views = list(rng.integers(0, 256, (8, 224, 224, 3), dtype=np.uint8))
    for family in ("qwen2_5_vl", "qwen3_vl"):
        processor = build_image_processor(family)
        reference = processor(images=views, return_tensors="pt")
        fast = adapter.preprocess_images(processor, views)
        difference = (fast["pixel_values"] - reference["pixel_values"]).abs().max().item()
        same_grids = torch.equal(fast["image_grid_thw"], reference["image_grid_thw"])
        print(f"{family}: 8 views of 224×224 → pixel_values {list(fast['pixel_values'].shape)}, image_grid_thw "
              f"{fast['image_grid_thw'][0].tolist()} × 8 (as the processor's: {same_grids}), "
              f"max |Δ| vs the processor {difference:.1e}")
        proj = adapter.build(tiny_vlm_config(family, build_tiny_tokenizer(family))).model.visual.patch_embed.proj
        patches = fast["pixel_values"].view(-1, proj.in_channels, *proj.kernel_size)
        with torch.no_grad():
            gap = (proj(patches) - F.conv3d(patches, proj.weight, proj.bias, stride=proj.stride)).abs().max().item()
        print(f"  prepare() made the patch embedding a {type(proj).__name__}: max |Δ| vs Conv3d {gap:.1e}")
    odd = [rng.integers(0, 256, (50, 70, 3), dtype=np.uint8)]  # a size Qwen resizes: no batched path
    fallback = adapter.preprocess_images(processor, odd)["pixel_values"]
    identical = torch.equal(fallback, processor(images=odd, return_tensors="pt")["pixel_values"])
    print(f"{family}, a 50×70 view (batchable: {_batchable(processor, odd)}) → pixel_values {list(fallback.shape)}, "
          f"identical to the processor's: {identical}")
