"""Flow-matching action head: a DiT that turns noise into an action chunk, conditioned on vision-language features.

One class covers StarVLA's three flow-matching heads (and GR00T N1.5's, without embodiment-specific layers):

- GR00T form (`layerwise=False`, StarVLA `QwenGR00T`): `conditions` is one tensor `[B, L, H_vlm]` (typically the last
  VLM layer); cross-attention blocks read it with k/v width `cross_attention_dim = H_vlm`; the DiT's
  timestep-modulated output (`proj_out_1`, `proj_out_2` → `output_dim`) is decoded by `action_decoder`
  (`output_dim → hidden → action_dim`).
- Layer-wise form (`layerwise=True`, StarVLA `QwenPI`): `conditions` is a sequence of `num_layers` tensors, one per VLM
  layer, and block `i` reads condition `i`; `action_decoder` (`D → hidden → action_dim`) reads the last block's hidden
  states directly, so `proj_out_1/2` exist (for checkpoint compatibility) but are unused.
- Compressed layer-wise form (`project_condition_dim=H_vlm`, StarVLA `QwenPI_v3`): each condition first goes through its
  own `project_layers[i] = LayerNorm(H_vlm) → Linear(H_vlm → D)`, so the DiT can be narrower than the VLM.

Flow-matching convention (t = 1 is clean data): `x_t = (1 − t)·noise + t·action`, target velocity `action − noise`,
training time `t = (s − u)/s` with `u ~ Beta(α, β)` (the GR00T form clamps `u ≤ s`; StarVLA's layer-wise head
does not, so a few draws in a thousand give t slightly below 0), discrete bucket `int(t · 1000)` (truncated toward
zero, as StarVLA's `.long()`) fed to the DiT's timestep encoder and the action encoder. Sampling integrates
`x += v̂ / N` from `x_0 ~ N(0, I)` at `t = k/N`.

The DiT sees `[state token(s) (if state is given), future tokens, action tokens]`; the prediction is read at the last
`action_horizon` positions. In the all-cross form (no block self-attends) the tokens never mix, so sampling feeds the
action tokens alone: same chunk, a third of the step. Parameter names follow StarVLA (`model.*`,
`action_encoder.layer{1,2,3}`, `state_encoder.layer{1,2}`, `action_decoder.layer{1,2}`, `future_tokens`,
`position_embedding`, `project_layers`).
In StarVLA checkpoints `project_layers.*` sits at the framework level, not under `action_model.`; a converter maps it.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .dit import DiT, attention_mask_from_key_padding

Conditions = torch.Tensor | Sequence[torch.Tensor]


def action_time_sinusoidal_embedding(timesteps: torch.Tensor, dim: int) -> torch.Tensor:
    """GR00T's action-encoder time features: `[sin(t·f_k), cos(t·f_k)]` with `f_k = exp(−ln(1e4) · k / (dim/2))`.

    Args:
        timesteps: `[...]` timesteps (the discrete flow-matching bucket).
    Returns:
        float32 `[..., dim]`.
    """
    half = dim // 2
    frequencies = torch.exp(
        torch.arange(half, dtype=torch.float32, device=timesteps.device) * (-math.log(10000.0) / half)
    )
    angles = timesteps.float().unsqueeze(-1) * frequencies
    return torch.cat([torch.sin(angles), torch.cos(angles)], dim=-1)


class ActionEncoder(nn.Module):
    """Noisy action `[B, H, A]` + time bucket `[B]` → action tokens `[B, H, D]`.

    `layer3(swish(layer2(concat[layer1(a), sinusoid(t)])))`.
    """

    def __init__(self, action_dim: int, hidden_size: int):
        super().__init__()
        self.hidden_size = hidden_size
        self.layer1 = nn.Linear(action_dim, hidden_size)
        self.layer2 = nn.Linear(2 * hidden_size, hidden_size)
        self.layer3 = nn.Linear(hidden_size, hidden_size)

    def forward(
        self, actions: torch.Tensor, timesteps: torch.Tensor, time_features: torch.Tensor | None = None
    ) -> torch.Tensor:
        """`time_features`: `action_time_sinusoidal_embedding(timesteps, hidden_size)` (`[B or 1, D]`), if at hand."""
        action_features = self.layer1(actions)
        if time_features is None:
            time_features = action_time_sinusoidal_embedding(timesteps, self.hidden_size)
        time_features = time_features.to(action_features.dtype)[:, None, :].expand(*actions.shape[:2], -1)
        hidden = F.silu(self.layer2(torch.cat([action_features, time_features], dim=-1)))
        return self.layer3(hidden)


class MLP(nn.Module):
    """`layer2(relu(layer1(x)))`."""

    def __init__(self, input_dim: int, hidden_dim: int, output_dim: int):
        super().__init__()
        self.layer1 = nn.Linear(input_dim, hidden_dim)
        self.layer2 = nn.Linear(hidden_dim, output_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer2(F.relu(self.layer1(x)))


class FlowMatchingActionHead(nn.Module):
    """Flow-matching DiT action head; backbone-agnostic (it sees condition tensors, never a VLM).

    All arguments are keyword-only.

    Args:
        action_dim: A, width of one action step.
        action_horizon: H, number of action steps predicted by `sample`.
        state_dim: width of the proprioceptive state; None builds no `state_encoder` (state then cannot be given).
        state_in_prompt: the model writes the state into the prompt (QwenPI_v3) and gives the head none; the
            `state_encoder` is still built, for checkpoint compatibility, but frozen (`freeze_unused_parameters`).
        dit_hidden_size: D, width of the DiT and of every token it processes (768 GR00T DiT-B, H_vlm for QwenPI,
            1024 for QwenPI_v3).
        num_layers: DiT blocks (16 for GR00T; the number of VLM layers for the layer-wise forms).
        attention_head_dim: width of one attention head (64).
        num_attention_heads: defaults to `dit_hidden_size // attention_head_dim`; their product must equal D.
        cross_attention_dim: width of the condition tokens as the DiT sees them; defaults to D (the layer-wise forms
            require D). For GR00T set it to H_vlm.
        output_dim: width of the DiT's `proj_out_2` (GR00T 1024; present but unused in the layer-wise forms, 26 there).
        mlp_hidden_size: hidden width of `state_encoder` and `action_decoder` (StarVLA `hidden_size`, 1024).
        dropout, final_dropout: DiT dropout (StarVLA 0.2, True).
        interleave_self_attention: odd DiT blocks self-attend; False = every block cross-attends.
        layerwise: conditions are one tensor per DiT block and the decoder reads the DiT's pre-output hidden states.
        project_condition_dim: layer-wise only: H_vlm of the conditions; builds `project_layers` (one
            LayerNorm(H_vlm) → Linear(H_vlm → D) per block; Identity when H_vlm == D).
        num_future_tokens: learned tokens between state and action tokens (32).
        max_seq_len: size of the learned action position embedding (1024); the horizon must not exceed it.
        repeated_diffusion_steps: R; `forward` repeats every sample R times with fresh noise and time.
        num_inference_steps: default number of Euler steps of `sample` (4).
        num_timestep_buckets: time discretisation (1000).
        time_beta_alpha, time_beta_beta, time_noise_s: training time `t = (s − u)/s`, `u ~ Beta(α, β)`, with
            `u ≤ s` in the GR00T form only (see `sample_time`).
    """

    def __init__(
        self,
        *,
        action_dim: int,
        action_horizon: int,
        state_dim: int | None = None,
        state_in_prompt: bool = False,
        dit_hidden_size: int = 768,
        num_layers: int = 16,
        attention_head_dim: int = 64,
        num_attention_heads: int | None = None,
        cross_attention_dim: int | None = None,
        output_dim: int = 1024,
        mlp_hidden_size: int = 1024,
        dropout: float = 0.2,
        final_dropout: bool = True,
        interleave_self_attention: bool = True,
        layerwise: bool = False,
        project_condition_dim: int | None = None,
        num_future_tokens: int = 32,
        max_seq_len: int = 1024,
        repeated_diffusion_steps: int = 1,
        num_inference_steps: int = 4,
        num_timestep_buckets: int = 1000,
        time_beta_alpha: float = 1.5,
        time_beta_beta: float = 1.0,
        time_noise_s: float = 0.999,
    ):
        super().__init__()
        if num_attention_heads is None:
            num_attention_heads = dit_hidden_size // attention_head_dim
        if num_attention_heads * attention_head_dim != dit_hidden_size:
            raise ValueError(
                f"num_attention_heads ({num_attention_heads}) x attention_head_dim ({attention_head_dim}) must equal "
                f"dit_hidden_size ({dit_hidden_size})."
            )
        if project_condition_dim is not None and not layerwise:
            raise ValueError("project_condition_dim (per-layer condition projection) needs layerwise=True.")
        if layerwise and cross_attention_dim not in (None, dit_hidden_size):
            raise ValueError(
                "Layer-wise heads cross-attend at the DiT width: cross_attention_dim must be dit_hidden_size."
            )
        if action_horizon > max_seq_len:
            raise ValueError(f"action_horizon ({action_horizon}) exceeds max_seq_len ({max_seq_len}).")
        if repeated_diffusion_steps < 1 or num_inference_steps < 1:
            raise ValueError("repeated_diffusion_steps and num_inference_steps must be >= 1.")

        self.action_dim = action_dim
        self.action_horizon = action_horizon
        self.state_dim = state_dim
        self.state_in_prompt = state_in_prompt
        self.hidden_size = dit_hidden_size
        self.num_layers = num_layers
        self.layerwise = layerwise
        self.repeated_diffusion_steps = repeated_diffusion_steps
        self.num_inference_steps = num_inference_steps
        self.num_timestep_buckets = num_timestep_buckets
        self.time_beta_alpha = time_beta_alpha
        self.time_beta_beta = time_beta_beta
        self.time_noise_s = time_noise_s

        self.model = DiT(
            num_attention_heads=num_attention_heads,
            attention_head_dim=attention_head_dim,
            num_layers=num_layers,
            output_dim=output_dim,
            cross_attention_dim=cross_attention_dim,
            dropout=dropout,
            final_dropout=final_dropout,
            interleave_self_attention=interleave_self_attention,
        )
        self.state_encoder = MLP(state_dim, mlp_hidden_size, dit_hidden_size) if state_dim else None
        self.action_encoder = ActionEncoder(action_dim, dit_hidden_size)
        decoder_input_dim = dit_hidden_size if layerwise else output_dim
        self.action_decoder = MLP(decoder_input_dim, mlp_hidden_size, action_dim)
        self.future_tokens = nn.Embedding(num_future_tokens, dit_hidden_size)
        self.position_embedding = nn.Embedding(max_seq_len, dit_hidden_size)
        nn.init.normal_(self.future_tokens.weight, mean=0.0, std=0.02)
        nn.init.normal_(self.position_embedding.weight, mean=0.0, std=0.02)

        self.project_layers = None
        if project_condition_dim is not None:
            self.project_layers = nn.ModuleList(
                nn.Identity()
                if project_condition_dim == dit_hidden_size
                else nn.Sequential(
                    nn.LayerNorm(project_condition_dim), nn.Linear(project_condition_dim, dit_hidden_size)
                )
                for _ in range(num_layers)
            )
        self.freeze_unused_parameters()

    def freeze_unused_parameters(self) -> None:
        """Freezes what no loss reaches but checkpoints carry: `proj_out_1/2` of the layer-wise forms (they decode the
        DiT's hidden states) and the `state_encoder` when the state goes into the prompt. DDP without unused-parameter
        search (co-training) would otherwise wait for their gradients forever. `VLATrainer` calls it again, since
        PEFT's `modules_to_save` copies make every parameter of the head trainable."""
        unused = [self.model.proj_out_1, self.model.proj_out_2] if self.layerwise else []
        if self.state_in_prompt and self.state_encoder is not None:
            unused.append(self.state_encoder)
        for module in unused:
            module.requires_grad_(False)

    @property
    def dtype(self) -> torch.dtype:
        return self.action_encoder.layer1.weight.dtype

    # ----------------------------------------------------------------------------------------------------------------
    # Pieces shared by training and sampling

    def prepare_conditions(self, conditions: Conditions) -> torch.Tensor | list[torch.Tensor]:
        """Check the condition form, cast to the head's dtype and (compressed layer-wise form) project each layer."""
        if self.layerwise:
            if isinstance(conditions, torch.Tensor) or len(conditions) != self.num_layers:
                got = "a tensor" if isinstance(conditions, torch.Tensor) else f"{len(conditions)} tensors"
                raise ValueError(
                    f"This layer-wise head needs a sequence of {self.num_layers} condition tensors, got {got}."
                )
            prepared = [condition.to(self.dtype) for condition in conditions]
            if self.project_layers is not None:
                prepared = [project(condition) for project, condition in zip(self.project_layers, prepared)]
            return prepared
        if not isinstance(conditions, torch.Tensor):
            raise ValueError(
                "This head cross-attends to one condition tensor [B, L, H]; got a sequence (layerwise=False)."
            )
        return conditions.to(self.dtype)

    def encode_state(self, state: torch.Tensor | None, batch_size: int) -> torch.Tensor | None:
        """State `[B, S]` or `[B, k, S]` → state tokens `[B, 1 or k, D]` (None passes through)."""
        if state is None:
            return None
        if self.state_encoder is None:
            raise ValueError("This head was built without a state encoder (state_dim=None) but a state was given.")
        if state.dim() not in (2, 3) or state.shape[0] != batch_size or state.shape[-1] != self.state_dim:
            raise ValueError(f"state: expected shape [{batch_size}, {self.state_dim}] or [{batch_size}, k, "
                             f"{self.state_dim}], got {list(state.shape)}")
        if state.dim() == 2:
            state = state[:, None, :]
        return self.state_encoder(state.to(self.dtype))

    def sample_time(self, batch_size: int, device: torch.device | str | None = None) -> torch.Tensor:
        """Training times `t = (s − u)/s`, `u ~ Beta(α, β)`, as float32 `[batch_size]`. As in StarVLA, the GR00T
        form clamps `u ≤ s` (t in [0, 1]) and the layer-wise form does not (u > s, about 0.2% of draws at the
        defaults, gives t in (1 − 1/s, 0), which `time_to_bucket` maps to bucket 0)."""
        beta = torch.distributions.Beta(
            torch.tensor(self.time_beta_alpha, device=device), torch.tensor(self.time_beta_beta, device=device)
        )
        u = beta.sample((batch_size,))
        if not self.layerwise:
            u = u.clamp(max=self.time_noise_s)
        return (self.time_noise_s - u) / self.time_noise_s

    def time_to_bucket(self, time: torch.Tensor) -> torch.Tensor:
        """Continuous time → discrete timestep `int(t · num_timestep_buckets)`, truncated toward zero (StarVLA's
        `.long()`: the floor for t ≥ 0, and bucket 0 for the layer-wise form's slightly negative times)."""
        return (time.float() * self.num_timestep_buckets).long()

    @property
    def tokens_interact(self) -> bool:
        """Whether any DiT block self-attends. When none does (the all-cross layer-wise form), every token is updated
        from itself and the conditions alone, so the state and future tokens never reach the action positions the
        velocity is read from."""
        return not all(self.model.block_cross_attends(index) for index in range(self.num_layers))

    def predict_velocity(
        self,
        noisy_actions: torch.Tensor,
        timestep_buckets: torch.Tensor,
        conditions: torch.Tensor | list[torch.Tensor],
        condition_mask: torch.Tensor | None = None,
        state_tokens: torch.Tensor | None = None,
        timestep_features: tuple | None = None,
        action_tokens_only: bool = False,
    ) -> torch.Tensor:
        """One DiT evaluation: velocity `[B, H, A]` at `noisy_actions` `[B, H, A]` and `timestep_buckets` `[B]`.

        `conditions` must come from `prepare_conditions` (or `model.project_contexts` of those) and `state_tokens`
        from `encode_state`; `condition_mask` may be given in the DiT's SDPA form. `timestep_features` is
        `timestep_features(timestep_buckets)`, when the caller has computed it already. `action_tokens_only` runs the
        DiT on the action tokens alone, which gives the same velocity when no block self-attends (`tokens_interact`
        is False) at a third of the cost; sampling does so.
        """
        if action_tokens_only and self.tokens_interact:
            raise ValueError("action_tokens_only: the DiT's self-attention blocks read every token; it needs all-cross.")
        batch, horizon, _ = noisy_actions.shape
        time_features, modulations = (None, None) if timestep_features is None else timestep_features
        action_tokens = self.action_encoder(noisy_actions.to(self.dtype), timestep_buckets, time_features)
        action_tokens = action_tokens + self.position_embedding.weight[:horizon][None]
        if action_tokens_only:
            tokens = action_tokens
        else:
            tokens = [self.future_tokens.weight[None].expand(batch, -1, -1), action_tokens]
            if state_tokens is not None:
                tokens.insert(0, state_tokens)
            tokens = torch.cat(tokens, dim=1)
        hidden_states = self.model(
            tokens,
            timestep_buckets,
            conditions,
            encoder_attention_mask=condition_mask,
            project_output=not self.layerwise,
            modulations=modulations,
        )
        return self.action_decoder(hidden_states[:, -horizon:])

    def timestep_features(self, timestep_buckets: torch.Tensor) -> tuple[torch.Tensor, list]:
        """What the timestep alone decides in one step: the action encoder's time features `[B, D]` and the DiT's
        modulations (`DiT.timestep_modulations`)."""
        time_features = action_time_sinusoidal_embedding(timestep_buckets, self.hidden_size)
        return time_features, self.model.timestep_modulations(timestep_buckets)

    def sampling_schedule(self, num_steps: int, device=None) -> list[tuple[torch.Tensor, tuple]]:
        """Per Euler step k: the timestep bucket `[1]` (t = k/N) and its `timestep_features`, all computed in one
        batch — the schedule is known before sampling starts, so the steps only run what depends on the actions."""
        buckets = torch.tensor(
            [int(k / num_steps * self.num_timestep_buckets) for k in range(num_steps)], dtype=torch.long, device=device
        )
        time_features, modulations = self.timestep_features(buckets)
        per_step_modulations = zip(*(
            zip(one_plus_scale.split(1), shift.split(1)) for one_plus_scale, shift in modulations
        ))  # fmt: skip
        return [
            (bucket, (features, list(step_modulations)))
            for bucket, features, step_modulations in zip(buckets.split(1), time_features.split(1), per_step_modulations)
        ]

    # ----------------------------------------------------------------------------------------------------------------
    # Training and inference

    def forward(
        self,
        conditions: Conditions,
        condition_mask: torch.Tensor | None,
        actions: torch.Tensor,
        state: torch.Tensor | None = None,
        action_mask: torch.Tensor | None = None,
        noise: torch.Tensor | None = None,
        time: torch.Tensor | None = None,
        repeats: int | None = None,
    ) -> torch.Tensor:
        """Flow-matching training loss (scalar, float32).

        Every sample is repeated `R = repeats` times (default `repeated_diffusion_steps`) along the batch (tiled: copy
        `r` of sample `b` sits at row `r·B + b`), each copy with its own noise and time.

        Args:
            conditions: `[B, L, C]` (GR00T form) or a sequence of `num_layers` tensors `[B, L, H]` (layer-wise form).
            condition_mask: `[B, L]` key padding mask of the condition tokens (True / 1 = real token), or None.
            actions: `[B, H, A]` target action chunk (normalised).
            state: `[B, S]` or `[B, k, S]` proprioceptive state, or None.
            action_mask: `[B, H]` (or `[B, H, A]`) mask of valid steps; the loss is the mean over valid entries.
            noise: `[R·B, H, A]` initial noise; drawn from N(0, I) when None.
            time: `[R·B]` times in [0, 1] (1 = clean); drawn from the Beta schedule when None.
            repeats: R for this call.
        """
        repeats = self.repeated_diffusion_steps if repeats is None else repeats
        if isinstance(repeats, bool) or not isinstance(repeats, int) or repeats < 1:
            raise ValueError(f"repeated_diffusion_steps: expected a positive integer, got {repeats!r}")
        conditions = self.prepare_conditions(conditions)
        state_tokens = self.encode_state(state, actions.shape[0])
        if repeats > 1:
            if isinstance(conditions, list):
                conditions = [condition.repeat(repeats, 1, 1) for condition in conditions]
            else:
                conditions = conditions.repeat(repeats, 1, 1)
            condition_mask = None if condition_mask is None else condition_mask.repeat(repeats, 1)
            state_tokens = None if state_tokens is None else state_tokens.repeat(repeats, 1, 1)
            actions = actions.repeat(repeats, 1, 1)
            if action_mask is not None:
                action_mask = action_mask.repeat(repeats, *([1] * (action_mask.dim() - 1)))

        # The path and its target in float32 whatever the head's dtype: a bf16 time would put x_t at another time
        # than the bucket the DiT is told (and x_t at t = 0.999 on the clean chunk); only the DiT's input is rounded.
        actions = actions.float()
        batch = actions.shape[0]
        noise = torch.randn_like(actions) if noise is None else noise.to(actions)
        time = self.sample_time(batch, actions.device) if time is None else time.to(actions)
        if noise.shape != actions.shape or time.shape != (batch,):
            raise ValueError(
                f"noise must be {tuple(actions.shape)} and time ({batch},) (batch x repeated_diffusion_steps); "
                f"got {tuple(noise.shape)} and {tuple(time.shape)}."
            )
        t = time[:, None, None]
        noisy_actions = (1 - t) * noise + t * actions
        target_velocity = actions - noise

        predicted = self.predict_velocity(
            noisy_actions.to(self.dtype), self.time_to_bucket(time), conditions, condition_mask, state_tokens
        )
        squared_error = (predicted.float() - target_velocity).pow(2)
        if action_mask is None:
            return squared_error.mean()
        mask = action_mask.to(squared_error.dtype)
        if mask.dim() == 2:
            mask = mask[..., None]
        mask = mask.expand_as(squared_error)
        return (squared_error * mask).sum() / mask.sum().clamp_min(1.0)

    @torch.no_grad()
    def sample(
        self,
        conditions: Conditions,
        condition_mask: torch.Tensor | None = None,
        state: torch.Tensor | None = None,
        noise: torch.Tensor | None = None,
        num_steps: int | None = None,
    ) -> torch.Tensor:
        """Euler integration of the learned velocity from noise (t = 0) to actions (t = 1).

        The conditions are computed once by the caller and their cross-attention keys/values once here; each of the
        `num_steps` steps runs only the rest of the head (one DiT call; on the action tokens alone when no block
        self-attends).

        Args:
            conditions, condition_mask, state: as in `forward`.
            noise: `[B, H, A]` starting point x_0; drawn from N(0, I) when None.
            num_steps: Euler steps N (default `num_inference_steps`); step k evaluates at `t = k/N`.
        Returns:
            float32 `[B, action_horizon, action_dim]` normalised actions (integrated in float32 at any head dtype).
        """
        num_steps = self.num_inference_steps if num_steps is None else num_steps
        if isinstance(num_steps, bool) or not isinstance(num_steps, int) or num_steps < 1:
            raise ValueError(f"num_steps: expected a positive integer, got {num_steps!r}")
        conditions = self.prepare_conditions(conditions)
        first = conditions[0] if isinstance(conditions, list) else conditions
        batch, device = first.shape[0], first.device
        state_tokens = self.encode_state(state, batch)
        shape = (batch, self.action_horizon, self.action_dim)
        # The path in float32 whatever the head's dtype, as in training: in bf16 a step's v̂/N smaller than half the
        # spacing of bf16 values around x would be rounded away; only the DiT's input is rounded.
        if noise is None:
            actions = torch.randn(shape, device=device, dtype=torch.float32)
        elif tuple(noise.shape) != shape:
            raise ValueError(f"noise must be {shape}, got {tuple(noise.shape)}.")
        else:
            actions = noise.to(device=device, dtype=torch.float32)

        # Computed once, shared by every step: the conditions' keys/values, the attention mask, and everything that
        # depends only on the (known in advance) timesteps.
        contexts = self.model.project_contexts(conditions)
        mask = None if condition_mask is None else attention_mask_from_key_padding(condition_mask, self.dtype)
        step, action_tokens_only = 1.0 / num_steps, not self.tokens_interact
        for bucket, timestep_features in self.sampling_schedule(num_steps, device):
            buckets = bucket.expand(batch)
            velocity = self.predict_velocity(
                actions, buckets, contexts, mask, state_tokens, timestep_features, action_tokens_only
            )
            actions = actions + step * velocity.float()
        return actions


if __name__ == "__main__":
    torch.manual_seed(0)
    batch, horizon, action_dim, state_dim, vlm_dim, length = 2, 8, 7, 5, 48, 12
    actions, state = torch.randn(batch, horizon, action_dim), torch.randn(batch, state_dim)
    mask = torch.ones(batch, length, dtype=torch.bool)
    mask[0, :4] = False  # left padding

    gr00t = FlowMatchingActionHead(
        action_dim=action_dim, action_horizon=horizon, state_dim=state_dim, dit_hidden_size=32, num_layers=4,
        attention_head_dim=16, cross_attention_dim=vlm_dim, output_dim=40, mlp_hidden_size=64,
        repeated_diffusion_steps=2,
    )  # fmt: skip
    condition = torch.randn(batch, length, vlm_dim)
    print("GR00T      loss", gr00t(condition, mask, actions, state=state).item(),
          "sample", tuple(gr00t.eval().sample(condition, mask, state=state).shape))  # fmt: skip

    layerwise = FlowMatchingActionHead(
        action_dim=action_dim, action_horizon=horizon, state_dim=state_dim, dit_hidden_size=32, num_layers=4,
        attention_head_dim=16, output_dim=26, mlp_hidden_size=64, layerwise=True, project_condition_dim=vlm_dim,
        interleave_self_attention=False,
    )  # fmt: skip
    layers = [torch.randn(batch, length, vlm_dim) for _ in range(4)]
    print("layer-wise loss", layerwise(layers, mask, actions).item(),
          "sample", tuple(layerwise.eval().sample(layers, mask, num_steps=2).shape))  # fmt: skip
