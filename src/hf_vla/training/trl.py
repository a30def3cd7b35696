"""TRL for VLAs: a VLM-only SFT stage and GRPO for the token heads.

**VLM-only SFT** (`VLMSFTTrainer`): `trl.SFTTrainer` on the backbone alone (`vla.vlm`, a VLM directory, or any
`AutoModelForImageTextToText`), fed the LLaVA-style chat data of `hf_vla.data.vlm_chat` through our own
`VLMChatCollator` (the tokenizer's chat template, labels on the assistant replies only: the batches co-training
uses). `save_model(dir)` writes a plain VLM directory (weights, tokenizer, image processor) that
`AutoModelForVLA.from_vlm(dir, ...)` builds a VLA on.

**GRPO for token heads** (`build_grpo_trainer`): TRL's `GRPOTrainer` needs a causal LM that scores its own
completions token by token. For FAST / bins the action tokens are rows of the backbone's vocabulary, so the policy is
`vla.vlm` itself (its parameters *are* the VLA's: training it trains the VLA in place). The prompts are our
processor's (camera views as `{"type": "image"}` parts, then the instruction with state text where the model puts it
there), sampling is restricted to the action tokens with `generation_kwargs={"suppress_tokens": every other id}`
(plus `min_new_tokens` for fixed-length replies), and the reward decodes each completion with the model's own
`decode_action_tokens` (`action_reward`). Rows that do not decode get `invalid_reward`.

Caveats: TRL scores completions with log-probabilities of the *unrestricted* softmax (suppression only shapes
sampling), so the policy gradient also pushes probability mass off non-action tokens — harmless, but `entropy` in
the logs is over the whole vocabulary. An untrained FAST head rarely emits a decodable sequence: every completion
gets `invalid_reward`, the group advantage is zero and nothing trains; fine-tune it (SFT) first. Bins replies have
a fixed length, so TRL logs them all as `completions/clipped_ratio = 1` (no end-of-turn token is sampled).

TRL facts relied on (TRL 1.16, transformers 5.23): a `ProcessorMixin` processing class plus an `images` column is
the vision path; the Qwen-VL processors cannot be built without torchvision (their video processor), hence
`image_only_processor`; reward functions are called as `fn(prompts, completions, completion_ids, **columns)`;
generation left-pads, so the tokenizer is a left-padding copy; TRL's configs default to gradient checkpointing.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping, Sequence

import numpy as np
import torch
from transformers import AutoModelForImageTextToText, PreTrainedModel
from transformers.utils import logging

from ..data.vlm_chat import VLMChatCollator

logger = logging.get_logger(__name__)


# ---------------------------------------------------------------------------------------------- processors


def image_only_processor(vla_processor, padding_side: str | None = None):
    """The backbone's own processor class (Qwen2.5-VL / Qwen3-VL) built from a `VLAProcessor`'s tokenizer (action
    tokens included) and image processor, without the video processor (which needs torchvision). TRL calls it
    with `text=` / `images=` and `apply_chat_template`."""
    import transformers

    classes = {"qwen2_5_vl": transformers.Qwen2_5_VLProcessor, "qwen3_vl": transformers.Qwen3VLProcessor}
    if vla_processor.backbone not in classes:
        raise ValueError(f"image_only_processor: no processor for backbone {vla_processor.backbone!r}; "
                         f"expected one of {sorted(classes)}")  # fmt: skip
    base = classes[vla_processor.backbone]
    tokenizer = copy.deepcopy(vla_processor.tokenizer)
    if padding_side is not None:
        tokenizer.padding_side = padding_side
    processor_class = _image_only_class(base)
    return processor_class(vla_processor.image_processor, tokenizer, chat_template=vla_processor.chat_template)


_IMAGE_ONLY_CLASSES: dict = {}


def _image_only_class(base):
    if base in _IMAGE_ONLY_CLASSES:
        return _IMAGE_ONLY_CLASSES[base]
    from transformers import ProcessorMixin

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
        def token(name, default):
            value = getattr(tokenizer, name, None) or default
            setattr(self, name, value)
            setattr(self, name + "_id", tokenizer.convert_tokens_to_ids(value))

        token("image_token", "<|image_pad|>")
        token("video_token", "<|video_pad|>")
        token("vision_start_token", "<|vision_start|>")
        token("vision_end_token", "<|vision_end|>")
        ProcessorMixin.__init__(self, image_processor, tokenizer, chat_template=chat_template)

    cls = type(f"{base.__name__}ImageOnly", (base,), {"__init__": __init__, "video_processor": None})
    _IMAGE_ONLY_CLASSES[base] = cls
    return cls


# ---------------------------------------------------------------------------------------------- VLM-only SFT


def _sft_trainer_class():
    from trl import SFTTrainer

    class VLMSFTTrainer(SFTTrainer):
        r"""
        `trl.SFTTrainer` for the backbone alone, on `hf_vla.data.vlm_chat` samples.

        Args:
            model: `vla.vlm`, a VLA (its `.vlm` is used), a VLM directory / hub id, or any image-text-to-text model.
            args (`trl.SFTConfig`): set for you: `remove_unused_columns=False`, `dataset_kwargs.skip_prepare_dataset`.
            train_dataset: `load_vlm_chat(...)` (or any sequence of `{"images": [...], "messages": [...]}`).
            processor (`VLAProcessor`): tokenizer (with the VLA's action tokens), chat template and image size.
            max_length (`int`, *optional*): truncation of `VLMChatCollator`.

        `collator="trl"` feeds TRL's own `DataCollatorForVisionLanguageModeling` instead (conversational
        `{"images", "messages"}` rows, loss on every non-pad token unless `args.assistant_only_loss`); the default
        `"hf_vla"` uses `VLMChatCollator` (loss on the assistant replies, as in co-training).
        """

        def __init__(self, model, args=None, train_dataset=None, processor=None, max_length: int | None = None,
                     collator: str = "hf_vla", eval_dataset=None, **kwargs):  # fmt: skip
            from trl import SFTConfig

            if processor is None:
                raise ValueError("VLMSFTTrainer: pass processor= (the VLAProcessor: tokenizer, chat template, size)")
            if isinstance(model, str) or hasattr(model, "__fspath__"):
                model = AutoModelForImageTextToText.from_pretrained(str(model))
            elif hasattr(model, "vlm") and isinstance(getattr(model, "vlm"), PreTrainedModel):
                model = model.vlm
            if args is None:
                args = SFTConfig(output_dir="tmp_vlm_sft")
            args.remove_unused_columns = False
            if collator == "hf_vla":
                # TRL accepts only `datasets` datasets: hand it row indices, and read (and decode images of) the
                # samples in the collator, lazily, as the torch dataset does.
                args.dataset_kwargs = {**(args.dataset_kwargs or {}), "skip_prepare_dataset": True}
                sources = {}
                train_dataset = _index_dataset(train_dataset, "train", sources)
                if eval_dataset is not None:
                    eval_dataset = _index_dataset(eval_dataset, "eval", sources)
                kwargs.setdefault("data_collator", _IndexedChatCollator(sources, processor, max_length))
            elif collator == "trl":
                train_dataset = trl_chat_dataset(train_dataset, processor)
                if eval_dataset is not None:
                    eval_dataset = trl_chat_dataset(eval_dataset, processor)
                if max_length is not None:
                    args.max_length = max_length
            else:
                raise ValueError(f"collator: expected 'hf_vla' or 'trl', got {collator!r}")
            self.vla_processor = processor
            super().__init__(model=model, args=args, train_dataset=train_dataset, eval_dataset=eval_dataset,
                             processing_class=image_only_processor(processor), **kwargs)  # fmt: skip

        def _save(self, output_dir: str | None = None, state_dict=None):
            super()._save(output_dir, state_dict)
            output_dir = output_dir if output_dir is not None else self.args.output_dir
            # `from_vlm` reads AutoTokenizer / AutoImageProcessor files; the processor subclass is not registered.
            self.processing_class.tokenizer.save_pretrained(output_dir)
            self.processing_class.image_processor.save_pretrained(output_dir)

    return VLMSFTTrainer


def _index_dataset(samples, split: str, sources: dict):
    from datasets import Dataset

    sources[split] = samples
    return Dataset.from_dict({"hf_vla_split": [split] * len(samples), "hf_vla_index": list(range(len(samples)))})


class _IndexedChatCollator(VLMChatCollator):
    """`VLMChatCollator` on rows `{"hf_vla_split", "hf_vla_index"}` that point into the original chat datasets."""

    def __init__(self, sources: dict, processor, max_length: int | None = None):
        super().__init__(processor, max_length=max_length)
        self.sources = sources

    def __call__(self, rows):
        return super().__call__([self.sources[row["hf_vla_split"]][row["hf_vla_index"]] for row in rows])


def trl_chat_dataset(samples, processor):
    """`hf_vla.data.vlm_chat` samples → a `datasets.Dataset` in TRL's conversational vision format: `images`
    (PIL, resized to the processor's `image_size`) and `messages` with `{"type": "image"}` parts."""
    from datasets import Dataset
    from PIL import Image

    from ..data.vlm_chat import chat_template_messages

    height, width = processor.image_size
    rows = {"images": [], "messages": []}
    for sample in samples:
        rows["images"].append([Image.fromarray(np.asarray(view, dtype=np.uint8)).resize((width, height))
                               for view in sample.get("images") or []])  # fmt: skip
        messages = []
        for message in chat_template_messages(sample["messages"]):
            content = message["content"]
            if isinstance(content, str):
                content = [{"type": "text", "text": content}]
            messages.append({"role": message["role"], "content": content})
        rows["messages"].append(messages)
    return Dataset.from_dict(rows)


def __getattr__(name):  # VLMSFTTrainer is built on first use, so importing this module does not import trl
    if name == "VLMSFTTrainer":
        cls = _sft_trainer_class()
        globals()["VLMSFTTrainer"] = cls
        return cls
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# ---------------------------------------------------------------------------------------------- GRPO (token heads)


def _check_token_model(vla_model) -> None:
    if getattr(vla_model.config, "action_token_offset", None) is None or not hasattr(vla_model, "decode_action_tokens"):
        raise ValueError(f"GRPO: {type(vla_model).__name__} is not a token-head VLA (FAST / bins); continuous heads "
                         "have no token log-probabilities for GRPOTrainer")  # fmt: skip


def completion_action_indices(vla_model, completion_ids: Sequence[Sequence[int]]) -> tuple[list[list[int]], list[bool]]:
    """Completion token ids → action-token indices (offset removed, cut at the end-of-turn token) and whether every
    token before it was a decodable action token."""
    offset, count, eos = (vla_model.config.action_token_offset, vla_model.decodable_action_tokens(),
                          vla_model.config.eos_token_id)  # fmt: skip
    indices, clean = [], []
    for ids in completion_ids:
        ids = [int(t) for t in (ids.tolist() if isinstance(ids, torch.Tensor) else ids)]
        reply = ids[: ids.index(eos)] if eos in ids else ids
        indices.append([t - offset for t in reply])
        clean.append(all(0 <= t - offset < count for t in reply))
    return indices, clean


def decode_completions(vla_model, completion_ids) -> tuple[np.ndarray, np.ndarray]:
    """Completion token ids → (normalised chunks `[B, T, D]` with NaN rows, `[B]` valid), with the model's
    `decode_action_tokens`; a completion holding a non-action token is invalid."""
    _check_token_model(vla_model)
    indices, clean = completion_action_indices(vla_model, completion_ids)
    T, D = vla_model.config.action_horizon, vla_model.config.action_dim
    actions = np.full((len(indices), T, D), np.nan, dtype=np.float32)
    valid = np.zeros(len(indices), dtype=bool)
    rows = [b for b, ok in enumerate(clean) if ok]
    if rows:
        decoded, ok = vla_model.decode_action_tokens([indices[b] for b in rows])
        actions[rows], valid[rows] = decoded, ok
    actions[~valid] = np.nan
    return actions, valid


class ActionReward:
    """GRPO reward from decoded action chunks: `fn(prompts, completions, completion_ids, **columns)`.

    Each completion is decoded with the VLA's own `decode_action_tokens` (normalised units). By default the score
    is the negative mean L1 distance to the row's target chunk, taken from `target_fn(**columns)` (`[B, T, D]`,
    normalised), or from the dataset column `target_column`. `score_fn(actions, valid, **columns) -> [B]` replaces
    the scoring entirely (a simulator rollout, a success detector, …). Invalid rows get `invalid_reward`.
    `self.history` keeps the last `keep` decodings `(actions, valid, rewards)` for inspection.
    """

    def __init__(self, vla_model, target_fn: Callable | None = None, score_fn: Callable | None = None,
                 target_column: str = "target", invalid_reward: float = -1.0, name: str = "action_reward",
                 keep: int = 16):  # fmt: skip
        _check_token_model(vla_model)
        self.vla_model = vla_model
        self.target_fn = target_fn
        self.score_fn = score_fn
        self.target_column = target_column
        self.invalid_reward = float(invalid_reward)
        self.__name__ = name  # TRL logs rewards/<name>/mean
        self.keep = keep
        self.history: list[tuple[np.ndarray, np.ndarray, list[float]]] = []

    def __call__(self, prompts, completions, completion_ids, **columns) -> list[float]:
        actions, valid = decode_completions(self.vla_model, completion_ids)
        if self.score_fn is not None:
            scores = np.asarray(self.score_fn(actions, valid, **columns), dtype=np.float64)
        else:
            if self.target_fn is not None:
                target = self.target_fn(**columns)
            elif self.target_column in columns:
                target = columns[self.target_column]
            else:
                raise KeyError(f"action_reward: no target_fn and no dataset column {self.target_column!r} (columns: "
                               f"{sorted(columns)})")  # fmt: skip
            target = np.asarray(target, dtype=np.float64).reshape(actions.shape)
            scores = -np.abs(np.nan_to_num(actions) - target).mean(axis=(1, 2))
        rewards = [float(s) if ok else self.invalid_reward for s, ok in zip(scores, valid)]
        self.history = (self.history + [(actions, valid, rewards)])[-self.keep:]
        return rewards


def action_reward(vla_model, target_fn: Callable | None = None, **kwargs) -> ActionReward:
    """`ActionReward(vla_model, target_fn, **kwargs)`: see `ActionReward`."""
    return ActionReward(vla_model, target_fn, **kwargs)


def action_generation_kwargs(vla_model) -> dict:
    """`GRPOConfig.generation_kwargs` that restrict sampling to the action tokens the model can decode (as
    `generate_actions` does; and the end-of-turn token where replies vary in length) and enforce the minimum reply
    length."""
    _check_token_model(vla_model)
    config = vla_model.config
    # a FAST tokenizer with a smaller vocabulary than the rows the model reserves: the ids past it never decode
    offset, count, eos = config.action_token_offset, vla_model.decodable_action_tokens(), config.eos_token_id
    min_new, max_new = vla_model.generation_limits()
    rows = vla_model.vlm.get_output_embeddings().weight.shape[0]
    allowed = set(range(offset, offset + count))
    if min_new < max_new:
        allowed.add(eos)
    return {"suppress_tokens": [t for t in range(rows) if t not in allowed], "min_new_tokens": min_new}


def grpo_prompt_dataset(processor, samples: Sequence[Mapping], columns: Sequence[str] = ("target",)):
    """Samples `{"images": [one view per camera], "instruction": str, "state"?: raw, "embodiment"?: key, <columns>}`
    → a `datasets.Dataset` with the VLA processor's prompt (`prompt`, conversational: the views as image parts, then
    the instruction text the processor builds, state text included where the model reads it), `images` (PIL,
    resized to `image_size`, concatenated vertically with `concat_views`) and the extra `columns` (for the reward).

    The reward compares normalised chunks: a sample without a "target" but with raw "actions" `[T, D]` (robot units,
    as a LeRobot sample carries them) gets them normalised with its embodiment's statistics as its "target"."""
    from datasets import Dataset
    from PIL import Image

    rows: dict[str, list] = {"prompt": [], "images": [], **{c: [] for c in columns}}
    for b, sample in enumerate(samples):
        views = processor._check_views([sample["images"]], 1)[0]  # resized (and stacked with concat_views)
        normalized_state = None
        if sample.get("state") is not None:
            raw = processor._check_array([sample["state"]], "state", (1, processor.state_dim))
            normalized_state = processor._normalize_rows(raw, [sample.get("embodiment")], "state", "state")[0]
        text = processor._instruction_text(sample["instruction"], normalized_state, b)
        content = [{"type": "image"} for _ in views] + [{"type": "text", "text": text}]
        rows["prompt"].append([{"role": "user", "content": content}])
        rows["images"].append([Image.fromarray(np.asarray(v, dtype=np.uint8)) for v in views])
        if "target" in columns and "target" not in sample and sample.get("actions") is not None:
            sample = {**sample, "target": _normalized_target(processor, sample)}
        for column in columns:
            value = sample[column]
            rows[column].append(value.tolist() if isinstance(value, np.ndarray) else value)
    return Dataset.from_dict(rows)


def _normalized_target(processor, sample: Mapping) -> np.ndarray:
    """A sample's raw action chunk in the normalised space the model predicts in, as the processor normalises it
    for training."""
    shape = (1, processor.action_horizon, processor.action_dim)
    raw = processor._check_array([sample["actions"]], "actions", shape)
    return processor._normalize_rows(raw, [sample.get("embodiment")], "action", "actions")[0]


def build_grpo_trainer(vla_model, processor, dataset, reward_fn, args=None, **kwargs):
    """A `trl.GRPOTrainer` whose policy is the token-head VLA's backbone `vla_model.vlm` (shared parameters: the VLA
    trains in place). `dataset` comes from `grpo_prompt_dataset`; `reward_fn` is one reward function or a list
    (e.g. `action_reward(vla_model)`); `args` is a `trl.GRPOConfig`: its `generation_kwargs` get the action-token
    restriction (`action_generation_kwargs`) and `max_completion_length` defaults to the longest action reply.
    Extra keyword arguments go to `GRPOTrainer` (e.g. `rollout_func=`, `callbacks=`)."""
    from trl import GRPOConfig, GRPOTrainer

    _check_token_model(vla_model)
    if args is None:
        args = GRPOConfig(output_dir="tmp_grpo")
    min_new, max_new = vla_model.generation_limits()
    if args.max_completion_length is not None and args.max_completion_length < min_new:
        raise ValueError(f"max_completion_length: {args.max_completion_length} is shorter than an action reply "
                         f"({min_new}..{max_new} tokens)")  # fmt: skip
    if args.max_completion_length is None or args.max_completion_length > max_new:
        # No reply is longer; a bins reply, which has no end-of-turn token, would otherwise run on to TRL's default
        # length, never decode, and leave every reward equal (no advantage, no update).
        args.max_completion_length = max_new
    args.generation_kwargs = {**action_generation_kwargs(vla_model), **(args.generation_kwargs or {})}
    processing_class = image_only_processor(processor, padding_side="left")
    policy = vla_model.vlm
    return GRPOTrainer(model=policy, reward_funcs=reward_fn, args=args, train_dataset=dataset,
                       processing_class=processing_class, **kwargs)  # fmt: skip


__all__ = ["ActionReward", "VLMSFTTrainer", "action_generation_kwargs", "action_reward", "build_grpo_trainer",
           "completion_action_indices", "decode_completions", "grpo_prompt_dataset", "image_only_processor",
           "trl_chat_dataset"]


if __name__ == "__main__":

    from transformers import PrinterCallback
    from trl import GRPOConfig, SFTConfig

    from ..testing import build_tiny_vla, scratch_dir

    torch.set_num_threads(1)  # tiny models: one thread is faster, and steadier on a shared CPU
    work_dir = scratch_dir("trl_demo_")
    model, processor = build_tiny_vla("bins")
    rng = np.random.default_rng(0)

    def view():
        return rng.integers(0, 256, (56, 56, 3), dtype=np.uint8)

    def logged(trainer, key):
        return [round(entry[key], 4) for entry in trainer.state.log_history if key in entry]

    settings = dict(max_steps=2, learning_rate=1e-3, logging_steps=1, save_strategy="no", report_to="none",
                    use_cpu=True, activation_checkpointing=False, disable_tqdm=True, seed=0)  # fmt: skip
    chat = [{"images": [view()], "messages": [{"role": "user", "content": "<image>\nWhat is on the table?"},
                                              {"role": "assistant", "content": "A red block."}]}] * 2
    sft = _sft_trainer_class()(model, SFTConfig(str(work_dir / "sft"), per_device_train_batch_size=2, **settings),
                               train_dataset=chat, processor=processor)  # fmt: skip
    sft.remove_callback(PrinterCallback)  # the lines below summarise Trainer's per-step log dicts
    sft.train()
    print(f"VLMSFTTrainer on {type(model).__name__}.vlm, chat data: losses {logged(sft, 'loss')}")

    horizon, action_dim = model.config.action_horizon, model.config.action_dim
    samples = [{"images": [view() for _ in processor.camera_names], "instruction": "open the drawer",
                "state": rng.normal(size=processor.state_dim),
                "target": rng.uniform(-0.5, 0.5, (horizon, action_dim)).astype(np.float32)} for _ in range(4)]
    prompts = grpo_prompt_dataset(processor, samples)
    print("GRPO prompt parts:", [part["text"] if part["type"] == "text" else "<image>"
                                for part in prompts[0]["prompt"][0]["content"]])
    restriction = action_generation_kwargs(model)
    vocabulary = model.vlm.get_output_embeddings().weight.shape[0]
    print(f"sampling: {vocabulary - len(restriction['suppress_tokens'])} of {vocabulary} tokens allowed, "
          f"replies of {restriction['min_new_tokens']} tokens ({horizon} steps × {action_dim} dims)")
    reward = action_reward(model)
    grpo = build_grpo_trainer(model, processor, prompts, reward,
                              GRPOConfig(str(work_dir / "grpo"), per_device_train_batch_size=4, num_generations=2,
                                         beta=0.0, **settings))  # fmt: skip
    grpo.remove_callback(PrinterCallback)
    grpo.train()
    print(f"GRPO on the backbone of {type(model).__name__}: mean reward per step {logged(grpo, 'reward')}")
    actions, valid, rewards = reward.history[-1]
    print(f"last step: {int(valid.sum())}/{len(valid)} completions decoded to {list(actions.shape[1:])} chunks, "
          f"rewards (−L1 to target) {[round(r, 3) for r in rewards]}")
