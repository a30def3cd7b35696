"""The residual MLP that regresses one action step from one action-query hidden state (OpenVLA-OFT, StarVLA QwenOFT).

Parameter names follow StarVLA's `L1RegressionActionHead.model` so checkpoints map key for key:
`layer_norm1, fc1, mlp_resnet_blocks.{i}.ffn.{0: LayerNorm, 1: Linear}, layer_norm2, fc2`.
"""

from __future__ import annotations

import torch
from torch import nn


class MLPResNetBlock(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.ffn = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, dim), nn.ReLU())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.ffn(x)


class MLPResNet(nn.Module):
    """LayerNorm → Linear → ReLU → `num_blocks` residual blocks → LayerNorm → Linear, applied per token."""

    def __init__(self, input_dim: int, hidden_dim: int, output_dim: int, num_blocks: int = 2):
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(input_dim)
        self.fc1 = nn.Linear(input_dim, hidden_dim)
        self.relu = nn.ReLU()
        self.mlp_resnet_blocks = nn.ModuleList([MLPResNetBlock(hidden_dim) for _ in range(num_blocks)])
        self.layer_norm2 = nn.LayerNorm(hidden_dim)
        self.fc2 = nn.Linear(hidden_dim, output_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.fc1(self.layer_norm1(x)))
        for block in self.mlp_resnet_blocks:
            x = block(x)
        return self.fc2(self.layer_norm2(x))


if __name__ == "__main__":
    head = MLPResNet(input_dim=64, hidden_dim=128, output_dim=7)
    print(head(torch.randn(2, 16, 64)).shape, sum(p.numel() for p in head.parameters()), "params")
