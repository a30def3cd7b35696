"""The bins variant: T·D tokens per chunk, one uniform bin per value, decoded to bin centres."""

from __future__ import annotations

import numpy as np

from ...action_tokenizers.bins import UniformBins
from ..token_actions import VLATokenActionModel
from .configuration_bins import VLABinsConfig


class VLABinsForActionPrediction(VLATokenActionModel):
    config_class = VLABinsConfig

    def __init__(self, config: VLABinsConfig):
        super().__init__(config)
        self.bins = UniformBins(config.num_action_tokens)

    def encode_actions(self, actions: np.ndarray) -> list[list[int]]:
        return self.bins.encode(actions).reshape(len(actions), -1).tolist()

    def decode_action_tokens(self, indices: list[list[int]]) -> tuple[np.ndarray, np.ndarray]:
        return self.bins.decode(indices, self.config.action_horizon, self.config.action_dim)

    def scored_reply_tokens(self, indices: list[list[int]], valid: np.ndarray) -> list[list[bool]]:
        return valid.reshape(len(indices), -1).tolist()  # one token per value, in the order encode_actions writes

    def generation_limits(self) -> tuple[int, int]:
        length = self.config.action_horizon * self.config.action_dim
        return length, length


__all__ = ["VLABinsForActionPrediction"]


if __name__ == "__main__":
    from ...testing import smoke_run

    smoke_run("bins")
