"""Per-embodiment normalisation statistics and the per-dimension modes that use them.

Statistics are plain JSON-able dicts so that they live in `processor_config.json` beside the weights:

    {"bridge": {"action": {"mean": [..D], "std": [..D], "min": [..D], "max": [..D], "q01": [..D], "q99": [..D],
                           "mode": ["q99", ..., "binary"]},
                "state":  {...same keys...},
                "action_mode": "abs",   # or "delta" / "rel", or one per action dimension (see ACTION_MODES)
                "num_transitions": 1234, "num_trajectories": 56}}

Modes, per dimension (x is raw, y is normalised):
    q99       y = clip(2 (x - q01) / (q99 - q01) - 1, -1, 1)
    min_max   y = 2 (x - min) / (max - min) - 1
    mean_std  y = (x - mean) / std
    binary    y = 1 if x > (min + max) / 2 else 0; decodes to max if y > 0.5 else min
    identity  y = x
A dimension whose range is zero (q99 == q01, max == min, std == 0) normalises to 0 and decodes to its constant value,
so nothing is divided by zero and constant dimensions survive the round trip.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import torch

NORM_MODES = ("q99", "min_max", "mean_std", "binary", "identity")
STAT_NAMES = ("mean", "std", "min", "max", "q01", "q99")
# How a chunk's actions relate to the state at its first frame: "abs" as recorded, "rel" a_t - s_0, "delta" a_0 - s_0
# then a_t - a_{t-1}. Statistics record the mode of the actions they describe; decoding with the state inverts it.
ACTION_MODES = ("abs", "delta", "rel")


def holds_bool(values: list | tuple) -> bool:
    """Whether nested lists hold a boolean, which numpy would silently read as 0 / 1 beside numbers."""
    return any(holds_bool(v) if isinstance(v, (list, tuple)) else isinstance(v, (bool, np.bool_)) for v in values)


def numeric_array(value, field: str, kinds: str = "fiu") -> np.ndarray:
    """`value` (an array, nested lists or a tensor) as a numpy array, refusing what numpy would accept without a word:
    booleans among numbers (read as 0 / 1), strings and objects (any dtype kind outside `kinds`: floating, signed,
    unsigned; add "b" to take booleans), ragged nested lists. Tensors come over at their dtype, bfloat16 as float32
    (numpy has none). The one check behind every raw state, action and mask the processor, the policy and the server
    take."""
    if isinstance(value, torch.Tensor):
        value = value.detach().to("cpu", torch.float32 if value.dtype == torch.bfloat16 else value.dtype)
    if "b" not in kinds and isinstance(value, (list, tuple)) and holds_bool(value):
        raise ValueError(f"{field}: expected numbers, got booleans among them")
    try:
        array = np.asarray(value)  # no dtype: strings must not pass as numbers
    except ValueError:
        raise ValueError(f"{field}: expected a numeric array, got ragged nested sequences") from None
    if array.dtype.kind not in kinds:
        raise ValueError(f"{field}: expected a numeric array, got dtype {array.dtype}")
    return array


def python_strings(value):
    """Numpy strings (`np.asarray(prompt)`: 0-d, or one per sample) as `str` / a list of `str`, as openpi's server
    reads them; any other value as it is."""
    if isinstance(value, np.ndarray) and value.dtype.kind == "U" and value.ndim <= 1:
        return value.tolist()
    return value


def finite_float32(array: np.ndarray, field: str) -> np.ndarray:
    """float32 copy of an array, refusing NaN / inf and values beyond float32's range (the cast would make them inf)."""
    if not np.isfinite(array).all():
        raise ValueError(f"{field}: contains NaN or inf")
    with np.errstate(over="ignore"):
        converted = array.astype(np.float32)
    if array.dtype.kind == "f" and array.dtype.itemsize > 4 and not np.isfinite(converted).all():
        raise ValueError(f"{field}: values beyond float32's range (largest magnitude {np.abs(array).max():.3g})")
    return converted


def compute_stats(values: np.ndarray | Sequence, mode: str | Sequence[str] = "q99", field: str = "mode") -> dict:
    """Statistics of a `[N, D]` array (rows are samples) in the processor's format, with a per-dimension mode
    (`field` names `mode` in errors)."""
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
    stats["mode"] = expand_modes(mode, dim, field)
    return stats


def expand_modes(mode: str | Sequence[str], dim: int, field: str) -> list[str]:
    """One mode for every dimension, or a checked per-dimension list."""
    modes = [mode] * dim if isinstance(mode, str) else list(mode)
    if len(modes) != dim:
        raise ValueError(f"{field}: expected {dim} per-dimension modes, got {len(modes)}")
    unknown = sorted(set(modes) - set(NORM_MODES))
    if unknown:
        hint = ""
        if set(unknown) <= set(ACTION_MODES):  # e.g. compute_stats(action_mode="rel"): the other meaning of the name
            hint = (f" ({unknown} are action modes, how actions relate to the state: load the data with "
                    "load_lerobot(..., action_mode=...), whose compute_stats records it, or set the statistics' "
                    "'action_mode' key)")
        raise ValueError(f"{field}: unknown normalisation mode(s) {unknown}; expected one of {list(NORM_MODES)}{hint}")
    return modes


def validate_feature_stats(stats: Mapping, field: str) -> int:
    """Checks one feature's statistics (all six arrays of one length D plus D modes); returns D."""
    missing = [k for k in (*STAT_NAMES, "mode") if k not in stats]
    if missing:
        raise ValueError(f"{field}: missing statistics {missing}")
    for name in STAT_NAMES:  # a null or NaN here would turn every normalised value, and every decoded action, to NaN
        try:
            values = np.asarray(stats[name], dtype=np.float64)
        except (TypeError, ValueError):
            raise ValueError(f"{field}.{name}: expected a list of numbers, got {stats[name]!r:.80}") from None
        if values.ndim != 1:
            raise ValueError(f"{field}.{name}: expected a list of numbers, got shape {list(values.shape)}")
        if not np.isfinite(values).all():
            bad = np.flatnonzero(~np.isfinite(values)).tolist()
            raise ValueError(f"{field}.{name}: not finite at dimension(s) {bad}")
        finite_float32(values, f"{field}.{name}")  # statistics are applied in float32
        if any(isinstance(value, (bool, np.bool_)) for value in np.ravel(np.asarray(stats[name], dtype=object))):
            raise ValueError(f"{field}.{name}: expected numbers, got booleans among them")
    if isinstance(stats["mode"], str):
        raise ValueError(f"{field}.mode: expected one mode per dimension, got the string {stats['mode']!r}")
    lengths = {k: len(stats[k]) for k in (*STAT_NAMES, "mode")}
    if len(set(lengths.values())) != 1:
        raise ValueError(f"{field}: statistics have different lengths {lengths}")
    dim = lengths["mode"]
    expand_modes(stats["mode"], dim, f"{field}.mode")
    own = stats.get("embodiment_dim", dim)
    if isinstance(own, bool) or not isinstance(own, int) or not 0 <= own <= dim:
        raise ValueError(f"{field}.embodiment_dim: expected an integer in [0, {dim}] (the embodiment's own dimensions, "
                         f"the rest padding), got {own!r}")
    values = {name: np.asarray(stats[name], dtype=np.float64) for name in STAT_NAMES}
    for bad, message in ((values["std"] < 0, "std: negative"), (values["min"] > values["max"], "min: above max"),
                         (values["q01"] > values["q99"], "q01: above q99")):  # fmt: skip
        if bad.any():  # a reversed range would normalise to 0 and decode through a negative scale
            raise ValueError(f"{field}.{message} at dimension(s) {np.flatnonzero(bad).tolist()}")
    return dim


def expand_action_modes(mode, action_dim: int, field: str = "action_mode") -> list[str]:
    """One action mode per dimension, from one mode or a checked per-dimension list. openpi's delta actions (each
    step minus the chunk's first state, hf_vla's "rel") leave the gripper absolute: `["rel"] * 6 + ["abs"]`."""
    modes = [mode] * action_dim if isinstance(mode, str) else mode
    if not isinstance(modes, (list, tuple)) or not all(isinstance(m, str) for m in modes):
        raise ValueError(f"{field}: expected one of {list(ACTION_MODES)} or one per action dimension, got "
                         f"{mode!r:.80}")
    if len(modes) != action_dim:
        raise ValueError(f"{field}: expected {action_dim} per-dimension modes, got {len(modes)}")
    unknown = sorted(set(modes) - set(ACTION_MODES))
    if unknown:
        raise ValueError(f"{field}: unknown action mode(s) {unknown}; expected {list(ACTION_MODES)}")
    return list(modes)


def compact_action_mode(modes: Sequence[str]) -> str | list[str]:
    """How statistics record the modes: one string when every dimension shares it, else the per-dimension list."""
    return modes[0] if len(set(modes)) == 1 else list(modes)


def is_relative(mode: str | Sequence[str]) -> bool:
    """Whether an action mode (one, or one per dimension) needs the state to give absolute actions back."""
    return any(m != "abs" for m in ([mode] if isinstance(mode, str) else mode))


def relative_state_width(mode: str | Sequence[str], action_dim: int) -> int:
    """How many state values an action mode reads: action dimension i is relative to state dimension i, so up to the
    last relative dimension (0 when none is)."""
    modes = expand_action_modes(mode, action_dim)
    return max((i + 1 for i, m in enumerate(modes) if m != "abs"), default=0)


def _state_per_action_dimension(state, modes: list[str]) -> np.ndarray:
    """The state [..., S] as [..., 1, D]: value i for action dimension i (zeros past S, where only absolute dimensions
    can be)."""
    state = np.asarray(state, dtype=np.float32)
    needed = relative_state_width(modes, len(modes))
    if state.shape[-1] < needed:
        raise ValueError(f"state: {describe_action_mode(compact_action_mode(modes))} actions need state values for "
                         f"action dimensions 0..{needed - 1}, got {state.shape[-1]}")
    width = len(modes)
    state = state[..., :width]
    if state.shape[-1] < width:
        state = np.concatenate([state, np.zeros((*state.shape[:-1], width - state.shape[-1]), np.float32)], axis=-1)
    return state[..., None, :]


def describe_action_mode(mode: str | Sequence[str]) -> str:
    """`'delta'`, or `'delta' on dimensions [0, 1, 2]` for a per-dimension list (its absolute dimensions left out)."""
    if isinstance(mode, str):
        return repr(mode)
    kinds = [m for m in dict.fromkeys(mode) if m != "abs"]  # in order of their first dimension
    return ", ".join(f"{k!r} on dimensions {[i for i, m in enumerate(mode) if m == k]}" for k in kinds) or "'abs'"


def apply_action_mode(actions: np.ndarray, state: np.ndarray, mode: str | Sequence[str]) -> np.ndarray:
    """Absolute actions [..., T, D] and the state [..., S] → actions in `mode` (see ACTION_MODES; one mode, or one
    per dimension). Action dimension i is relative to state dimension i."""
    actions = np.asarray(actions)
    modes = expand_action_modes(mode, actions.shape[-1])
    if not is_relative(modes):
        return actions
    state = _state_per_action_dimension(state, modes)
    modes = np.asarray(modes)
    relative = {"rel": actions - state, "delta": np.diff(actions, axis=-2, prepend=state)}
    return np.select([modes == k for k in relative], list(relative.values()), actions)


def absolute_actions(actions: np.ndarray, state: np.ndarray, mode: str | Sequence[str]) -> np.ndarray:
    """The inverse of `apply_action_mode`: actions [..., T, D] in `mode` and the state [..., D] → absolute actions
    (float32)."""
    modes = expand_action_modes(mode, actions.shape[-1])
    actions = np.asarray(actions, dtype=np.float32)
    if not is_relative(modes):
        return actions
    state = _state_per_action_dimension(state, modes)
    modes = np.asarray(modes)
    absolute = {"rel": actions + state, "delta": state + np.cumsum(actions, axis=-2, dtype=np.float32)}
    return np.select([modes == k for k in absolute], list(absolute.values()), actions)


class FeatureNormalizer:
    """One feature's statistics turned into per-dimension arrays once, so that a control loop pays a handful of numpy
    operations per call rather than re-reading the JSON lists. q99, min_max, mean_std and identity are all affine,
    y = (x - center) * inverse_half_range, with q99 clipped; binary dimensions are thresholded."""

    def __init__(self, stats: Mapping):
        s = {k: np.asarray(stats[k], dtype=np.float64) for k in STAT_NAMES}
        mode = np.asarray(stats["mode"])
        low = np.select([mode == "q99", mode == "min_max"], [s["q01"], s["min"]], 0.0)
        high = np.select([mode == "q99", mode == "min_max"], [s["q99"], s["max"]], 0.0)
        center = np.select([mode == "mean_std", mode == "identity"], [s["mean"], 0.0], 0.5 * (low + high))
        half_range = np.select([mode == "mean_std", mode == "identity"], [s["std"], 1.0], 0.5 * (high - low))
        half_range = np.where(mode == "binary", 0.0, half_range)
        self.center = center.astype(np.float32)
        self.half_range = half_range.astype(np.float32)
        # a zero range normalises to 0 and decodes to the center (the constant value), never a division by zero
        self.inverse_half_range = np.divide(1.0, half_range, out=np.zeros_like(half_range), where=half_range > 0)
        self.inverse_half_range = self.inverse_half_range.astype(np.float32)
        self.clipped = mode == "q99"
        self.binary = mode == "binary"
        self.threshold = (0.5 * (s["min"] + s["max"])).astype(np.float32)
        self.binary_low, self.binary_high = s["min"].astype(np.float32), s["max"].astype(np.float32)
        self.any_clipped, self.any_binary = bool(self.clipped.any()), bool(self.binary.any())
        self.all_clipped = bool(self.clipped.all())

    def normalize(self, x: np.ndarray) -> np.ndarray:
        x = np.asarray(x, dtype=np.float32)
        y = (x - self.center) * self.inverse_half_range
        if self.all_clipped:
            y = np.clip(y, -1.0, 1.0, out=y)
        elif self.any_clipped:
            y = np.where(self.clipped, np.clip(y, -1.0, 1.0), y)
        if self.any_binary:
            y = np.where(self.binary, (x > self.threshold).astype(np.float32), y)
        return y

    def unnormalize(self, y: np.ndarray) -> np.ndarray:
        y = np.asarray(y, dtype=np.float32)
        x = y * self.half_range + self.center
        if self.any_binary:  # a NaN (an undecodable token row) stays NaN rather than becoming the low value
            thresholded = np.where(y > 0.5, self.binary_high, self.binary_low)
            x = np.where(self.binary, np.where(np.isnan(y), np.nan, thresholded), x)
        return x


def normalize(x: np.ndarray, stats: Mapping) -> np.ndarray:
    """Raw → normalised, along the last axis."""
    return FeatureNormalizer(stats).normalize(x)


def unnormalize(y: np.ndarray, stats: Mapping) -> np.ndarray:
    """Normalised → raw, along the last axis (the inverse of `normalize` inside the clipping range)."""
    return FeatureNormalizer(stats).unnormalize(y)


if __name__ == "__main__":
    rng = np.random.default_rng(0)
    data = rng.normal(size=(1000, 3)).astype(np.float32)
    data[:, 2] = rng.integers(0, 2, size=1000)
    st = compute_stats(data, ["q99", "mean_std", "binary"])
    y = normalize(data, st)
    print("normalised range per dim:", y.min(0), y.max(0))
    print("max round-trip error (mean_std dim):", np.abs(unnormalize(y, st)[:, 1] - data[:, 1]).max())
