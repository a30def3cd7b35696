"""What the token-head variants (FAST, bins) share: actions are tokens of the VLM's own vocabulary.

Training appends the target's action tokens (and the end-of-turn token) as the assistant reply and applies the
causal-LM loss on that span only. Inference decodes greedily with the KV cache, constrained to action tokens, and
maps the tokens back to a normalised chunk; a sequence that does not decode gives a NaN row (never zeros).
"""

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from huggingface_hub.dataclasses import strict
from transformers import LogitsProcessor, LogitsProcessorList

from ..configuration_vla import VLAConfig, check_at_least
from ..modeling_vla import VLM_INPUT_NAMES, VLAOutput, VLAPreTrainedModel

IGNORE_INDEX = -100


def add_action_tokens(tokenizer, template: str, count: int) -> int:
    """Adds `template.format(k)` for k < count as special tokens (kept if already there, as in StarVLA's -Action
    models); returns the id of token 0. The ids must be consecutive."""
    names = [template.format(k) for k in range(count)]
    missing = [n for n in names if n not in tokenizer.get_vocab()]
    if missing:
        tokenizer.add_tokens(missing, special_tokens=True)
    ids = tokenizer.convert_tokens_to_ids(names)
    if ids != list(range(ids[0], ids[0] + count)):
        raise ValueError(f"action tokens {template!r}: ids in the tokenizer are not consecutive")
    return ids[0]


@strict
class VLATokenActionConfig(VLAConfig):
    r"""
    Args:
        num_action_tokens (`int`): size of the action vocabulary added to the VLM's.
        action_token_template (`str`, *optional*, defaults to `"<robot_action_{}>"`): name of action token k
            (StarVLA's -Action models already carry these).
        action_token_offset (`int`, *optional*): id of action token 0, filled in by `from_vlm`.
        eos_token_id (`int`, *optional*): the end-of-turn token that closes an action reply, filled in by `from_vlm`.
    """

    num_action_tokens: int = 256
    action_token_template: str = "<robot_action_{}>"
    action_token_offset: int | None = None
    eos_token_id: int | None = None

    def validate_architecture(self):
        super().validate_architecture()
        check_at_least(self, num_action_tokens=1, max_action_tokens=1)


class AllowOnly(LogitsProcessor):
    """Masks every logit outside `allowed` token ids."""

    def __init__(self, allowed: torch.Tensor):
        self.allowed = allowed

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        mask = torch.full_like(scores, float("-inf"))
        mask[:, self.allowed.to(scores.device)] = 0
        return scores + mask


@dataclass
class ActionDecoding:
    actions: torch.Tensor  # [B, T, D] normalised; NaN rows where `valid` is False
    valid: torch.Tensor  # [B] bool
    action_token_ids: list[list[int]]  # generated action-token indices (offset removed), per sample


class VLATokenActionModel(VLAPreTrainedModel):
    """Base of the token-head variants; subclasses map chunks to action-token indices and back."""

    def __init__(self, config: VLATokenActionConfig):
        super().__init__(config)
        self.action_head = None  # the head is the VLM's own vocabulary
        self.post_init()

    # ------------------------------------------------------------------ to implement

    def encode_actions(self, actions: np.ndarray) -> list[list[int]]:
        """Normalised chunks `[B, T, D]` → action-token indices (0 … num_action_tokens − 1) per sample."""
        raise NotImplementedError

    def decode_action_tokens(self, indices: list[list[int]]) -> tuple[np.ndarray, np.ndarray]:
        """Indices per sample → (`[B, T, D]` with NaN rows, `[B]` valid mask)."""
        raise NotImplementedError

    def generation_limits(self) -> tuple[int, int]:
        """(min, max) new tokens of an action reply."""
        raise NotImplementedError

    def scored_reply_tokens(self, indices: list[list[int]], valid: np.ndarray) -> list[list[bool]] | None:
        """Which tokens of each reply the loss scores, given the valid entries `valid` `[B, T, D]` (steps past an
        episode's end, dimensions a mixture padded); None scores them all."""
        return None

    # ------------------------------------------------------------------ shared

    @classmethod
    def config_kwargs_from_tokenizer(cls, tokenizer, config_kwargs: dict) -> dict:
        template = config_kwargs.get("action_token_template", cls.config_class.action_token_template)
        count = config_kwargs.get("num_action_tokens", cls.config_class.num_action_tokens)
        offset = add_action_tokens(tokenizer, template, count)
        eos = tokenizer.convert_tokens_to_ids("<|im_end|>") if "<|im_end|>" in tokenizer.get_vocab() else tokenizer.eos_token_id
        return {**config_kwargs, "action_token_offset": offset, "eos_token_id": eos}

    @classmethod
    def adapt_backbone(cls, vlm, tokenizer, config_kwargs: dict) -> None:
        rows = vlm.get_input_embeddings().weight.shape[0]
        count = config_kwargs.get("num_action_tokens", cls.config_class.num_action_tokens)
        if rows < config_kwargs["action_token_offset"] + count:
            # StarVLA's rule for its -Action models: old rows + one row per action token, so shapes match theirs.
            # New rows start at the mean of the old ones, which a meta-device backbone (no values) cannot compute.
            vlm.resize_token_embeddings(rows + count, mean_resizing=vlm.device.type != "meta")

    def _image_token_id(self) -> int:
        return self.config.vlm_config.image_token_id

    def append_targets(self, input_ids, attention_mask, actions: torch.Tensor, action_mask: torch.Tensor | None = None):
        """Prompt + action tokens + end of turn, left-padded again; labels cover the reply only, less the tokens of
        entries `action_mask` marks invalid where the variant can tell them apart (`scored_reply_tokens`)."""
        indices = self.encode_actions(actions.detach().float().cpu().numpy())
        scored = None
        if action_mask is not None:
            valid = action_mask.detach().cpu().numpy() > 0
            valid = np.broadcast_to(valid[..., None] if valid.ndim == 2 else valid, actions.shape)
            if not valid.all():
                scored = self.scored_reply_tokens(indices, valid)
        offset, eos = self.config.action_token_offset, self.config.eos_token_id
        rows, labels = [], []
        for b, reply in enumerate(indices):
            prompt = input_ids[b][attention_mask[b].bool()] if attention_mask is not None else input_ids[b]
            target = torch.tensor([offset + k for k in reply] + [eos], dtype=input_ids.dtype, device=input_ids.device)
            label = target.clone()
            if scored is not None:
                label[:-1][~torch.tensor(scored[b], dtype=torch.bool, device=label.device)] = IGNORE_INDEX
            rows.append(torch.cat([prompt, target]))
            labels.append(torch.cat([torch.full_like(prompt, IGNORE_INDEX), label]))
        length = max(len(r) for r in rows)
        pad = self.config.vlm_config.get_text_config().pad_token_id or 0
        ids = torch.stack([F.pad(r, (length - len(r), 0), value=pad) for r in rows])
        mask = torch.stack([F.pad(torch.ones_like(r), (length - len(r), 0)) for r in rows])
        label = torch.stack([F.pad(r, (length - len(r), 0), value=IGNORE_INDEX) for r in labels])
        return ids, mask, label

    def forward(
        self,
        input_ids: torch.LongTensor,
        attention_mask: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        image_grid_thw: torch.LongTensor | None = None,
        mm_token_type_ids: torch.IntTensor | None = None,
        actions: torch.Tensor | None = None,
        action_mask: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        **kwargs,
    ) -> VLAOutput:
        r"""
        actions (`torch.Tensor` of shape `(batch, action_horizon, action_dim)`): normalised target chunk; its action
            tokens are appended to the prompt and scored with the causal-LM loss.
        action_mask (`torch.Tensor` of shape `(batch, action_horizon)` or `(batch, action_horizon, action_dim)`,
            *optional*): valid entries of `actions`; the tokens of invalid ones are not scored (bins), or, where a
            token codes the whole chunk (FAST), the padding is learned as given, with a warning.
        labels (`torch.LongTensor`, *optional*): ready-made labels for an `input_ids` that already holds the reply.
        """
        if actions is not None:
            self.check_actions(actions, input_ids.shape[0], action_mask)
            input_ids, attention_mask, labels = self.append_targets(input_ids, attention_mask, actions, action_mask)
            mm_token_type_ids = (input_ids == self._image_token_id()).to(torch.int32)
        if labels is None:
            raise ValueError("actions: token-head training needs target actions (or labels)")
        hidden = self.encode(
            input_ids=input_ids, attention_mask=attention_mask, pixel_values=pixel_values,
            image_grid_thw=image_grid_thw, mm_token_type_ids=mm_token_type_ids,
        ).last_hidden_state  # fmt: skip
        # Logits only where a label exists: the vocabulary projection of every prompt position would be wasted.
        targets = labels[:, 1:]
        scored = targets != IGNORE_INDEX
        logits = self.vlm.lm_head(hidden[:, :-1][scored])
        loss = F.cross_entropy(logits.float(), targets[scored])
        return VLAOutput(loss=loss, action_loss=loss)

    def decodable_action_tokens(self) -> int:
        """How many action tokens, from the first, decoding may choose among (every one, unless a variant's
        vocabulary is smaller than the rows the model reserves)."""
        return self.config.num_action_tokens

    @torch.no_grad()
    def generate_actions(self, use_cache: bool = True, **inputs) -> ActionDecoding:
        """Greedy, KV-cached decoding of an action reply, constrained to action tokens (and end of turn)."""
        if self.training and self.vlm.is_gradient_checkpointing:
            # a checkpointed backbone in training mode drops its cache while generate still feeds one token a step
            use_cache = False
        offset, count, eos = self.config.action_token_offset, self.decodable_action_tokens(), self.config.eos_token_id
        min_new, max_new = self.generation_limits()
        allowed = torch.arange(offset, offset + count)
        if min_new < max_new:
            allowed = torch.cat([allowed, torch.tensor([eos])])
        vlm_inputs = {k: v for k, v in inputs.items() if k in VLM_INPUT_NAMES}
        self.backbone.check_inputs(self.config.vlm_config, vlm_inputs)
        prompt_length = vlm_inputs["input_ids"].shape[1]
        # Settings not given here come from `self.vlm.generation_config`: the defaults of the backbone's config (see
        # `from_vlm`), the same for a model built from a hub VLM and for its saved copy.
        sequences = self.vlm.generate(
            **vlm_inputs,
            do_sample=False,
            min_new_tokens=min_new,
            max_new_tokens=max_new,
            eos_token_id=eos,
            pad_token_id=eos,
            use_cache=use_cache,
            logits_processor=LogitsProcessorList([AllowOnly(allowed)]),
        )[:, prompt_length:]
        indices = []
        for row in sequences.tolist():
            reply = []
            for token in row:
                if token == eos:
                    break
                reply.append(token - offset)
            indices.append(reply)
        actions, valid = self.decode_action_tokens(indices)
        device = inputs["input_ids"].device
        return ActionDecoding(torch.from_numpy(actions).to(device), torch.from_numpy(valid).to(device), indices)

    def predict_action(self, **inputs) -> torch.Tensor:
        """Normalised chunk `[B, T, D]`; rows whose tokens do not decode are NaN (see `generate_actions` for the
        validity mask and the raw tokens)."""
        self.check_predict_inputs(inputs, options=("use_cache",))
        inputs = {k: v for k, v in inputs.items() if k not in ("actions", "action_mask", "state")}
        return self.generate_actions(**inputs).actions


if __name__ == "__main__":
    from ..testing import build_tiny_vla, random_observation

    model, processor = build_tiny_vla("bins")
    inputs = processor(**random_observation(processor))
    decoding = model.generate_actions(**inputs)
    offset, count = model.config.action_token_offset, model.config.num_action_tokens
    print(f"{count} action tokens added at ids {offset}…{offset + count - 1} of a {len(processor.tokenizer)}-token "
          "vocabulary")
    print(f"greedy decoding, constrained to action tokens: {[len(ids) for ids in decoding.action_token_ids]} tokens "
          f"per sample, valid {decoding.valid.tolist()}, actions {list(decoding.actions.shape)}")
