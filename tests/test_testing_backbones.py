"""The offline backbones load like hub repos, and the real Qwen vocabulary lands on the published ids."""

import numpy as np
import pytest
import torch
from transformers import AutoImageProcessor, AutoModelForImageTextToText, AutoTokenizer

from hf_vla.testing import build_qwen_tokenizer, build_tiny_tokenizer, build_tiny_vlm


@pytest.mark.parametrize("family", ["qwen2_5_vl", "qwen3_vl"])
def test_tiny_vlm_directory_loads_with_plain_from_pretrained(tiny_vlm_dirs, family):
    path = tiny_vlm_dirs[family]
    model = AutoModelForImageTextToText.from_pretrained(path)
    tokenizer = AutoTokenizer.from_pretrained(path)
    image_processor = AutoImageProcessor.from_pretrained(path)
    assert model.config.model_type == family
    assert model.config.image_token_id == tokenizer.convert_tokens_to_ids("<|image_pad|>")
    assert type(image_processor).__name__ == "Qwen2VLImageProcessorPil"
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "hi"}]}],
        tokenize=False, add_generation_prompt=True,
    )  # fmt: skip
    assert "<|vision_start|><|image_pad|><|vision_end|>hi<|im_end|>\n<|im_start|>assistant\n" in prompt
    assert prompt.startswith("<|im_start|>system") == (family == "qwen2_5_vl")


@pytest.mark.parametrize("family", ["qwen2_5_vl", "qwen3_vl"])
def test_tied_embeddings_are_tied_in_the_backbone_and_the_vla_says_so(tmp_path, family):
    # transformers ties a Qwen-VL by its top-level flag; Qwen3-VL's text config does not carry it up
    from hf_vla import AutoModelForVLA

    for tied in (True, False):
        path = build_tiny_vlm(tmp_path / f"{family}_{tied}", family=family, tie_word_embeddings=tied)
        vlm = AutoModelForImageTextToText.from_pretrained(path)
        assert (vlm.lm_head.weight is vlm.get_input_embeddings().weight) == tied
        vla = AutoModelForVLA.from_vlm(path, variant="oft", action_dim=2, action_horizon=2)
        vla.save_pretrained(tmp_path / f"vla_{family}_{tied}")
        for model in (vla, AutoModelForVLA.from_pretrained(tmp_path / f"vla_{family}_{tied}")):
            assert (model.vlm.lm_head.weight is model.get_input_embeddings().weight) == tied
            assert model.config.tie_word_embeddings == tied


def test_tiny_vlm_is_deterministic_for_a_seed(tmp_path):
    a = AutoModelForImageTextToText.from_pretrained(build_tiny_vlm(tmp_path / "a", seed=3)).state_dict()
    b = AutoModelForImageTextToText.from_pretrained(build_tiny_vlm(tmp_path / "b", seed=3)).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_special_tokens_never_split():
    tokenizer = build_tiny_tokenizer("qwen3_vl")
    for token in ("<|fim_pad|>", "<|image_pad|>", "<think>"):
        assert len(tokenizer.encode(token, add_special_tokens=False)) == 1


def test_real_qwen_vocabulary_has_published_ids():
    tokenizer = build_qwen_tokenizer("qwen2_5_vl")
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in ("<|endoftext|>", "<|vision_start|>", "<|image_pad|>", "<|fim_pad|>")}
    assert ids == {"<|endoftext|>": 151643, "<|vision_start|>": 151652, "<|image_pad|>": 151655, "<|fim_pad|>": 151662}
    assert tokenizer.encode("Hello", add_special_tokens=False) == [9707]
    assert len(build_qwen_tokenizer("qwen3_vl")) == 151669  # FAST's -Action range starts right after


def test_demo_prints_a_chunk(capsys):
    from hf_vla import VLAPolicy
    from hf_vla.cli import main
    from hf_vla.defaults import default_model_dir, example_observation

    assert main(["demo"]) == 0
    out = capsys.readouterr().out
    assert "action chunk [T=8, D=4] in robot units" in out and "closed-loop success: metaworld/" in out
    rows = [line for line in out.splitlines() if line.strip().startswith("[")]
    values = np.array([[float(v) for v in row.strip(" []").split()] for row in rows])
    expected = VLAPolicy.from_pretrained(default_model_dir()).predict(example_observation())
    np.testing.assert_allclose(values, expected, atol=1e-4)  # printed at 4 decimals


def test_demo_on_a_model_with_state_and_its_input_errors(tmp_path, capsys):
    from hf_vla.cli import main
    from hf_vla.testing import build_tiny_vla

    model, processor = build_tiny_vla("oft", tmp_path / "build", state_dim=6)  # two cameras, "demo" statistics
    model.save_pretrained(tmp_path / "vla")
    processor.save_pretrained(tmp_path / "vla")
    assert main(["demo", "--model", str(tmp_path / "vla")]) == 0  # the example has no state: a typical one is sent
    mean = np.array2string(np.asarray(processor.norm_stats["demo"]["state"]["mean"], np.float32), precision=3)
    assert f"state {mean} (the 'demo' statistics' typical state)" in capsys.readouterr().out
    for argv, message in ((["--model", str(tmp_path / "missing")], "--model: no such directory"),
                          (["--unnorm-key", "mars"], "unnorm_key: unknown key 'mars'; known keys: ['metaworld']")):
        with pytest.raises(SystemExit) as exit_info:
            main(["demo", *argv])
        assert exit_info.value.code == 2 and f"hf-vla demo: {message}" in capsys.readouterr().err


@pytest.mark.parametrize("family", ["qwen2_5_vl", "qwen3_vl"])
def test_batched_image_path_equals_the_image_processor(tiny_vlm_dirs, family):

    from hf_vla.backbones.qwen_vl import QwenVLAdapter

    processor = AutoImageProcessor.from_pretrained(tiny_vlm_dirs[family])
    factor = processor.patch_size * processor.merge_size
    rng = np.random.default_rng(0)
    for height, width, count in [(2 * factor, 2 * factor, 3), (factor, 4 * factor, 2), (8 * factor, 8 * factor, 1)]:
        views = [rng.integers(0, 256, (height, width, 3), dtype=np.uint8) for _ in range(count)]
        expected = processor(images=views, return_tensors="pt")
        fast = QwenVLAdapter().preprocess_images(processor, views)
        torch.testing.assert_close(fast["pixel_values"], expected["pixel_values"], rtol=0, atol=1e-6)
        assert torch.equal(fast["image_grid_thw"], expected["image_grid_thw"])
    # sizes Qwen would resize, and mixed shapes, go through the processor itself
    odd = [rng.integers(0, 256, (50, 70, 3), dtype=np.uint8)]
    mixed = [rng.integers(0, 256, (factor, factor, 3), dtype=np.uint8), rng.integers(0, 256, (2 * factor, factor, 3), dtype=np.uint8)]
    for views in (odd, mixed):
        expected = processor(images=views, return_tensors="pt")
        torch.testing.assert_close(QwenVLAdapter().preprocess_images(processor, views)["pixel_values"],
                                   expected["pixel_values"], rtol=0, atol=0)


@pytest.mark.parametrize("family", ["qwen2_5_vl", "qwen3_vl"])
def test_processor_equals_the_backbones_own_processor(tiny_vlm_dirs, family):
    """VLAProcessor's whole output equals transformers' Qwen2_5_VLProcessor / Qwen3VLProcessor (image-only: no
    torchvision) on the same already-resized views and prompt text: token ids with the image runs, padding, masks,
    patch grids and pixels, for square and non-square sizes Qwen keeps (the batched path), a size it rounds (the
    processor's own path), and one pixel_buffer carried from call to call across shapes."""
    from PIL import Image

    from hf_vla import VLAProcessor
    from hf_vla.training.trl import image_only_processor

    image_processor = AutoImageProcessor.from_pretrained(tiny_vlm_dirs[family])
    processor = VLAProcessor(image_processor, AutoTokenizer.from_pretrained(tiny_vlm_dirs[family]),
                             camera_names=["primary", "wrist"], state_dim=3, state_in_prompt=True,
                             prompt_template="Task: {instruction}.", backbone=family)  # fmt: skip
    rng = np.random.default_rng(0)
    processor.compute_norm_stats("arm", rng.normal(size=(64, 7)), rng.normal(size=(64, 3)))
    reference = image_only_processor(processor, padding_side="left")
    factor = image_processor.patch_size * image_processor.merge_size
    buffer, reused = None, 0
    for size in ([2 * factor, 2 * factor], [2 * factor, 3 * factor], [3 * factor, 2 * factor], [50, 70]):
        processor.image_size = size
        views = [[rng.integers(0, 256, (45, 61, 3), dtype=np.uint8) for _ in range(2)] for _ in range(2)]
        texts, state = ["open the drawer", "go"], rng.normal(size=(2, 3))
        got = processor(images=views, text=texts, state=state, pixel_buffer=buffer)
        reused += buffer is not None and got["pixel_values"].data_ptr() == buffer.data_ptr()
        buffer = got["pixel_values"]
        resized = [[Image.fromarray(view).resize(size[::-1], Image.BICUBIC) for view in sample] for sample in views]
        prompts = [processor._instruction_text(text, got["state"][b].numpy(), b) for b, text in enumerate(texts)]
        messages = [[{"role": "user", "content": [{"type": "image", "image": image} for image in sample]
                      + [{"type": "text", "text": prompt}]}] for sample, prompt in zip(resized, prompts)]  # fmt: skip
        expected = reference.apply_chat_template(messages, tokenize=True, return_dict=True, return_tensors="pt",
                                                 add_generation_prompt=True, padding=True)  # fmt: skip
        assert "[STATE]" in prompts[0]
        for key in ("input_ids", "attention_mask", "mm_token_type_ids", "image_grid_thw"):
            assert got[key].tolist() == expected[key].tolist(), (size, key)
        torch.testing.assert_close(got["pixel_values"], expected["pixel_values"], rtol=0, atol=1e-6)
    assert reused == 1  # [2f, 3f] and [3f, 2f] views fill the same number of patches: the buffer took the second


@pytest.mark.parametrize("family", ["qwen2_5_vl", "qwen3_vl"])
def test_views_one_or_three_pixels_high_are_read_channels_last(tiny_vlm_dirs, family):
    """Views are [H, W, 3]; left to guess, transformers takes a first axis of 1 or 3 for the channels and patches a
    transposed image (a processor whose image_size is 1 or 3 high gives such views)."""
    from PIL import Image

    from hf_vla.backbones.qwen_vl import QwenVLAdapter

    processor = AutoImageProcessor.from_pretrained(tiny_vlm_dirs[family])
    rng = np.random.default_rng(1)
    for height in (1, 3):
        views = [rng.integers(0, 256, (height, 70, 3), dtype=np.uint8)]
        expected = processor(images=[Image.fromarray(view) for view in views], return_tensors="pt")
        got = QwenVLAdapter().preprocess_images(processor, views)
        assert got["image_grid_thw"].tolist() == expected["image_grid_thw"].tolist()
        assert got["image_grid_thw"][0, 2] > got["image_grid_thw"][0, 1]  # wider than high, as the view
        torch.testing.assert_close(got["pixel_values"], expected["pixel_values"], rtol=0, atol=0)


@pytest.mark.parametrize("family", ["qwen2_5_vl", "qwen3_vl"])
def test_patch_embedding_matmul_equals_the_convolution(tiny_vlm_dirs, family):
    from hf_vla import AutoModelForVLA
    from hf_vla.backbones.qwen_vl import PatchConv3d

    model = AutoModelForVLA.from_vlm(tiny_vlm_dirs[family], variant="oft", action_dim=2, action_horizon=2)
    proj = model.vlm.model.visual.patch_embed.proj
    assert type(proj) is PatchConv3d and "vlm.model.visual.patch_embed.proj.weight" in model.state_dict()
    patches = torch.randn(10, proj.in_channels, *proj.kernel_size, requires_grad=True)
    conv = torch.nn.functional.conv3d(patches, proj.weight, proj.bias, stride=proj.stride)
    torch.testing.assert_close(proj(patches), conv, rtol=1e-5, atol=1e-5)
    (weight_grad,) = torch.autograd.grad(proj(patches).square().sum(), proj.weight)
    (expected_grad,) = torch.autograd.grad(conv.square().sum(), proj.weight)
    torch.testing.assert_close(weight_grad, expected_grad, rtol=1e-4, atol=1e-4)
    video = torch.randn(1, proj.in_channels, 2 * proj.kernel_size[0], *(2 * k for k in proj.kernel_size[1:]))
    torch.testing.assert_close(proj(video), torch.nn.functional.conv3d(video, proj.weight, proj.bias, stride=proj.stride))


def test_tiny_vlm_heads_must_split_the_width(tmp_path):
    with pytest.raises(ValueError, match="num_heads: 3 heads do not split hidden_size 64"):
        build_tiny_vlm(tmp_path, hidden_size=64, num_heads=3)


def test_an_odd_head_count_runs(tmp_path):  # 5 heads: grouped-query attention needs key/value heads dividing 5
    from transformers import AutoModelForImageTextToText

    vlm = AutoModelForImageTextToText.from_pretrained(build_tiny_vlm(tmp_path, hidden_size=80))
    assert vlm.config.get_text_config().num_attention_heads == 5
    assert vlm(input_ids=torch.tensor([[1, 2, 3]])).logits.shape == (1, 3, vlm.config.get_text_config().vocab_size)


def test_the_package_imports_with_its_core_dependencies_only():
    """`pip install hf_vla` without extras: what the extras bring (setup.py) must not be needed to import it."""
    import subprocess
    import sys
    from pathlib import Path

    extras = ["scipy", "websockets", "msgpack", "gradio", "gradio_client", "pandas", "plotly", "accelerate",
              "datasets", "pyarrow", "av", "trl", "peft", "metaworld", "mujoco", "matplotlib", "qwen_tokenizer",
              "tiktoken", "deepspeed", "flash_attn"]  # fmt: skip
    script = (f"import sys\nfor name in {extras!r}:\n    sys.modules[name] = None\n"
              "from hf_vla import AutoModelForVLA, VLAPolicy, VLAProcessor\nfrom hf_vla.cli import main\n")
    src = str(Path(__file__).resolve().parents[1] / "src")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                            env={"PYTHONPATH": src, "HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"})  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
