"""Pieces StarVLA's flow-matching heads share (its `flow_matching_head/cross_attention_dit.py` and
`action_encoder.py`, built from diffusers' `Timesteps`, `TimestepEmbedding`, `Attention` and `FeedForward`), written
from its code in plain torch on a flat StarVLA-named state dict, for the GR00T and layer-wise reference tests. They
share nothing with hf_vla."""

import math

import torch
import torch.nn.functional as F

DIT = "action_model.model."


def linear(sd, name, x):
    return F.linear(x, sd[f"{name}.weight"], sd[f"{name}.bias"])


def mlp(sd, name, x):
    """GR00T_ActionHeader / LayerwiseFM_ActionHeader `MLP`: layer2(relu(layer1(x))), no input norm."""
    return linear(sd, f"{name}.layer2", F.relu(linear(sd, f"{name}.layer1", x)))


def timestep_features(buckets, channels=256):
    """diffusers `Timesteps(256, flip_sin_to_cos=True, downscale_freq_shift=1)`: frequency k is
    exp(-ln(1e4)·k/(half − 1)); flip_sin_to_cos puts the cosines first."""
    half = channels // 2
    frequencies = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32) / (half - 1))
    angles = buckets.float()[:, None] * frequencies[None]
    return torch.cat([torch.cos(angles), torch.sin(angles)], dim=-1)


def action_time_features(buckets, width):
    """action_encoder.SinusoidalPositionalEncoding: frequency k is exp(-ln(1e4)·k/half), sines first."""
    half = width // 2
    frequencies = torch.exp(-torch.arange(half, dtype=torch.float32) * (math.log(10000.0) / half))
    angles = buckets.float()[..., None] * frequencies
    return torch.cat([torch.sin(angles), torch.cos(angles)], dim=-1)


def timestep_embedding(sd, buckets):
    """cross_attention_dit.TimestepEncoder: TimestepEmbedding(linear_1 → SiLU → linear_2) of the features."""
    name = f"{DIT}timestep_encoder.timestep_embedder"
    return linear(sd, f"{name}.linear_2", F.silu(linear(sd, f"{name}.linear_1", timestep_features(buckets))))


def attention(sd, name, x, context, mask, head_dim):
    """diffusers Attention + AttnProcessor2_0: scale head_dim^-0.5; a bool [B, L] key padding mask (True = attend)
    is repeated per head; `to_out.1` is dropout."""
    q, k, v = (linear(sd, f"{name}.to_{p}", y) for p, y in (("q", x), ("k", context), ("v", context)))
    batch, inner = x.shape[0], q.shape[-1]
    q, k, v = (y.reshape(batch, -1, inner // head_dim, head_dim).transpose(1, 2) for y in (q, k, v))
    scores = q @ k.transpose(-1, -2) / math.sqrt(head_dim)
    if mask is not None:
        scores = scores.masked_fill(~mask[:, None, None, :], float("-inf"))
    out = (scores.softmax(dim=-1) @ v).transpose(1, 2).reshape(batch, -1, inner)
    return linear(sd, f"{name}.to_out.0", out)


def block(sd, i, x, temb, context, mask, head_dim):
    """cross_attention_dit.BasicTransformerBlock (norm_type ada_norm): AdaLayerNorm (`scale, shift` = chunk of
    norm1.linear(silu(temb))), attention to `context` (None: to its own tokens, unmasked), residual; affine-free
    LayerNorm → FeedForward(GELU-tanh) → residual."""
    name = f"{DIT}transformer_blocks.{i}"
    scale, shift = linear(sd, f"{name}.norm1.linear", F.silu(temb)).chunk(2, dim=1)
    normed = F.layer_norm(x, x.shape[-1:], eps=1e-5) * (1 + scale[:, None]) + shift[:, None]
    if context is None:
        x = x + attention(sd, f"{name}.attn1", normed, normed, None, head_dim)
    else:
        x = x + attention(sd, f"{name}.attn1", normed, context, mask, head_dim)
    hidden = F.gelu(linear(sd, f"{name}.ff.net.0.proj", F.layer_norm(x, x.shape[-1:], eps=1e-5)), approximate="tanh")
    return x + linear(sd, f"{name}.ff.net.2", hidden)


def num_blocks(sd) -> int:
    prefix = f"{DIT}transformer_blocks."
    return len({k[len(prefix):].split(".")[0] for k in sd if k.startswith(prefix)})
