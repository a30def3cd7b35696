"""Uniform bins over [-1, 1]: the OpenVLA-style discretisation of normalised actions (and of the state)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


class UniformBins:
    def __init__(self, num_bins: int = 256, low: float = -1.0, high: float = 1.0):
        self.num_bins, self.low, self.high = int(num_bins), float(low), float(high)
        self.width = (self.high - self.low) / self.num_bins

    def encode(self, values: np.ndarray) -> np.ndarray:
        """Bin index of every value (values outside [low, high] go to the end bins)."""
        values = np.asarray(values, dtype=np.float64)
        if not np.isfinite(values).all():
            raise ValueError("actions: contain NaN or inf; bins encode finite, normalised values")
        index = np.floor((values - self.low) / self.width)
        return np.clip(index, 0, self.num_bins - 1).astype(np.int64)

    def centres(self, index: np.ndarray) -> np.ndarray:
        return (self.low + (np.asarray(index) + 0.5) * self.width).astype(np.float32)

    def decode(self, indices: Sequence[Sequence[int]], horizon: int, dim: int) -> tuple[np.ndarray, np.ndarray]:
        """`[N, horizon, dim]` bin centres and the `[N]` mask of sequences of exactly horizon·dim in-range indices;
        other rows are NaN."""
        actions = np.full((len(indices), horizon, dim), np.nan, dtype=np.float32)
        valid = np.zeros(len(indices), dtype=np.bool_)
        for row, sequence in enumerate(indices):
            sequence = np.asarray(sequence)
            if sequence.shape == (horizon * dim,) and ((sequence >= 0) & (sequence < self.num_bins)).all():
                actions[row] = self.centres(sequence).reshape(horizon, dim)
                valid[row] = True
        return actions, valid
