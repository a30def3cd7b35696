"""VLAPreTrainedModel: a VLM backbone plus an action head, as one transformers model.

Every variant keeps the backbone under `self.vlm` (the family's own `*ForConditionalGeneration`, so its weights load
and save like the VLM's) and its head under `self.action_head` (None for the token variants, whose head is the
VLM's own vocabulary). A variant implements `forward` (training, returns `.loss`) and `predict_action` (inference,
returns a normalised chunk `[B, T, D]`).
"""

from __future__ import annotations

import dataclasses
import difflib
import os
from dataclasses import dataclass

import torch
from transformers import AutoModelForImageTextToText, AutoTokenizer, GenerationConfig, PreTrainedModel
from transformers.utils import ModelOutput, logging

from .backbones import get_backbone_adapter
from .configuration_vla import VLAConfig

# Inputs the processor produces for the backbone; variants pass exactly these to the VLM.
# What every transformers config takes besides its fields (`from_vlm(..., attn_implementation="sdpa")`)
GENERAL_CONFIG_KWARGS = {"attn_implementation", "experts_implementation", "output_attentions", "use_cache",
                         "pad_token_id", "bos_token_id", "eos_token_id", "num_labels"}  # fmt: skip
VLM_INPUT_NAMES = ("input_ids", "attention_mask", "pixel_values", "image_grid_thw", "mm_token_type_ids")
PROCESSOR_OUTPUT_NAMES = (*VLM_INPUT_NAMES, "state", "actions", "action_mask")
# `from_pretrained` options that say where and how files are fetched: what a companion file (the processor's
# statistics, FAST's tokenizer) must be fetched with too, so that it comes from the same revision and cache
HUB_DOWNLOAD_KWARGS = ("revision", "cache_dir", "token", "local_files_only", "force_download", "proxies")

logger = logging.get_logger(__name__)


@dataclass
class VLAOutput(ModelOutput):
    """
    loss (`torch.FloatTensor`, *optional*): the training loss: the action loss (`VLATrainer` adds co-training's
        VLM loss itself).
    action_loss (`torch.FloatTensor`, *optional*): the action loss alone, for logging.
    actions (`torch.FloatTensor` of shape `(batch, action_horizon, action_dim)`, *optional*):
        OFT's predicted chunk in normalised action space (None for flow and token heads, which sample or decode it
        in `predict_action`).
    """

    loss: torch.FloatTensor | None = None
    action_loss: torch.FloatTensor | None = None
    actions: torch.FloatTensor | None = None


def config_field_names(config_class) -> set[str]:
    """The keyword arguments a variant's config takes: its dataclass fields and the general transformers ones."""
    return {field.name for field in dataclasses.fields(config_class)} | GENERAL_CONFIG_KWARGS


def base_vlm_reference(vlm_name_or_path) -> str:
    """What a config records as its backbone: a hub id as given, a local folder as an absolute path (a relative one,
    `models/qwen`, reads like a hub id wherever it is not)."""
    return os.path.abspath(vlm_name_or_path) if os.path.isdir(vlm_name_or_path) else str(vlm_name_or_path)


def register_fsdp_forward_methods(model: torch.nn.Module) -> None:
    """Once FSDP2 has sharded `model` (`fully_shard`, as accelerate's preparation does): makes the methods that run
    modules outside their `forward` gather and free the parameters as `forward` does. They are what each module names
    in `fsdp_forward_methods`: a VLA's `predict_action` and `vlm_loss`, and the DiT blocks' sampling precomputations;
    without this they fail on the sharded parameters (or read those a preceding `forward` left gathered). Does
    nothing for a module FSDP2 has not sharded, and for a method already registered."""
    if not torch.distributed.is_available():
        return
    from torch.distributed.fsdp import register_fsdp_forward_method

    for module in model.modules():
        for name in getattr(module, "fsdp_forward_methods", ()):
            if name not in vars(module):  # registering patches the instance
                register_fsdp_forward_method(module, name)


class VLAPreTrainedModel(PreTrainedModel):
    config_class = VLAConfig
    base_model_prefix = "vla"
    main_input_name = "input_ids"
    input_modalities = ("image", "text")
    supports_gradient_checkpointing = True
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_attention_backend = True
    _skip_keys_device_placement = ["past_key_values"]
    # The VLA ties nothing itself: the backbone declares its tie (lm_head ↔ embed_tokens), which transformers finds
    # either way. A mapping, not None, because PEFT reads the submodules' ties only under a mapping; under None it sees
    # no tie, and trainable tokens (training/lora.py) would train a tied lm_head's rows apart from the embeddings'.
    _tied_weights_keys = {}
    # The action loss is a per-batch mean: Trainer must divide it by the gradient-accumulation steps itself.
    accepts_loss_kwargs = False
    # True where that mean is over the valid entries of the chunk (action_mask): VLATrainer then weighs each
    # micro-batch by its share of the valid entries of the optimizer step, as one large batch would.
    loss_averages_action_entries = False
    # Run the model outside `forward` (see `register_fsdp_forward_methods`).
    fsdp_forward_methods = ("predict_action", "vlm_loss")

    def __init__(self, config: VLAConfig):
        super().__init__(config)
        self.backbone = get_backbone_adapter(config.vlm_config)
        self.vlm = self.backbone.build(config.vlm_config)

    def post_init(self):
        super().post_init()
        if self.config.state_dim and not self.reads_state:
            logger.warning_once(
                f"{self.config.model_type}: state_dim={self.config.state_dim}, but this model does not read the state "
                "(no state_in_prompt, and no state encoder in its head): the processor normalises it and it goes no "
                "further. Set state_in_prompt=True to write it into the prompt, or state_dim=0."
            )

    @property
    def reads_state(self) -> bool:
        """Whether the state reaches the model: as prompt text, or through the action head's state encoder."""
        head = getattr(self, "action_head", None)
        return bool(self.config.state_in_prompt) or getattr(head, "state_encoder", None) is not None

    def get_input_embeddings(self):
        return self.vlm.get_input_embeddings()

    def set_input_embeddings(self, value):
        self.vlm.set_input_embeddings(value)

    def get_output_embeddings(self):
        """The backbone's LM head. accelerate's FSDP2 preparation reads it: a head tied to the input embeddings (as in
        Qwen2.5-VL-3B) goes into their shard unit, where torch requires it (it refuses one parameter in two units)."""
        return self.vlm.get_output_embeddings()

    def set_output_embeddings(self, new_embeddings):
        self.vlm.set_output_embeddings(new_embeddings)

    def resize_token_embeddings(self, *args, **kwargs) -> torch.nn.Embedding:
        """The backbone's own resize: input embeddings, LM head and the vocabulary size in `config.vlm_config`."""
        return self.vlm.resize_token_embeddings(*args, **kwargs)

    @property
    def vlm_hidden_size(self) -> int:
        return self.backbone.hidden_size(self.config.vlm_config)

    def encode(self, output_hidden_states: bool = False, **vlm_inputs):
        """Runs the backbone (no LM head) on the processor's multimodal inputs."""
        inputs = {k: v for k, v in vlm_inputs.items() if k in VLM_INPUT_NAMES and v is not None}
        self.backbone.check_inputs(self.config.vlm_config, inputs)
        return self.backbone.encode(self.vlm, output_hidden_states=output_hidden_states, **inputs)

    def check_actions(self, actions: torch.Tensor, batch_size: int, action_mask: torch.Tensor | None = None) -> None:
        """Training targets as the processor gives them: normalised `[B, T, D]` chunks and a 0 / 1 mask of valid
        steps `[B, T]` or entries `[B, T, D]` (other values would weigh the loss, or flip its sign)."""
        expected = (batch_size, self.config.action_horizon, self.config.action_dim)
        for name, value in (("actions", actions), ("action_mask", action_mask)):
            if value is not None and not isinstance(value, torch.Tensor):
                raise ValueError(f"{name}: expected a torch.Tensor (the processor's output), got {type(value).__name__}")
        if tuple(actions.shape) != expected:
            raise ValueError(f"actions: expected shape {list(expected)} (one chunk per prompt), got "
                             f"{list(actions.shape)}")
        if action_mask is None:
            return
        if tuple(action_mask.shape) not in (expected[:2], expected):
            raise ValueError(f"action_mask: expected shape {list(expected[:2])} or {list(expected)}, got "
                             f"{list(action_mask.shape)}")
        # the values on CPU only: on an accelerator the test would sync every step (the processor checks them too)
        on_cpu = action_mask.device.type == "cpu"
        if on_cpu and action_mask.dtype != torch.bool and not ((action_mask == 0) | (action_mask == 1)).all():
            raise ValueError(f"action_mask: expected booleans or 0 / 1, got values "
                             f"{action_mask.unique()[:8].tolist()}")

    def predict_action(self, **inputs) -> torch.Tensor:
        raise NotImplementedError

    def check_predict_inputs(self, inputs: dict, options: tuple[str, ...] = ()) -> None:
        """Refuses what `predict_action` would otherwise drop unread (a misspelt `num_step=1`)."""
        unknown = sorted(set(inputs) - set(PROCESSOR_OUTPUT_NAMES) - set(options))
        if unknown:
            raise TypeError(f"{type(self).__name__}.predict_action: unexpected argument(s) {unknown}; expected the "
                            f"processor's outputs {list(PROCESSOR_OUTPUT_NAMES)}"
                            + (f" and {list(options)}" if options else ""))

    def vlm_loss(self, **chat_batch) -> torch.Tensor:
        """The backbone's own causal-LM loss on a VLM chat batch (co-training: `input_ids`, ..., `labels`)."""
        return self.vlm(**chat_batch).loss

    @classmethod
    def config_kwargs_from_tokenizer(cls, tokenizer, config_kwargs: dict) -> dict:
        """Hook for variants whose config names token ids (e.g. OFT's action-query token)."""
        return config_kwargs

    @classmethod
    def adapt_backbone(cls, vlm, tokenizer, config_kwargs: dict) -> None:
        """Hook for variants that change the backbone before the head is built (e.g. action tokens in the vocabulary)."""

    @classmethod
    def from_vlm(cls, vlm_name_or_path: str, dtype: torch.dtype | str | None = None, **config_kwargs):
        """A new VLA around pretrained VLM weights: the backbone is loaded, the head freshly initialised.

        `dtype` is the whole model's: None gives torch's default (float32) whatever the checkpoint holds (the fp32
        weights mixed-precision training wants), `"auto"` the checkpoint's own. The head gets the backbone's dtype, so
        that the saved model loads back as it was built."""
        known = config_field_names(cls.config_class)
        unknown = sorted(set(config_kwargs) - known)
        if unknown:  # a misspelt `action_horizn=8` would otherwise leave the default horizon
            hints = {name: (difflib.get_close_matches(name, known, n=1) or ["(none close)"])[0] for name in unknown}
            raise ValueError(f"{cls.config_class.__name__}: unknown field(s) {unknown}; closest known: "
                             + ", ".join(f"{name} → {hint}" for name, hint in hints.items()))
        dtype = torch.get_default_dtype() if dtype is None else dtype
        vlm = AutoModelForImageTextToText.from_pretrained(vlm_name_or_path, dtype=dtype)
        # the generation settings a model rebuilt from its config has (a hub VLM's repetition penalty would otherwise
        # change token heads' decoding until the first save and load)
        vlm.generation_config = GenerationConfig.from_model_config(vlm.config)
        tokenizer = AutoTokenizer.from_pretrained(vlm_name_or_path)
        config_kwargs = cls.config_kwargs_from_tokenizer(tokenizer, dict(config_kwargs))
        cls.adapt_backbone(vlm, tokenizer, config_kwargs)
        config_kwargs.setdefault("base_vlm", base_vlm_reference(vlm_name_or_path))
        config = cls.config_class(vlm_config=vlm.config, **config_kwargs)
        with torch.device("meta"):
            model = cls(config)
        model.vlm = model.backbone.prepare(vlm)  # keep the loaded backbone; materialise and initialise the rest
        device = next(vlm.parameters()).device
        for name, child in model.named_children():
            if name == "vlm":
                continue
            child.to_empty(device=device)
            for module in child.modules():
                model._init_weights(module)
            child.to(vlm.dtype)  # the head only: the backbone keeps its float32 buffers (rotary frequencies)
        return model.eval()


if __name__ == "__main__":
    from .testing import build_tiny_vla, random_observation

    model, processor = build_tiny_vla("oft")
    print(f"{type(model).__name__}: {model.backbone.__class__.__name__} around {model.config.base_vlm}")
    inputs = processor(**random_observation(processor))
    with torch.no_grad():
        hidden = model.encode(output_hidden_states=True, **inputs).hidden_states
    print(f"backbone features: {len(hidden)} hidden states of {list(hidden[-1].shape)} for prompts of "
          f"{list(inputs['input_ids'].shape)} tokens")
    try:
        type(model).from_vlm(model.config.base_vlm, action_horizn=8)
    except ValueError as error:
        print("misspelt field:", error)
