import numpy as np
import pytest
import torch

from hf_vla.normalization import (
    absolute_actions, apply_action_mode, compute_stats, describe_action_mode, finite_float32, normalize, numeric_array,
    unnormalize, validate_feature_stats
)


@pytest.fixture
def data():
    rng = np.random.default_rng(0)
    x = rng.normal(loc=[0.0, 5.0, -2.0, 0.0, 3.0], scale=[1.0, 0.1, 3.0, 1.0, 1.0], size=(2000, 5)).astype(np.float32)
    x[:, 3] = rng.integers(0, 2, 2000)  # gripper
    x[:, 4] = 3.0  # constant dimension
    return x


def test_stats_match_numpy(data):
    stats = compute_stats(data, "mean_std")
    np.testing.assert_allclose(stats["mean"], data.mean(0), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(stats["std"], data.std(0), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(stats["q01"], np.quantile(data, 0.01, axis=0), rtol=1e-5)
    np.testing.assert_allclose(stats["q99"], np.quantile(data, 0.99, axis=0), rtol=1e-5)
    assert stats["min"] == data.min(0).tolist() and stats["max"] == data.max(0).tolist()
    assert stats["mode"] == ["mean_std"] * 5


def test_each_mode(data):
    stats = compute_stats(data, ["q99", "min_max", "mean_std", "binary", "identity"])
    y = normalize(data, stats)
    q01, q99 = np.quantile(data[:, 0], [0.01, 0.99])
    np.testing.assert_allclose(y[:, 0], np.clip(2 * (data[:, 0] - q01) / (q99 - q01) - 1, -1, 1), rtol=1e-5, atol=1e-5)
    assert y[:, 0].min() == -1.0 and y[:, 0].max() == 1.0  # clamped outside [q01, q99]
    assert y[:, 1].min() == pytest.approx(-1.0) and y[:, 1].max() == pytest.approx(1.0)
    np.testing.assert_allclose(y[:, 2], (data[:, 2] - data[:, 2].mean()) / data[:, 2].std(), rtol=1e-4, atol=1e-4)
    np.testing.assert_array_equal(y[:, 3], data[:, 3])
    np.testing.assert_array_equal(y[:, 4], data[:, 4])

    back = unnormalize(y, stats)
    inside = (data[:, 0] >= q01) & (data[:, 0] <= q99)
    np.testing.assert_allclose(back[inside, 0], data[inside, 0], rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(back[:, 1:], data[:, 1:], rtol=1e-4, atol=1e-4)


def test_constant_dimension_normalises_to_zero_and_decodes_to_its_value(data):
    for mode in ("q99", "min_max", "mean_std"):
        stats = compute_stats(data, mode)
        y = normalize(data, stats)
        assert np.all(y[:, 4] == 0.0)
        np.testing.assert_allclose(unnormalize(y, stats)[:, 4], 3.0)


def test_binary_uses_the_midpoint_and_decodes_to_the_extremes():
    x = np.array([[-1.0], [1.0], [0.2], [-0.3]], np.float32)
    stats = compute_stats(x, "binary")
    np.testing.assert_array_equal(normalize(x, stats)[:, 0], [0, 1, 1, 0])
    # strictly above the midpoint, as documented: a value on it is the low one
    np.testing.assert_array_equal(normalize(np.array([[0.0], [1e-6]], np.float32), stats)[:, 0], [0, 1])
    np.testing.assert_array_equal(unnormalize(np.array([[0.2], [0.7]]), stats)[:, 0], [-1.0, 1.0])
    # decoding is strict too: a prediction of exactly 0.5 is the low value, so normalise → decode is the identity
    np.testing.assert_array_equal(unnormalize(np.array([[0.5], [0.5001]]), stats)[:, 0], [-1.0, 1.0])
    # an undecodable token row is NaN in every dimension: the gripper must not come back as a finite command
    both = {**compute_stats(np.array([[0.0, -1.0], [2.0, 1.0]]), "q99"), "mode": ["q99", "binary"]}
    np.testing.assert_array_equal(unnormalize(np.array([[np.nan, np.nan], [0.0, 0.9]]), both),
                                  np.array([[np.nan, np.nan], [1.0, 1.0]], np.float32))  # fmt: skip


def test_bad_inputs():
    with pytest.raises(ValueError, match="contain NaN"):
        compute_stats(np.array([[np.nan, 1.0]]))
    with pytest.raises(ValueError, match=r"expected 2 per-dimension modes, got 1"):
        compute_stats(np.zeros((3, 2)), ["q99"])
    with pytest.raises(ValueError, match=r"expected a non-empty \[N, D\] array, got shape \(0, 2\)"):
        compute_stats(np.zeros((0, 2)))

    good = compute_stats(np.random.default_rng(0).normal(size=(10, 3)))
    assert validate_feature_stats(good, "s") == 3
    for name, value, message in [("q99", [1.0, None, 2.0], r"s\.q99: not finite at dimension\(s\) \[1\]"),
                                 ("std", [1.0, 1.0, float("nan")], r"s\.std: not finite at dimension\(s\) \[2\]"),
                                 ("mean", ["a", 0.0, 0.0], r"s\.mean: expected a list of numbers, got \['a'"),
                                 ("min", 0.0, r"s\.min: expected a list of numbers, got shape \[\]"),
                                 ("mode", "q99", r"s\.mode: expected one mode per dimension, got the string 'q99'")]:
        with pytest.raises(ValueError, match=message):
            validate_feature_stats({**good, name: value}, "s")


def test_numeric_array_refuses_what_numpy_would_take_silently():
    for value, message in (([1.0, True], "expected numbers, got booleans among them"),
                           ([[0.5], [np.bool_(False)]], "expected numbers, got booleans among them"),
                           ([[0.0] * 3, [0.0] * 2], "expected a numeric array, got ragged nested sequences"),
                           (["1.0", "2.0"], "expected a numeric array, got dtype <U3"),
                           ([0.0, None], "expected a numeric array, got dtype object"),
                           (np.ones(3, bool), "expected a numeric array, got dtype bool")):  # fmt: skip
        with pytest.raises(ValueError, match=rf"^state: {message}"):
            numeric_array(value, "state")
    assert numeric_array(np.ones(3, bool), "action_mask", kinds="fiub").dtype == bool
    assert numeric_array([[1, 2], [3, 4]], "state").tolist() == [[1, 2], [3, 4]]
    # tensors come over to numpy, bfloat16 as float32 (numpy has no bfloat16)
    converted = numeric_array(torch.tensor([0.5, -1.25], dtype=torch.bfloat16), "state")
    assert converted.dtype == np.float32 and converted.tolist() == [0.5, -1.25]
    assert numeric_array(torch.tensor([1e39], dtype=torch.float64), "state").dtype == np.float64  # kept, not inf


def test_finite_float32_refuses_non_finite_and_out_of_range_values():
    with pytest.raises(ValueError, match=r"^actions: contains NaN or inf"):
        finite_float32(np.array([0.0, np.inf]), "actions")
    with pytest.raises(ValueError, match=r"^actions: values beyond float32's range \(largest magnitude 1e\+300\)"):
        finite_float32(np.array([1e300]), "actions")
    assert finite_float32(np.array([1, 2], np.int64), "actions").dtype == np.float32


def test_action_modes_per_dimension_round_trip_in_float32():
    rng = np.random.default_rng(0)
    actions, state = rng.normal(size=(5, 3, 4)), rng.normal(size=(5, 4))  # float64 in
    modes = ["rel", "delta", "abs", "delta"]
    relative = apply_action_mode(actions, state, modes)
    np.testing.assert_allclose(relative[..., 0], actions[..., 0] - state[:, None, 0], rtol=1e-6)
    np.testing.assert_allclose(relative[..., 1], np.diff(actions[..., 1], axis=1, prepend=state[:, None, 1]), rtol=1e-6)
    np.testing.assert_array_equal(relative[..., 2], actions[..., 2])
    back = absolute_actions(relative, state, modes)
    assert back.dtype == np.float32 and absolute_actions(actions, state, "abs").dtype == np.float32
    np.testing.assert_allclose(back, actions, rtol=1e-5, atol=1e-5)
    assert describe_action_mode(modes) == "'rel' on dimensions [0], 'delta' on dimensions [1, 3]"
    assert describe_action_mode("delta") == "'delta'"


def test_relative_dimensions_need_their_state_values_and_a_narrower_state_serves_absolute_ones():
    from hf_vla.normalization import compact_action_mode, expand_action_modes, relative_state_width

    assert relative_state_width(["abs", "rel", "abs", "abs"], 4) == 2  # up to the last relative dimension
    assert relative_state_width("delta", 3) == 3 and relative_state_width("abs", 3) == 0
    assert expand_action_modes("rel", 2) == ["rel", "rel"] and compact_action_mode(["rel", "rel"]) == "rel"
    assert compact_action_mode(["rel", "abs"]) == ["rel", "abs"]
    rng = np.random.default_rng(1)
    actions = rng.normal(size=(2, 3, 4)).astype(np.float32)
    modes = ["rel", "abs", "delta", "abs"]
    for convert in (apply_action_mode, absolute_actions):
        with pytest.raises(ValueError, match=r"state: 'rel' on dimensions \[0\], 'delta' on dimensions \[2\] actions "
                                             r"need state values for action dimensions 0\.\.2, got 2"):
            convert(actions, rng.normal(size=(2, 2)), modes)
    state = rng.normal(size=(2, 3)).astype(np.float32)  # covers dimensions 0..2; dimension 3 is absolute
    relative = apply_action_mode(actions, state, modes)
    expected = actions.copy()
    expected[..., 0] -= state[:, None, 0]
    expected[..., 2] = np.diff(actions[..., 2], axis=1, prepend=state[:, None, 2])
    np.testing.assert_allclose(relative, expected, rtol=1e-6)
    np.testing.assert_allclose(absolute_actions(relative, state, modes), actions, rtol=1e-5, atol=1e-6)
