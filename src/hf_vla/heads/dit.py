"""Diffusion-transformer (DiT) building blocks of the flow-matching action heads (GR00T N1.5 / StarVLA style).

The DiT denoises a short sequence of action-side tokens. Every block is modulated by the flow-matching timestep through
an adaptive LayerNorm and attends either to the vision-language condition tokens (cross-attention) or to its own tokens
(self-attention). The same `DiT` serves two conditioning forms:

- one condition for the whole stack (GR00T): every cross-attention block reads the same tensor `[B, L, C]`;
- one condition per block (layer-wise, StarVLA `QwenPI`): block `i` reads the `i`-th tensor of a sequence, e.g. the
  output of VLM layer `i`.

With `interleave_self_attention=True` odd blocks self-attend and even blocks cross-attend; with `False` every block
cross-attends (StarVLA's "legacy all-cross" layer-wise forward).

Parameter names mirror the diffusers modules StarVLA builds its DiT from, so published checkpoints load key for key:

    timestep_encoder.timestep_embedder.{linear_1, linear_2}
    transformer_blocks.{i}.norm1.linear
    transformer_blocks.{i}.attn1.{to_q, to_k, to_v, to_out.0}
    transformer_blocks.{i}.ff.net.{0.proj, 2}
    proj_out_1, proj_out_2

diffusers is not a dependency: everything here is plain torch.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from transformers.modeling_layers import GradientCheckpointingLayer

from ..packed_linear import PackedLinear


def timestep_sinusoidal_embedding(
    timesteps: torch.Tensor,
    num_channels: int = 256,
    flip_sin_to_cos: bool = True,
    downscale_freq_shift: float = 1.0,
    max_period: float = 10000.0,
) -> torch.Tensor:
    """Sinusoidal features of (possibly discrete) timesteps, as diffusers' `Timesteps` computes them.

    Channel `k < half = num_channels // 2` has frequency `exp(-ln(max_period) * k / (half - downscale_freq_shift))`.
    The result is `[sin, cos]`, or `[cos, sin]` when `flip_sin_to_cos` (GR00T uses `flip_sin_to_cos=True`, shift 1).

    Args:
        timesteps: `[...]` integer or float timesteps.
    Returns:
        float32 tensor `[..., num_channels]`.
    """
    half = num_channels // 2
    exponent = torch.arange(half, dtype=torch.float32, device=timesteps.device) * (-math.log(max_period))
    frequencies = torch.exp(exponent / (half - downscale_freq_shift))
    angles = timesteps.float().unsqueeze(-1) * frequencies
    sin, cos = torch.sin(angles), torch.cos(angles)
    features = torch.cat([cos, sin] if flip_sin_to_cos else [sin, cos], dim=-1)
    if num_channels % 2 == 1:
        features = F.pad(features, (0, 1))
    return features


class TimestepEmbedding(nn.Module):
    """Linear → SiLU → Linear on the sinusoidal timestep features."""

    def __init__(self, in_channels: int, embedding_dim: int):
        super().__init__()
        self.linear_1 = nn.Linear(in_channels, embedding_dim)
        self.act = nn.SiLU()
        self.linear_2 = nn.Linear(embedding_dim, embedding_dim)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.linear_2(self.act(self.linear_1(features)))


class TimestepEncoder(nn.Module):
    """Discrete flow-matching timestep `[B]` → conditioning vector `temb` `[B, D]`."""

    def __init__(self, embedding_dim: int, num_channels: int = 256):
        super().__init__()
        self.num_channels = num_channels
        self.timestep_embedder = TimestepEmbedding(num_channels, embedding_dim)

    def forward(self, timesteps: torch.Tensor) -> torch.Tensor:
        features = timestep_sinusoidal_embedding(
            timesteps, self.num_channels, flip_sin_to_cos=True, downscale_freq_shift=1
        )
        return self.timestep_embedder(features.to(self.timestep_embedder.linear_1.weight.dtype))


class AdaLayerNorm(nn.Module):
    """Affine-free LayerNorm whose scale and shift come from the timestep: `x̂ · (1 + scale) + shift`."""

    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.silu = nn.SiLU()
        self.linear = nn.Linear(dim, 2 * dim)
        self.norm = nn.LayerNorm(dim, eps=eps, elementwise_affine=False)

    def modulation(self, temb: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """`(1 + scale, shift)`, each `[B, 1, D]`, of timestep embeddings `temb` `[B, D]`."""
        scale, shift = self.linear(self.silu(temb)).chunk(2, dim=-1)
        return 1 + scale[:, None], shift[:, None]

    def forward(
        self, hidden_states: torch.Tensor, temb: torch.Tensor | None = None, modulation: tuple | None = None
    ) -> torch.Tensor:
        one_plus_scale, shift = self.modulation(temb) if modulation is None else modulation
        return torch.addcmul(shift, self.norm(hidden_states), one_plus_scale)


def attention_mask_from_key_padding(key_padding_mask: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """`[B, L]` (True / nonzero = real token) → additive SDPA mask `[B, 1, 1, L]` of `dtype`: 0 to attend, -inf not.

    The additive form is what SDPA turns a boolean mask into on every call; made once, it serves every block and
    step. A sample with no real token at all would give NaN attention; such a sample attends to every token instead.
    """
    keep = key_padding_mask.bool()
    keep = keep | ~keep.any(dim=-1, keepdim=True)
    additive = torch.zeros(keep.shape, dtype=dtype, device=keep.device).masked_fill_(~keep, float("-inf"))
    return additive[:, None, None, :]


class Attention(nn.Module):
    """Multi-head attention with projections `to_q`, `to_k`, `to_v` and output projection `to_out.0`.

    Self-attention when no `encoder_hidden_states` are given; otherwise queries come from `hidden_states` and
    keys/values from `encoder_hidden_states` (width `kv_dim`). Always torch's SDPA: a model's `attn_implementation`
    ("eager", "flash_attention_2") selects its backbone's attention only.
    """

    def __init__(
        self,
        query_dim: int,
        num_heads: int,
        head_dim: int = 64,
        kv_dim: int | None = None,
        dropout: float = 0.0,
        bias: bool = True,
        out_bias: bool = True,
    ):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = head_dim
        inner_dim = num_heads * head_dim
        kv_dim = query_dim if kv_dim is None else kv_dim
        self.to_q = nn.Linear(query_dim, inner_dim, bias=bias)
        self.to_k = nn.Linear(kv_dim, inner_dim, bias=bias)
        self.to_v = nn.Linear(kv_dim, inner_dim, bias=bias)
        self.to_out = nn.ModuleList([nn.Linear(inner_dim, query_dim, bias=out_bias), nn.Dropout(dropout)])

    def _split_heads(self, x: torch.Tensor) -> torch.Tensor:
        batch, length, _ = x.shape
        return x.view(batch, length, self.num_heads, self.head_dim).transpose(1, 2)

    def project_context(self, context: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values `[B, heads, L, head_dim]` of `context` `[B, L, kv_dim]`."""
        return self._split_heads(self.to_k(context)), self._split_heads(self.to_v(context))

    def forward(
        self,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | tuple[torch.Tensor, torch.Tensor] | None = None,
        attention_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """
        Args:
            hidden_states: `[B, T, query_dim]`.
            encoder_hidden_states: `[B, L, kv_dim]`, its already projected `(key, value)`, or None for self-attention.
            attention_mask: additive `[B, 1, 1, L]` (`attention_mask_from_key_padding`); only meaningful for
                cross-attention.
        """
        query = self._split_heads(self.to_q(hidden_states))
        if isinstance(encoder_hidden_states, tuple):  # keys and values projected once per sample (see DiT.project_contexts)
            key, value = encoder_hidden_states
        else:
            key, value = self.project_context(hidden_states if encoder_hidden_states is None else encoder_hidden_states)
        out = F.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask)
        out = self.to_out[0](out.transpose(1, 2).flatten(2))
        return self.to_out[1](out) if self.training else out  # dropout


class GELUProjection(nn.Module):
    """Linear followed by tanh-approximated GELU (diffusers' `GELU(approximate="tanh")`, parameters under `proj`)."""

    def __init__(self, dim_in: int, dim_out: int):
        super().__init__()
        self.proj = nn.Linear(dim_in, dim_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if isinstance(self.proj, PackedLinear):
            return self.proj.forward_gelu_tanh(x)
        return F.gelu(self.proj(x), approximate="tanh")


class FeedForward(nn.Module):
    """`net = [GELU-projection D→mult·D, Dropout, Linear mult·D→D, (Dropout if final_dropout)]`."""

    def __init__(self, dim: int, mult: int = 4, dropout: float = 0.0, final_dropout: bool = False):
        super().__init__()
        inner_dim = dim * mult
        layers: list[nn.Module] = [GELUProjection(dim, inner_dim), nn.Dropout(dropout), nn.Linear(inner_dim, dim)]
        if final_dropout:
            layers.append(nn.Dropout(dropout))
        self.net = nn.ModuleList(layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.net:
            if self.training or not isinstance(layer, nn.Dropout):  # eval: skip the no-op dropout calls
                x = layer(x)
        return x


class BasicTransformerBlock(GradientCheckpointingLayer):
    """AdaLN → attention → (dropout) → residual, then affine-free LayerNorm → feed-forward → residual.

    `cross_attention_dim` only sets the input width of `to_k` / `to_v`: a block attends to `encoder_hidden_states`
    whenever they are passed, and to its own tokens otherwise. The owning `DiT` decides which. A
    `GradientCheckpointingLayer`, so the model's `gradient_checkpointing_enable()` recomputes the head's blocks in
    the backward pass too.
    """

    # Run outside `forward` (by sampling): FSDP2 gathers the block's parameters for them too once
    # `modeling_vla.register_fsdp_forward_methods` has run.
    fsdp_forward_methods = ("modulation", "project_context")

    def __init__(
        self,
        dim: int,
        num_attention_heads: int,
        attention_head_dim: int,
        cross_attention_dim: int | None = None,
        dropout: float = 0.0,
        final_dropout: bool = False,
        norm_eps: float = 1e-5,
    ):
        super().__init__()
        self.cross_attention_dim = cross_attention_dim
        self.norm1 = AdaLayerNorm(dim, eps=norm_eps)
        self.attn1 = Attention(
            dim, num_attention_heads, attention_head_dim, kv_dim=cross_attention_dim, dropout=dropout, bias=True
        )
        self.norm3 = nn.LayerNorm(dim, eps=norm_eps, elementwise_affine=False)
        self.ff = FeedForward(dim, dropout=dropout, final_dropout=final_dropout)
        self.final_dropout = nn.Dropout(dropout) if final_dropout else None

    def forward(
        self,
        hidden_states: torch.Tensor,
        modulation: torch.Tensor | tuple[torch.Tensor, torch.Tensor],
        encoder_hidden_states: torch.Tensor | tuple | None = None,
        attention_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """`modulation` is the timestep embedding `temb` `[B, D]`, or `norm1.modulation(temb)` computed already;
        `attention_mask` as in `Attention.forward`."""
        if isinstance(modulation, torch.Tensor):
            modulation = self.norm1.modulation(modulation)
        attn_output = self.attn1(self.norm1(hidden_states, modulation=modulation), encoder_hidden_states, attention_mask)
        if self.final_dropout is not None and self.training:
            attn_output = self.final_dropout(attn_output)
        hidden_states = hidden_states + attn_output
        return hidden_states + self.ff(self.norm3(hidden_states))

    def modulation(self, temb: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """`norm1.modulation(temb)`: what sampling computes for every step ahead of the block's `forward`."""
        return self.norm1.modulation(temb)

    def project_context(self, context: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """`attn1.project_context(context)`: the keys and values sampling computes once, ahead of `forward`."""
        return self.attn1.project_context(context)


class DiT(nn.Module):
    """Timestep-modulated transformer over action-side tokens, cross-attending to condition tokens.

    Args:
        num_attention_heads: heads per block; the model width is `num_attention_heads * attention_head_dim`.
        attention_head_dim: width of one head (64 for DiT-B and the layer-wise heads, 48 for DiT-L).
        num_layers: number of blocks. For layer-wise conditioning it equals the number of conditions.
        output_dim: width of `proj_out_2` (the GR00T output; unused by the layer-wise heads but kept for checkpoints).
        cross_attention_dim: width of the condition tokens (input width of `to_k` / `to_v` of cross-attention blocks);
            defaults to the model width.
        dropout: dropout after the attention output projection, inside the feed-forward, and (with `final_dropout`)
            on the attention branch and at the end of the feed-forward.
        final_dropout: see `dropout`.
        interleave_self_attention: odd blocks self-attend (k/v width = model width) and even blocks cross-attend;
            when False every block cross-attends.
        norm_eps: epsilon of the block LayerNorms (the output LayerNorm uses 1e-6).
        timestep_channels: width of the sinusoidal timestep features.
    """

    def __init__(
        self,
        num_attention_heads: int = 12,
        attention_head_dim: int = 64,
        num_layers: int = 16,
        output_dim: int = 1024,
        cross_attention_dim: int | None = None,
        dropout: float = 0.2,
        final_dropout: bool = True,
        interleave_self_attention: bool = True,
        norm_eps: float = 1e-5,
        timestep_channels: int = 256,
    ):
        super().__init__()
        self.inner_dim = num_attention_heads * attention_head_dim
        self.num_layers = num_layers
        self.output_dim = output_dim
        self.cross_attention_dim = self.inner_dim if cross_attention_dim is None else cross_attention_dim
        self.interleave_self_attention = interleave_self_attention

        self.timestep_encoder = TimestepEncoder(self.inner_dim, num_channels=timestep_channels)
        self.transformer_blocks = nn.ModuleList(
            BasicTransformerBlock(
                self.inner_dim,
                num_attention_heads,
                attention_head_dim,
                cross_attention_dim=self.cross_attention_dim if self.block_cross_attends(index) else None,
                dropout=dropout,
                final_dropout=final_dropout,
                norm_eps=norm_eps,
            )
            for index in range(num_layers)
        )
        self.norm_out = nn.LayerNorm(self.inner_dim, eps=1e-6, elementwise_affine=False)
        self.proj_out_1 = nn.Linear(self.inner_dim, 2 * self.inner_dim)
        self.proj_out_2 = nn.Linear(self.inner_dim, output_dim)

    def block_cross_attends(self, index: int) -> bool:
        return not (self.interleave_self_attention and index % 2 == 1)

    def project_contexts(self, encoder_hidden_states: torch.Tensor | Sequence[torch.Tensor]) -> list:
        """Each cross-attention block's keys and values of the conditions, computed once: the conditions are fixed
        across denoising steps, so `forward` can take this list in place of `encoder_hidden_states`."""
        per_block = isinstance(encoder_hidden_states, (list, tuple))
        return [
            block.project_context(encoder_hidden_states[index] if per_block else encoder_hidden_states)
            if self.block_cross_attends(index)
            else None
            for index, block in enumerate(self.transformer_blocks)
        ]

    def timestep_modulations(self, timestep: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Everything the timestep alone decides: each block's AdaLN `(1 + scale, shift)`, then the output layer's,
        each `[B, 1, D]` for timesteps `[B]`. Sampling knows every step's timestep in advance and computes these for
        all steps at once (see `FlowMatchingActionHead.sample`)."""
        temb = self.timestep_encoder(timestep)
        modulations = [block.modulation(temb) for block in self.transformer_blocks]
        return modulations + [self.output_modulation(temb)]

    def output_modulation(self, temb: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The output layer's `(1 + scale, shift)`, each `[B, 1, D]`, of timestep embeddings `temb` `[B, D]`."""
        shift, scale = self.proj_out_1(F.silu(temb)).chunk(2, dim=-1)
        return 1 + scale[:, None], shift[:, None]

    def forward(
        self,
        hidden_states: torch.Tensor,
        timestep: torch.Tensor,
        encoder_hidden_states: torch.Tensor | Sequence[torch.Tensor],
        encoder_attention_mask: torch.Tensor | None = None,
        project_output: bool = True,
        modulations: list | None = None,
    ) -> torch.Tensor:
        """
        Args:
            hidden_states: `[B, T, D]` action-side tokens.
            timestep: `[B]` discrete timesteps (flow-matching time bucket).
            encoder_hidden_states: `[B, L, C]` read by every cross-attention block, or a sequence of `num_layers`
                tensors `[B, L_i, C]` of which block `i` reads the `i`-th (entries of self-attention blocks are unused),
                or the output of `project_contexts`.
            encoder_attention_mask: `[B, L]` key padding mask of the condition tokens (True = real token), shared by
                every cross-attention block, or its SDPA form `[B, 1, 1, L]` (`attention_mask_from_key_padding`).
            project_output: apply the timestep-modulated output norm and `proj_out_2` (`[B, T, output_dim]`); when
                False return the last block's hidden states `[B, T, D]` (layer-wise heads decode those).
            modulations: `timestep_modulations(timestep)`, when the caller has computed them already (sampling, on a
                whole model: a block's modulation computed outside its forward).
        """
        per_block = isinstance(encoder_hidden_states, (list, tuple))
        if per_block and len(encoder_hidden_states) != self.num_layers:
            raise ValueError(
                f"Layer-wise conditioning needs one condition per block: got {len(encoder_hidden_states)} for "
                f"{self.num_layers} blocks."
            )
        if modulations is None:
            # Each block modulates inside its own forward: FSDP gathers a sharded block's parameters there only.
            temb = self.timestep_encoder(timestep)
            modulations = [temb] * self.num_layers + [self.output_modulation(temb)]
        attention_mask = encoder_attention_mask
        if attention_mask is not None and attention_mask.dim() == 2:
            attention_mask = attention_mask_from_key_padding(attention_mask, hidden_states.dtype)
        for index, block in enumerate(self.transformer_blocks):
            if self.block_cross_attends(index):
                context = encoder_hidden_states[index] if per_block else encoder_hidden_states
                hidden_states = block(hidden_states, modulations[index], context, attention_mask)
            else:
                hidden_states = block(hidden_states, modulations[index])
        if not project_output:
            return hidden_states
        one_plus_scale, shift = modulations[-1]
        return self.proj_out_2(torch.addcmul(shift, self.norm_out(hidden_states), one_plus_scale))


if __name__ == "__main__":
    dit = DiT(num_attention_heads=2, attention_head_dim=16, num_layers=4, output_dim=24, cross_attention_dim=48)
    tokens, condition = torch.randn(2, 10, 32), torch.randn(2, 7, 48)
    mask = torch.ones(2, 7, dtype=torch.bool)
    mask[0, :3] = False
    out = dit(tokens, torch.tensor([0, 500]), condition, mask)
    print("DiT output", tuple(out.shape), sum(p.numel() for p in dit.parameters()), "params")
