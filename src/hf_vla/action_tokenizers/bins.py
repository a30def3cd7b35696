"""Uniform bins over [-1, 1]: OpenVLA's discretisation of normalised actions (and, as LLaVA-VLA, of the state)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


class UniformBins:
    """OpenVLA's `ActionTokenizer` grid: `num_bins` tokens from `num_bins` uniform edges on [low, high].

    A value is clipped to [low, high] and its token is its `np.digitize` bin among the edges, minus one: the
    `num_bins - 1` intervals give tokens 0 … num_bins − 2 (a value on an edge belongs to the interval above it), and
    `high` itself the last token. A token decodes to its interval's centre, the last one to the last centre. With
    OpenVLA's 256 the bins, the centres and which token each value gets equal OpenVLA's (its token ids count down from
    the end of the vocabulary, hf_vla's `<robot_action_k>` up from an offset).
    """

    def __init__(self, num_bins: int = 256, low: float = -1.0, high: float = 1.0):
        if num_bins < 2:
            raise ValueError(f"num_bins: expected ≥ 2 (edges of at least one interval), got {num_bins}")
        self.num_bins, self.low, self.high = int(num_bins), float(low), float(high)
        self.edges = np.linspace(self.low, self.high, self.num_bins)
        self.bin_centres = ((self.edges[:-1] + self.edges[1:]) / 2).astype(np.float32)

    def encode(self, values: np.ndarray) -> np.ndarray:
        """Token index (0 … num_bins − 1) of every value; values outside [low, high] go to the end tokens."""
        values = np.asarray(values, dtype=np.float64)
        if not np.isfinite(values).all():
            raise ValueError("actions: contain NaN or inf; bins encode finite, normalised values")
        return (np.digitize(np.clip(values, self.low, self.high), self.edges) - 1).astype(np.int64)

    def centres(self, index: np.ndarray) -> np.ndarray:
        return self.bin_centres[np.clip(np.asarray(index), 0, self.num_bins - 2)]

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


if __name__ == "__main__":
    bins = UniformBins(256)
    values = np.array([-1.0, -0.5, 0.0, 0.999, 1.0])
    tokens = bins.encode(values)
    print("tokens", tokens.tolist(), "decoded", bins.centres(tokens).round(4).tolist())
