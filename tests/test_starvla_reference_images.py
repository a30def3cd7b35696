"""Camera frames → the VLM's `pixel_values` / `image_grid_thw`: StarVLA's image path, re-derived from its code, against
hf_vla's processor configured the way `convert_starvla` configures it.

The reference below is written from StarVLA's code (github.com/starVLA/starVLA, read through the code index; the file
and function are cited at each step) and from `qwen-vl-utils` 0.0.14 (`qwen_vl_utils/vision_process.py`, the PyPI
package StarVLA imports). It shares nothing with `hf_vla`; only the transformers Qwen image processor (patchify,
rescale, normalise) is used on both sides, since it is not what is under test. What is under test is everything
before it: the resize filter, the (width, height) order of `obs_image_size`, the rounding to multiples of 28 / 32,
the min/max pixel limits, RGB handling, and hf_vla's batched fast path (`backbones/qwen_vl.py`).

StarVLA at inference (`predict_action` of every Qwen framework, e.g. `starVLA/model/framework/VLM4A/QwenPI.py`):
    1. `to_pil_preserve(example["image"])` (`deployment/model_server/tools/image_tools.py`): uint8 [H, W, 3] arrays
       become RGB PIL images, no resize.
    2. if `obs_image_size` is set: `resize_images(images, target_size=obs_image_size)`
       (`starVLA/training/trainer_utils/trainer_tools.py`): `PIL.Image.resize(target_size)`, i.e. target_size is
       (width, height) and the filter is PIL's default, BICUBIC for RGB images (Pillow ≥ 7).
    3. `qwen_vl_interface.build_qwenvl_inputs`:
       - Qwen2.5-VL (`starVLA/model/modules/vlm/QWen2_5.py`): `qwen_vl_utils.process_vision_info(messages)` →
         `fetch_image` for every image, in message order: `to_rgb`, then `smart_resize(h, w, factor=28,
         min_pixels=4·28², max_pixels=16384·28²)` (the defaults: `image_patch_size=14`, merge 2) and
         `image.resize((w, h))` with PIL's default filter (BICUBIC); then `processor(text=..., images=...)`.
       - Qwen3-VL (`starVLA/model/modules/vlm/QWen3.py`): `processor.apply_chat_template(messages, tokenize=True)`:
         the (RGB) PIL images go to the processor unchanged; its own `smart_resize` (factor 32, the checkpoint's
         `size`) is the only resize after step 2.
StarVLA in training: the LeRobot dataloader's `_pack_sample` (`starVLA/dataloader/gr00t_lerobot/datasets.py`, the
versions that resize) does `Image.fromarray(frame).resize((224, 224))` (BICUBIC, fixed 224), then the same
`build_qwenvl_inputs`. A later version (@009ba92) returns the frames unresized ("TODO let resize image in
framwork"); the one resize found downstream of it is `QwenPIPreprocessCollate`
(`starVLA/model/framework/VLM4A/qwenpi_collate.py`), which applies the same `resize_images(obs_image_size)` as
step 2, so both training variants resize with BICUBIC.

The processors are the released ones' settings (Qwen2.5-VL-3B-Instruct: patch 14, min_pixels 3136, max_pixels
12845056, CLIP mean/std; Qwen3-VL-4B-Instruct: patch 16, size shortest_edge 65536 / longest_edge 16777216, mean/std
0.5) on the PIL backend, saved next to a tiny tokenizer as the "base VLM" `VLAProcessor.from_vlm` loads.

hf_vla resizes with BICUBIC, reads `obs_image_size` as (width, height) and GR00T's from `framework` first, as
StarVLA does. One deliberate difference: where StarVLA's inference would not resize (no obs_image_size for the
framework), hf_vla uses the 224 × 224 its training dataloader resized every view to.
"""

import math

import numpy as np
import pytest
import torch
from PIL import Image
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

from hf_vla import VLAProcessor
from hf_vla.auto import VARIANTS
from hf_vla.backbones import qwen_vl
from hf_vla.hub.convert_starvla import image_size_for
from hf_vla.testing import build_tiny_tokenizer, tiny_vlm_config

ATOL = 1e-6  # same uint8 pixels in → the same pixel_values within float32 rounding of the normalisation

# ----------------------------------------------------------------------------------------------- reference (StarVLA)

# Pillow's `Image.resize(size)` without `resample` uses BICUBIC for RGB images (Pillow ≥ 7.0); StarVLA's
# `resize_images` and qwen-vl-utils' `fetch_image` both call it without `resample`.
STARVLA_RESAMPLE = Image.Resampling.BICUBIC

# qwen_vl_utils/vision_process.py (0.0.14): IMAGE_MIN_TOKEN_NUM = 4, IMAGE_MAX_TOKEN_NUM = 16384, SPATIAL_MERGE_SIZE = 2;
# `process_vision_info(..., image_patch_size=14)` by default, which StarVLA's QWen2_5 interface does not override.
QVU_PATCH, QVU_MERGE, QVU_MIN_TOKENS, QVU_MAX_TOKENS, QVU_MAX_RATIO = 14, 2, 4, 16384, 200


def ref_to_pil(frame: np.ndarray) -> Image.Image:
    """`to_pil_preserve` (deployment/model_server/tools/image_tools.py) for a uint8 [H, W, 3] leaf: an RGB image of
    the same pixels (floats would be scaled from [0, 1], 1/4 channels give L/RGBA; not used here)."""
    assert frame.dtype == np.uint8 and frame.ndim == 3 and frame.shape[2] == 3
    return Image.fromarray(np.ascontiguousarray(frame), mode="RGB")


def ref_resize_images(image: Image.Image, target_size) -> Image.Image:
    """`resize_images` (starVLA/training/trainer_utils/trainer_tools.py): `image.resize(target_size)`: PIL sizes are
    (width, height), and the filter is PIL's default."""
    width, height = (int(s) for s in target_size)
    return image.resize((width, height), resample=STARVLA_RESAMPLE)


def ref_smart_resize(height: int, width: int, factor: int, min_pixels: int, max_pixels: int) -> tuple[int, int]:
    """qwen-vl-utils `smart_resize`: each side to the nearest multiple of `factor` (Python's round, so halves go to
    the even multiple), then scaled (floor / ceil to the factor) into [min_pixels, max_pixels]."""
    if max(height, width) / min(height, width) > QVU_MAX_RATIO:
        raise ValueError("aspect ratio too large")
    h = max(factor, round(height / factor) * factor)
    w = max(factor, round(width / factor) * factor)
    if h * w > max_pixels:
        scale = math.sqrt(height * width / max_pixels)
        h, w = math.floor(height / scale / factor) * factor, math.floor(width / scale / factor) * factor
    elif h * w < min_pixels:
        scale = math.sqrt(min_pixels / (height * width))
        h, w = math.ceil(height * scale / factor) * factor, math.ceil(width * scale / factor) * factor
    return h, w


def ref_fetch_image(image: Image.Image) -> Image.Image:
    """qwen-vl-utils `fetch_image` for a PIL image without resized_height/width or min/max_pixels keys (StarVLA's
    messages carry only {"type": "image", "image": PIL}): `to_rgb` (RGBA over white, else convert("RGB")), then
    `smart_resize` with the defaults and `image.resize((w, h))` (PIL default filter; same size → an unfiltered copy)."""
    factor = QVU_PATCH * QVU_MERGE
    rgb = image.convert("RGB")  # our leaves are RGB already; RGBA would be composited over white
    height, width = ref_smart_resize(
        rgb.height, rgb.width, factor, QVU_MIN_TOKENS * factor**2, QVU_MAX_TOKENS * factor**2
    )
    return rgb.resize((width, height), resample=STARVLA_RESAMPLE)


def ref_vlm_images(images: list[list[Image.Image]], family: str) -> list[Image.Image]:
    """What `build_qwenvl_inputs` hands the Qwen processor: images in message order (sample by sample, views in
    order), through `fetch_image` on Qwen2.5-VL (QWen2_5.py: `process_vision_info`) and unchanged on Qwen3-VL
    (QWen3.py: `apply_chat_template(tokenize=True)`; transformers' image loading only converts to RGB)."""
    flat = [image for sample in images for image in sample]
    if family == "qwen2_5_vl":
        return [ref_fetch_image(image) for image in flat]
    return [image.convert("RGB") for image in flat]


def starvla_inference_images(frames, obs_image_size, family):
    """`predict_action`: to_pil_preserve → resize_images(obs_image_size) if set → build_qwenvl_inputs."""
    images = [[ref_to_pil(frame) for frame in sample] for sample in frames]
    if obs_image_size:
        images = [[ref_resize_images(image, obs_image_size) for image in sample] for sample in images]
    return ref_vlm_images(images, family)


def starvla_training_images(frames, family):
    """Training: the dataloader's `_pack_sample` (gr00t_lerobot/datasets.py, resizing versions):
    `Image.fromarray(frame).resize((224, 224))`, then `forward` → `build_qwenvl_inputs` (no further resize)."""
    images = [[ref_resize_images(ref_to_pil(frame), (224, 224)) for frame in sample] for sample in frames]
    return ref_vlm_images(images, family)


def starvla_obs_image_size(config: dict):
    """Which size `predict_action` resizes to. QwenPI / QwenPI_v3 / QwenOFT / QwenFast read
    `datasets.vla_data.obs_image_size` (QwenPI.py @ 5a8bfaf, `predict_action`); QwenGR00T reads
    `framework.obs_image_size` (QwenGR00T.py @ e8a754e and @ 20dec40, `predict_action`; its default config has it
    None), so a GR00T run whose YAML sets only `datasets.vla_data.obs_image_size` is not resized at inference."""
    if config["framework"]["name"] == "QwenGR00T":
        return config["framework"].get("obs_image_size")
    return config["datasets"]["vla_data"].get("obs_image_size")


def starvla_pixels(image_processor, images: list[Image.Image]) -> dict:
    out = image_processor(images=images, return_tensors="pt")
    return {"pixel_values": out["pixel_values"], "image_grid_thw": out["image_grid_thw"]}


# ----------------------------------------------------------------------------------------------------- fixtures / hf_vla

RELEASED_PROCESSORS = {  # preprocessor_config.json of the released base VLMs StarVLA trains from
    "qwen2_5_vl": dict(patch_size=14, merge_size=2, temporal_patch_size=2, min_pixels=3136, max_pixels=12845056),
    "qwen3_vl": dict(patch_size=16, merge_size=2, temporal_patch_size=2,
                     size={"shortest_edge": 65536, "longest_edge": 16777216},
                     image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5]),
}  # fmt: skip


@pytest.fixture(scope="module")
def base_vlms(tmp_path_factory):
    """Per family: a directory with a tiny tokenizer and the released image-processor settings, plus a VLA config
    on a tiny backbone config (no weights: only the processor is built)."""
    root = tmp_path_factory.mktemp("starvla_images")
    out = {}
    for family, settings in RELEASED_PROCESSORS.items():
        path = root / family
        tokenizer = build_tiny_tokenizer(family)
        tokenizer.save_pretrained(path)
        Qwen2VLImageProcessorPil(**settings).save_pretrained(path)
        config = VARIANTS["vla_gr00t"][0](vlm_config=tiny_vlm_config(family, tokenizer))
        out[family] = (str(path), config)
    return out


def hf_vla_processor(base_vlms, family, starvla_config, cameras):
    """As `convert_starvla.build_processor` makes it: `VLAProcessor.from_vlm(base_vlm, config, camera_names=...,
    image_size=image_size_for(config))`."""
    path, config = base_vlms[family]
    return VLAProcessor.from_vlm(path, config, camera_names=cameras, image_size=image_size_for(starvla_config))


def run_config(obs_image_size=None, framework="QwenPI", framework_obs_image_size=None) -> dict:
    vla_data = {"data_mix": "libero_all", "CoT_prompt": "Your task is {instruction}."}
    if obs_image_size is not None:
        vla_data["obs_image_size"] = list(obs_image_size)
    fw = {"name": framework}
    if framework_obs_image_size is not None:
        fw["obs_image_size"] = list(framework_obs_image_size)
    return {"framework": fw, "datasets": {"vla_data": vla_data}}


def scene(height: int, width: int, seed: int) -> np.ndarray:
    """A camera-like uint8 frame: smooth shading, a few hard-edged objects and sensor noise."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    image = np.stack([80 + 100 * x / width, 60 + 120 * y / height, 120 + 60 * np.sin(x / 17 + y / 23)], axis=-1)
    for _ in range(6):
        y0, x0 = rng.integers(0, height - 8), rng.integers(0, width - 8)
        h, w = rng.integers(8, max(9, height // 3)), rng.integers(8, max(9, width // 3))
        image[y0:y0 + h, x0:x0 + w] = rng.uniform(0, 255, 3)
    image += rng.normal(0, 4, image.shape)
    return np.clip(np.rint(image), 0, 255).astype(np.uint8)


def frames_for(batch, views, height, width, seed=0, rotate=False):
    frames = [[scene(height, width, seed + 10 * b + v) for v in range(views)] for b in range(batch)]
    if rotate:  # StarVLA's LIBERO client flips both axes (img[::-1, ::-1]): non-contiguous views
        frames = [[frame[::-1, ::-1] for frame in sample] for sample in frames]
    return frames


def difference(ref: dict, got: dict, ref_images, hf_views) -> str:
    """What differs and by how much (grids; pixel_values; the uint8 images fed to the processor)."""
    ref_grid, got_grid = ref["image_grid_thw"].tolist(), got["image_grid_thw"].tolist()
    if ref_grid != got_grid:
        return f"image_grid_thw: StarVLA {ref_grid} vs hf_vla {got_grid}"
    diff = (got["pixel_values"].float() - ref["pixel_values"].float()).abs()
    text = f"pixel_values: max |Δ| {diff.max().item():.4g}, mean |Δ| {diff.mean().item():.4g}"
    ref_u8 = [np.asarray(image) for image in ref_images]
    if all(a.shape == b.shape for a, b in zip(ref_u8, hf_views)):
        delta = np.concatenate([np.abs(a.astype(int) - b.astype(int)).ravel() for a, b in zip(ref_u8, hf_views)])
        text += (f"; images fed to the Qwen processor: max |Δ| {delta.max()} uint8 levels, mean {delta.mean():.3f}, "
                 f"{(delta > 0).mean():.1%} of values differ")
    return text


def assert_same_pixels(ref: dict, got: dict, ref_images, hf_views):
    message = difference(ref, got, ref_images, hf_views)
    assert got["image_grid_thw"].tolist() == ref["image_grid_thw"].tolist(), message
    assert got["pixel_values"].shape == ref["pixel_values"].shape, message
    torch.testing.assert_close(got["pixel_values"].float(), ref["pixel_values"].float(), atol=ATOL, rtol=0,
                               msg=lambda _: message)  # fmt: skip


def compare_inference(base_vlms, family, frames, config, cameras=("primary", "wrist")):
    processor = hf_vla_processor(base_vlms, family, config, list(cameras))
    texts = ["put the bowl on the plate"] * len(frames)
    got = processor(images=frames, text=texts)
    ref_images = starvla_inference_images(frames, starvla_obs_image_size(config), family)
    ref = starvla_pixels(processor.image_processor, ref_images)
    hf_views = [view for sample in processor._check_views(frames, len(frames)) for view in sample]
    return processor, ref, got, ref_images, hf_views


# ------------------------------------------------------------------------------------------------------------ tests


def test_reference_sanity():
    """The reference's own building blocks: PIL's default filter is BICUBIC here, and smart_resize gives the token
    counts StarVLA's docs state (224 px → 16×16 patches on Qwen2.5-VL) and qwen-vl-utils' rounding."""
    image = Image.fromarray(scene(40, 50, 0))
    assert np.array_equal(np.asarray(image.resize((31, 23))), np.asarray(image.resize((31, 23), STARVLA_RESAMPLE)))
    assert ref_smart_resize(224, 224, 28, 3136, 12845056) == (224, 224)
    assert ref_smart_resize(480, 640, 28, 3136, 12845056) == (476, 644)
    assert ref_smart_resize(250, 333, 28, 3136, 12845056) == (252, 336)
    assert ref_smart_resize(238, 238, 28, 3136, 12845056) == (224, 224)  # 8.5 rounds to the even 8
    assert ref_smart_resize(224, 224, 32, 65536, 16777216) == (256, 256)  # Qwen3-VL's floor of 65536 pixels


@pytest.mark.parametrize("family", ["qwen2_5_vl", "qwen3_vl"])
def test_preresized_224_frames_match(base_vlms, family):
    """Frames already at obs_image_size (StarVLA's LIBERO client resizes before sending; the LIBERO rotation makes
    them non-contiguous): no resize on either side, so the pixels must be identical. On Qwen2.5-VL this is hf_vla's
    batched fast path (224 is a multiple of 28 inside the pixel bounds); on Qwen3-VL both go through the processor
    (224 → 256)."""
    frames = frames_for(batch=2, views=2, height=224, width=224, rotate=True)
    processor, ref, got, ref_images, hf_views = compare_inference(base_vlms, family, frames, run_config([224, 224]))
    if family == "qwen2_5_vl":
        assert qwen_vl._batchable(processor.image_processor, hf_views)  # the fast path is what is compared
    assert ref["image_grid_thw"].tolist() == [[1, 16, 16]] * 4
    assert_same_pixels(ref, got, ref_images, hf_views)


def test_fast_path_non_square_matches(base_vlms):
    """hf_vla's fast path on a non-square size Qwen keeps (252×336, multiples of 28): same patch order, same
    normalisation as StarVLA's processor call on the same uint8 pixels. (The processor is given image_size=[252, 336]
    directly; which size the converter gives is checked in test_non_square_obs_image_size_order.)"""
    path, config = base_vlms["qwen2_5_vl"]
    processor = VLAProcessor.from_vlm(path, config, camera_names=["primary", "wrist"], image_size=[252, 336])
    frames = frames_for(batch=3, views=2, height=252, width=336, seed=5)
    views = [view for sample in frames for view in sample]
    assert qwen_vl._batchable(processor.image_processor, views)
    got = processor(images=frames, text=["stack the blocks"] * 3)
    ref_images = starvla_inference_images(frames, None, "qwen2_5_vl")
    ref = starvla_pixels(processor.image_processor, ref_images)
    assert ref["image_grid_thw"].tolist() == [[1, 18, 24]] * 6
    assert_same_pixels(ref, got, ref_images, views)


@pytest.mark.parametrize("family", ["qwen2_5_vl", "qwen3_vl"])
def test_libero_256_frames_obs_224(base_vlms, family):
    """LIBERO-size 256×256 frames, two views, obs_image_size [224, 224] (the released LIBERO YAMLs). StarVLA resizes
    256 → 224 with PIL's default BICUBIC (trainer_tools.resize_images), and so does hf_vla
    (processing_vla.VLAProcessor._resized): same grid, same pixels."""
    frames = frames_for(batch=2, views=2, height=256, width=256, seed=1)
    _, ref, got, ref_images, hf_views = compare_inference(base_vlms, family, frames, run_config([224, 224]))
    assert_same_pixels(ref, got, ref_images, hf_views)


def test_libero_256_frames_training_path(base_vlms):
    """Training (the dataloader's fixed `Image.fromarray(frame).resize((224, 224))`, BICUBIC) gives the same pixels
    as StarVLA's inference with obs_image_size [224, 224]; hf_vla's training batches go through the same processor
    call as its inference, so they equal StarVLA's training pixels too."""
    frames = frames_for(batch=2, views=2, height=256, width=256, seed=2)
    processor, ref, got, _, hf_views = compare_inference(base_vlms, "qwen2_5_vl", frames, run_config([224, 224]))
    train_images = starvla_training_images(frames, "qwen2_5_vl")
    train = starvla_pixels(processor.image_processor, train_images)
    torch.testing.assert_close(train["pixel_values"], ref["pixel_values"], atol=0, rtol=0)  # StarVLA: train == infer
    assert_same_pixels(train, got, train_images, hf_views)


def test_odd_size_frames_obs_224(base_vlms):
    """250×333 frames with obs_image_size [224, 224]: both end at 224×224 (grid 16×16), resized with BICUBIC in
    StarVLA and hf_vla alike."""
    frames = frames_for(batch=2, views=2, height=250, width=333, seed=3)
    _, ref, got, ref_images, hf_views = compare_inference(base_vlms, "qwen2_5_vl", frames, run_config([224, 224]))
    assert ref["image_grid_thw"].tolist() == [[1, 16, 16]] * 4
    assert_same_pixels(ref, got, ref_images, hf_views)


@pytest.mark.parametrize("height, width", [(480, 640), (250, 333)])
def test_frames_without_obs_image_size_get_the_training_resolution(base_vlms, height, width):
    """A run without obs_image_size: StarVLA's predict_action does not resize, so qwen-vl-utils' fetch_image rounds
    each side to a multiple of 28 (480×640 → 476×644, grid 34×46; 250×333 → 252×336, grid 18×24), a resolution its
    training never saw (its dataloader resized every view to 224 × 224; its own evaluation clients resize before
    sending). Deliberate difference: hf_vla's converter (image_size_for) takes that training resolution, so hf_vla's
    pixels are StarVLA's *training* pixels."""
    frames = frames_for(batch=1, views=2, height=height, width=width, seed=4)
    processor, ref, got, _, hf_views = compare_inference(base_vlms, "qwen2_5_vl", frames, run_config(None))
    assert ref["image_grid_thw"].tolist() != got["image_grid_thw"].tolist()  # StarVLA's unresized inference
    train_images = starvla_training_images(frames, "qwen2_5_vl")
    assert_same_pixels(starvla_pixels(processor.image_processor, train_images), got, train_images, hf_views)


def test_non_square_obs_image_size_order(base_vlms):
    """obs_image_size is a PIL size in StarVLA (`resize_images` → `Image.resize(target_size)`): [320, 240] means 320
    wide, 240 high (then fetch_image → 252×308, grid 18×22). convert_starvla.image_size_for turns it into hf_vla's
    [height, width] = [240, 320], the same 240 high, 320 wide."""
    frames = frames_for(batch=1, views=2, height=480, width=640, seed=6)
    _, ref, got, ref_images, hf_views = compare_inference(base_vlms, "qwen2_5_vl", frames, run_config([320, 240]))
    assert ref["image_grid_thw"].tolist() == [[1, 18, 22]] * 2
    assert_same_pixels(ref, got, ref_images, hf_views)


def test_gr00t_reads_framework_obs_image_size(base_vlms):
    """QwenGR00T.predict_action (QwenGR00T.py @ e8a754e / 20dec40) resizes to `framework.obs_image_size`, not
    `datasets.vla_data.obs_image_size`; image_size_for reads it first."""
    frames = frames_for(batch=1, views=2, height=256, width=256, seed=7)
    config = run_config(None, framework="QwenGR00T", framework_obs_image_size=[280, 224])
    _, ref, got, ref_images, hf_views = compare_inference(base_vlms, "qwen2_5_vl", frames, config)
    assert ref["image_grid_thw"].tolist() == [[1, 16, 20]] * 2  # 224 high, 280 wide
    assert_same_pixels(ref, got, ref_images, hf_views)


def test_gr00t_without_framework_obs_image_size_gets_the_training_resolution(base_vlms):
    """A GR00T run with only `datasets.vla_data.obs_image_size` (as the released LIBERO YAMLs write it): StarVLA's
    GR00T feeds 256×256 frames to fetch_image unresized (→ 252×252, grid 18×18), while its training resized them to
    224 × 224. Deliberate difference: hf_vla resizes to 224 (grid 16×16), StarVLA's training pixels."""
    frames = frames_for(batch=1, views=2, height=256, width=256, seed=7)
    config = run_config([224, 224], framework="QwenGR00T")
    processor, ref, got, _, hf_views = compare_inference(base_vlms, "qwen2_5_vl", frames, config)
    assert ref["image_grid_thw"].tolist() == [[1, 18, 18]] * 2
    train_images = starvla_training_images(frames, "qwen2_5_vl")
    assert_same_pixels(starvla_pixels(processor.image_processor, train_images), got, train_images, hf_views)
