"""The OFT variant: action-query tokens → last-layer hidden states → MLPResNet → one action step per query."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ...heads.mlp_resnet import MLPResNet
from ...modeling_vla import VLAOutput, VLAPreTrainedModel
from .configuration_oft import VLAOFTConfig


class VLAOFTForActionPrediction(VLAPreTrainedModel):
    config_class = VLAOFTConfig
    loss_averages_action_entries = True  # the L1 loss is a mean over the valid (action_mask) entries

    def __init__(self, config: VLAOFTConfig):
        super().__init__(config)
        hidden = self.vlm_hidden_size
        self.action_head = MLPResNet(
            input_dim=hidden,
            hidden_dim=config.head_hidden_dim or 2 * hidden,
            output_dim=config.action_dim,
            num_blocks=config.head_num_blocks,
        )
        self.post_init()

    @classmethod
    def config_kwargs_from_tokenizer(cls, tokenizer, config_kwargs: dict) -> dict:
        token = config_kwargs.get("action_token", cls.config_class.action_token)
        ids = tokenizer.encode(token, add_special_tokens=False)
        if len(ids) != 1:
            raise ValueError(f"action_token: {token!r} must be a single token, but the tokenizer splits it into {ids}")
        return {**config_kwargs, "action_token": token, "action_token_id": ids[0]}

    def action_query_states(self, input_ids: torch.Tensor, hidden_states: torch.Tensor) -> torch.Tensor:
        """Hidden states at the action-query placeholders, in prompt order: `[B, T, hidden]`."""
        if self.config.action_token_id is None:
            raise ValueError("config.action_token_id is not set; build the model with AutoModelForVLA.from_vlm")
        is_query = input_ids == self.config.action_token_id
        counts = is_query.sum(-1)
        horizon = self.config.action_horizon
        if not bool((counts == horizon).all()):
            raise ValueError(
                f"input_ids: expected {horizon} action-query tokens (id {self.config.action_token_id}) per sample, "
                f"found {counts.tolist()}"
            )
        return hidden_states[is_query].view(input_ids.shape[0], horizon, hidden_states.shape[-1])

    def forward(
        self,
        input_ids: torch.LongTensor,
        attention_mask: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        image_grid_thw: torch.LongTensor | None = None,
        mm_token_type_ids: torch.IntTensor | None = None,
        actions: torch.Tensor | None = None,
        action_mask: torch.Tensor | None = None,
        **kwargs,
    ) -> VLAOutput:
        r"""
        actions (`torch.Tensor` of shape `(batch, action_horizon, action_dim)`, *optional*):
            Normalised target chunk; when given, the L1 loss is returned.
        action_mask (`torch.Tensor` of shape `(batch, action_horizon)` or `(batch, action_horizon, action_dim)`, *optional*):
            1 for valid steps (or entries), 0 for steps past an episode's end or padded dimensions (excluded from the loss).
        """
        hidden = self.encode(
            input_ids=input_ids,
            attention_mask=attention_mask,
            pixel_values=pixel_values,
            image_grid_thw=image_grid_thw,
            mm_token_type_ids=mm_token_type_ids,
        ).last_hidden_state
        queries = self.action_query_states(input_ids, hidden)
        predicted = self.action_head(queries.to(self.action_head.fc1.weight.dtype))

        loss = None
        if actions is not None:
            self.check_actions(actions, predicted.shape[0], action_mask)
            error = F.l1_loss(predicted.float(), actions.float(), reduction="none")
            if action_mask is None:
                loss = error.mean()
            else:
                weights = action_mask.to(error.dtype)
                weights = (weights[..., None] if weights.ndim == 2 else weights).expand_as(error)
                loss = (error * weights).sum() / weights.sum().clamp_min(1.0)
        return VLAOutput(loss=loss, action_loss=loss, actions=predicted)

    @torch.no_grad()
    def predict_action(self, **inputs) -> torch.Tensor:
        """One forward pass; the normalised float32 action chunk `[B, action_horizon, action_dim]` (at any model
        dtype, as every variant returns it)."""
        self.check_predict_inputs(inputs)
        inputs = {k: v for k, v in inputs.items() if k not in ("actions", "action_mask", "state")}
        return self.forward(**inputs).actions.float()


__all__ = ["VLAOFTForActionPrediction"]


if __name__ == "__main__":
    from ...testing import smoke_run

    smoke_run("oft")
