"""What the flow-matching variants (GR00T, PI, PI_v3) share: the VLM runs once, the DiT head runs per step.

A variant only says which backbone features condition the head (`conditions`) and how the head is built.
"""

from __future__ import annotations

import torch

from ..heads.flow_matching import FlowMatchingActionHead
from ..modeling_vla import VLAOutput, VLAPreTrainedModel


class VLAFlowMatchingModel(VLAPreTrainedModel):
    # Units that device_map="auto" keeps whole and FSDP's TRANSFORMER_BASED_WRAP shards one by one; `post_init` adds
    # the backbone's (its decoder layers and vision blocks).
    _no_split_modules = ["BasicTransformerBlock"]
    layerwise = False  # True: block i of the DiT reads VLM layer i
    loss_averages_action_entries = True  # the flow-matching MSE is a mean over the valid (action_mask) entries

    def build_action_head(self, config, **head_kwargs) -> FlowMatchingActionHead:
        return FlowMatchingActionHead(
            action_dim=config.action_dim,
            action_horizon=config.action_horizon,
            state_dim=config.state_dim or None,
            state_in_prompt=config.state_in_prompt,
            attention_head_dim=config.attention_head_dim,
            output_dim=config.dit_output_dim,
            mlp_hidden_size=config.head_hidden_size,
            dropout=config.dropout,
            final_dropout=config.final_dropout,
            interleave_self_attention=config.interleave_self_attention,
            num_future_tokens=config.num_future_tokens,
            max_seq_len=config.max_seq_len,
            repeated_diffusion_steps=config.repeated_diffusion_steps,
            num_inference_steps=config.num_inference_steps,
            time_beta_alpha=config.time_beta_alpha,
            time_beta_beta=config.time_beta_beta,
            time_noise_s=config.time_noise_s,
            **head_kwargs,
        )

    def conditions(self, training: bool = False, **vlm_inputs) -> tuple[torch.Tensor | list[torch.Tensor], torch.Tensor | None]:
        """Backbone features the head cross-attends to, and their key padding mask (per `config.condition_mask`)."""
        outputs = self.encode(**vlm_inputs, output_hidden_states=self.layerwise)
        mask = vlm_inputs.get("attention_mask")
        use_mask = self.config.condition_mask == "always" or (self.config.condition_mask == "training" and training)
        mask = mask.bool() if mask is not None and use_mask else None
        if self.layerwise:
            # The last N hidden states are the outputs of the N decoder layers (the first is the embedding output).
            return list(outputs.hidden_states[-self.action_head.num_layers :]), mask
        return outputs.last_hidden_state, mask

    def head_state(self, state: torch.Tensor | None) -> torch.Tensor | None:
        # Variants that write the state into the prompt (state_in_prompt) do not also encode it.
        if self.config.state_in_prompt or self.action_head.state_encoder is None:
            return None
        if state is None:  # predicting without the state the head was trained with is off-distribution
            raise ValueError(f"state: missing; this model's head encodes a state of {self.config.state_dim} values")
        if not isinstance(state, torch.Tensor):
            raise ValueError(f"state: expected a torch.Tensor (the processor's output), got {type(state).__name__}")
        return state

    def forward(
        self,
        input_ids: torch.LongTensor,
        attention_mask: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        image_grid_thw: torch.LongTensor | None = None,
        mm_token_type_ids: torch.IntTensor | None = None,
        state: torch.Tensor | None = None,
        actions: torch.Tensor | None = None,
        action_mask: torch.Tensor | None = None,
        noise: torch.Tensor | None = None,
        time: torch.Tensor | None = None,
        **kwargs,
    ) -> VLAOutput:
        r"""
        state (`torch.Tensor` of shape `(batch, state_dim)`, *optional*): normalised proprioceptive state.
        actions (`torch.Tensor` of shape `(batch, action_horizon, action_dim)`): normalised target chunk.
        action_mask (`torch.Tensor` of shape `(batch, action_horizon)` or `(batch, action_horizon, action_dim)`,
            *optional*): 1 for valid steps (or entries), 0 for steps past an episode's end or padded dimensions.
        noise (`torch.Tensor` of shape `(repeats · batch, action_horizon, action_dim)`, *optional*) and
        time (`torch.Tensor` of shape `(repeats · batch,)`, *optional*, 1 = clean actions): fix the flow-matching
            sample so a loss can be reproduced exactly; drawn at random when omitted.
        """
        if actions is None:
            raise ValueError("actions: flow-matching training needs target actions; use predict_action for inference")
        self.check_actions(actions, input_ids.shape[0], action_mask)
        conditions, mask = self.conditions(
            training=True,
            input_ids=input_ids,
            attention_mask=attention_mask,
            pixel_values=pixel_values,
            image_grid_thw=image_grid_thw,
            mm_token_type_ids=mm_token_type_ids,
        )
        loss = self.action_head(
            conditions, mask, actions, state=self.head_state(state), action_mask=action_mask, noise=noise, time=time,
            repeats=self.config.repeated_diffusion_steps,
        )  # fmt: skip
        return VLAOutput(loss=loss, action_loss=loss)

    @torch.no_grad()
    def predict_action(
        self,
        state: torch.Tensor | None = None,
        noise: torch.Tensor | None = None,
        num_steps: int | None = None,
        **inputs,
    ) -> torch.Tensor:
        """Normalised float32 chunk `[B, action_horizon, action_dim]` (at any model dtype): one backbone pass, then
        `num_steps` Euler steps of the head alone (default `config.num_inference_steps`), starting from `noise` (drawn
        when omitted)."""
        self.check_predict_inputs(inputs, options=("state", "noise", "num_steps"))
        vlm_inputs = {k: v for k, v in inputs.items() if k not in ("actions", "action_mask")}
        conditions, mask = self.conditions(**vlm_inputs)
        num_steps = self.config.num_inference_steps if num_steps is None else num_steps
        return self.action_head.sample(conditions, mask, state=self.head_state(state), noise=noise, num_steps=num_steps)


if __name__ == "__main__":
    import time

    from ..testing import build_tiny_vla, random_observation

    model, processor = build_tiny_vla("gr00t")
    inputs = processor(**random_observation(processor))
    calls = {"backbone": 0, "DiT": 0}
    model.vlm.model.register_forward_hook(lambda *_: calls.update(backbone=calls["backbone"] + 1))
    model.action_head.model.register_forward_hook(lambda *_: calls.update(DiT=calls["DiT"] + 1))
    for steps in (1, 10):
        calls.update(backbone=0, DiT=0)
        start = time.perf_counter()
        with torch.no_grad():
            actions = model.predict_action(**inputs, num_steps=steps)
        print(f"{steps:>2} Euler steps: actions {list(actions.shape)}, forwards {calls}, "
              f"{(time.perf_counter() - start) * 1e3:.1f} ms")
