"""Per-embodiment normalisation statistics and the per-dimension modes that use them.

Statistics are plain JSON-able dicts so that they live in `processor_config.json` beside the weights:

    {"bridge": {"action": {"mean": [..D], "std": [..D], "min": [..D], "max": [..D], "q01": [..D], "q99": [..D],
                           "mode": ["q99", ..., "binary"]},
                "state":  {...same keys...},
                "num_transitions": 1234, "num_trajectories": 56}}

Modes, per dimension (x is raw, y is normalised):
    q99       y = clip(2 (x - q01) / (q99 - q01) - 1, -1, 1)
    min_max   y = 2 (x - min) / (max - min) - 1
    mean_std  y = (x - mean) / std
    binary    y = 1 if x > (min + max) / 2 else 0; decodes to max / min (thresholded at 0.5)
    identity  y = x
A dimension whose range is zero (q99 == q01, max == min, std == 0) normalises to 0 and decodes to its constant value,
so nothing is divided by zero and constant dimensions survive the round trip.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

NORM_MODES = ("q99", "min_max", "mean_std", "binary", "identity")
STAT_NAMES = ("mean", "std", "min", "max", "q01", "q99")


def compute_stats(values: np.ndarray | Sequence, mode: str | Sequence[str] = "q99") -> dict:
    """Statistics of a `[N, D]` array (rows are samples) in the processor's format, with a per-dimension mode."""
    x = np.asarray(values, dtype=np.float64)
    if x.ndim == 1:
        x = x[:, None]
    if x.ndim != 2 or x.shape[0] == 0:
        raise ValueError(f"compute_stats: expected a non-empty [N, D] array, got shape {tuple(x.shape)}")
    if not np.isfinite(x).all():
        raise ValueError("compute_stats: values contain NaN or inf")
    dim = x.shape[1]
    stats = {
        "mean": x.mean(0),
        "std": x.std(0),
        "min": x.min(0),
        "max": x.max(0),
        "q01": np.quantile(x, 0.01, axis=0),
        "q99": np.quantile(x, 0.99, axis=0),
    }
    stats = {k: v.astype(np.float32).tolist() for k, v in stats.items()}
    stats["mode"] = expand_modes(mode, dim, "mode")
    return stats


def expand_modes(mode: str | Sequence[str], dim: int, field: str) -> list[str]:
    """One mode for every dimension, or a checked per-dimension list."""
    modes = [mode] * dim if isinstance(mode, str) else list(mode)
    if len(modes) != dim:
        raise ValueError(f"{field}: expected {dim} per-dimension modes, got {len(modes)}")
    unknown = sorted(set(modes) - set(NORM_MODES))
    if unknown:
        raise ValueError(f"{field}: unknown normalisation mode(s) {unknown}; expected one of {list(NORM_MODES)}")
    return modes


def validate_feature_stats(stats: Mapping, field: str) -> int:
    """Checks one feature's statistics (all six arrays of one length D plus D modes); returns D."""
    missing = [k for k in (*STAT_NAMES, "mode") if k not in stats]
    if missing:
        raise ValueError(f"{field}: missing statistics {missing}")
    lengths = {k: len(stats[k]) for k in (*STAT_NAMES, "mode")}
    if len(set(lengths.values())) != 1:
        raise ValueError(f"{field}: statistics have different lengths {lengths}")
    dim = lengths["mode"]
    expand_modes(stats["mode"], dim, f"{field}.mode")
    return dim


def _stat_arrays(stats: Mapping) -> dict[str, np.ndarray]:
    arrays = {k: np.asarray(stats[k], dtype=np.float32) for k in STAT_NAMES}
    arrays["mode"] = np.asarray(stats["mode"])
    return arrays


def normalize(x: np.ndarray, stats: Mapping) -> np.ndarray:
    """Raw → normalised, along the last axis."""
    s = _stat_arrays(stats)
    x = np.asarray(x, dtype=np.float32)
    mode = s["mode"]
    out = x.copy()

    def scaled(low, high):
        span = high - low
        safe = np.where(span > 0, span, 1.0)
        return np.where(span > 0, 2.0 * (x - low) / safe - 1.0, 0.0)

    out = np.where(mode == "q99", np.clip(scaled(s["q01"], s["q99"]), -1.0, 1.0), out)
    out = np.where(mode == "min_max", scaled(s["min"], s["max"]), out)
    std_safe = np.where(s["std"] > 0, s["std"], 1.0)
    out = np.where(mode == "mean_std", np.where(s["std"] > 0, (x - s["mean"]) / std_safe, 0.0), out)
    out = np.where(mode == "binary", (x > 0.5 * (s["min"] + s["max"])).astype(np.float32), out)
    return out.astype(np.float32)


def unnormalize(y: np.ndarray, stats: Mapping) -> np.ndarray:
    """Normalised → raw, along the last axis (the inverse of `normalize` inside the clipping range)."""
    s = _stat_arrays(stats)
    y = np.asarray(y, dtype=np.float32)
    mode = s["mode"]
    out = y.copy()
    out = np.where(mode == "q99", 0.5 * (y + 1.0) * (s["q99"] - s["q01"]) + s["q01"], out)
    out = np.where(mode == "min_max", 0.5 * (y + 1.0) * (s["max"] - s["min"]) + s["min"], out)
    out = np.where(mode == "mean_std", y * s["std"] + s["mean"], out)
    out = np.where(mode == "binary", np.where(y > 0.5, s["max"], s["min"]), out)
    return out.astype(np.float32)


if __name__ == "__main__":
    rng = np.random.default_rng(0)
    data = rng.normal(size=(1000, 3)).astype(np.float32)
    data[:, 2] = rng.integers(0, 2, size=1000)
    st = compute_stats(data, ["q99", "mean_std", "binary"])
    y = normalize(data, st)
    print("normalised range per dim:", y.min(0), y.max(0))
    print("max round-trip error (mean_std dim):", np.abs(unnormalize(y, st)[:, 1] - data[:, 1]).max())
