"""FASTTokenizer: DCT + BPE round trip, compression, the published save format, and failure handling."""

import json
import logging

import numpy as np
import pytest
from scipy.fft import dct
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

from hf_vla.action_tokenizers import FASTTokenizer

T, D, SCALE = 10, 7, 10.0
# Rounding moves each DCT coefficient by <= 0.5 / scale; the orthonormal IDCT keeps L2 norms, so per dimension the
# L2 error over T steps is <= sqrt(T) * 0.5 / scale. The slack covers the float32 output.
BOUND = np.sqrt(T) * 0.5 / SCALE + 1e-5


def smooth_chunks(n, seed=0, t=T, d=D):
    rng = np.random.default_rng(seed)
    time = np.linspace(0.0, 1.0, t)[None, :, None]
    waves = [rng.uniform(0, 0.4, (n, 1, d)) * np.sin(2 * np.pi * (k * time + rng.uniform(0, 1, (n, 1, d))))
             for k in (0.5, 1.0, 1.5)]
    return sum(waves).astype(np.float32)


def noise_chunks(n, seed=1):
    return np.random.default_rng(seed).uniform(-1, 1, (n, T, D)).astype(np.float32)


def coefficient_strings(chunks, scale, min_token):
    """The published recipe, written out independently of the module under test."""
    q = np.around(dct(chunks, axis=1, norm="ortho") * scale).astype(int)
    return ["".join(chr(v - min_token) for v in chunk.flatten()) for chunk in q]


def per_dim_error(decoded, chunks):
    return np.linalg.norm(decoded.astype(np.float64) - chunks, axis=1)


@pytest.fixture(scope="module")
def smooth():
    return smooth_chunks(300)


@pytest.fixture(scope="module")
def tokenizer(smooth):
    return FASTTokenizer.fit(smooth, scale=SCALE, vocab_size=512)


@pytest.mark.parametrize("make", [smooth_chunks, noise_chunks], ids=["smooth", "noise"])
def test_round_trip_within_quantisation_bound(make):
    chunks = make(200)
    tokenizer = FASTTokenizer.fit(chunks, scale=SCALE, vocab_size=1024)
    assert (tokenizer.time_horizon, tokenizer.action_dim, tokenizer.scale) == (T, D, SCALE)
    decoded, valid = tokenizer.decode(tokenizer(chunks), return_valid=True)
    assert decoded.dtype == np.float32 and decoded.shape == chunks.shape and valid.all()
    assert per_dim_error(decoded, chunks).max() <= BOUND


def test_compresses_smooth_chunks(tokenizer, smooth):
    lengths = [len(ids) for ids in tokenizer(smooth)]
    assert np.mean(lengths) < 0.5 * T * D
    assert all(0 <= i < tokenizer.vocab_size for ids in tokenizer(smooth) for i in ids)


def test_single_chunk_and_torch_input(tokenizer, smooth):
    torch = pytest.importorskip("torch")
    batch = tokenizer(smooth[:3])
    assert tokenizer(smooth[0]) == batch[:1]
    assert tokenizer(torch.from_numpy(smooth[:3])) == batch
    assert tokenizer.decode(batch[0]).shape == (1, T, D)  # a flat id list is one sequence
    # keywords override the configured shape (T * D = 70 coefficients read as 14 steps of 5)
    decoded = tokenizer.decode(batch, time_horizon=14, action_dim=5)
    assert decoded.shape == (3, 14, 5) and np.isfinite(decoded).all()


def test_ids_match_raw_bpe(tokenizer, smooth):
    strings = coefficient_strings(smooth[:50], SCALE, tokenizer.min_token)
    assert tokenizer(smooth[:50]) == [tokenizer.bpe.encode(s).ids for s in strings]


def test_save_load_round_trip(tokenizer, smooth, tmp_path):
    tokenizer.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "processor_config.json").read_text())
    assert {"scale", "vocab_size", "min_token", "time_horizon", "action_dim", "processor_class"} <= set(config)
    loaded = FASTTokenizer.from_pretrained(tmp_path)
    ids = tokenizer(smooth)
    assert loaded(smooth) == ids
    np.testing.assert_array_equal(loaded.decode(ids), tokenizer.decode(ids))
    raw = Tokenizer.from_file(str(tmp_path / "tokenizer.json"))
    assert [raw.encode(s).ids for s in coefficient_strings(smooth, SCALE, loaded.min_token)] == ids


def test_transformers_reads_saved_files(tokenizer, smooth, tmp_path):
    """The reference processor wraps tokenizer.json in PreTrainedTokenizerFast; it must see the same ids and text."""
    transformers = pytest.importorskip("transformers")
    tokenizer.save_pretrained(tmp_path)
    hf = transformers.PreTrainedTokenizerFast.from_pretrained(tmp_path)
    strings = coefficient_strings(smooth[:20], SCALE, tokenizer.min_token)
    ids = tokenizer(smooth[:20])
    assert [hf(s)["input_ids"] for s in strings] == ids
    assert [hf.decode(i) for i in ids] == strings


@pytest.mark.parametrize("byte_level", [False, True], ids=["plain_bpe", "byte_level_bpe"])
def test_loads_independently_built_published_format(tmp_path, byte_level):
    fit_chunks = smooth_chunks(300, seed=2)
    test_chunks = fit_chunks[:40]  # inside the fitted range, so no clipping
    q = np.around(dct(fit_chunks, axis=1, norm="ortho") * SCALE).astype(int)
    min_token, max_token = int(q.min()), int(q.max())
    bpe = Tokenizer(models.BPE())
    if byte_level:  # what tokenizers' ByteLevelBPETokenizer() sets up
        bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        bpe.decoder = decoders.ByteLevel()
        bpe.post_processor = processors.ByteLevel(trim_offsets=True)
    trainer = trainers.BpeTrainer(vocab_size=256, min_frequency=2, special_tokens=[], show_progress=False,
                                  initial_alphabet=[chr(i) for i in range(max_token - min_token + 1)])
    bpe.train_from_iterator(coefficient_strings(fit_chunks, SCALE, min_token), trainer=trainer)
    bpe.save(str(tmp_path / "tokenizer.json"))
    config = {"processor_class": "UniversalActionProcessor", "scale": 10, "vocab_size": 256, "min_token": min_token,
              "time_horizon": None, "action_dim": None}
    (tmp_path / "processor_config.json").write_text(json.dumps(config))

    tokenizer = FASTTokenizer.from_pretrained(tmp_path)
    raw = Tokenizer.from_file(str(tmp_path / "tokenizer.json"))
    ids = tokenizer(test_chunks)
    assert ids == [raw.encode(s).ids for s in coefficient_strings(test_chunks, SCALE, min_token)]
    with pytest.raises(ValueError, match="time_horizon and action_dim"):
        tokenizer.decode(ids)
    decoded, valid = tokenizer.decode(ids, time_horizon=T, action_dim=D, return_valid=True)
    assert valid.all() and per_dim_error(decoded, test_chunks).max() <= BOUND
    fixed = FASTTokenizer.from_pretrained(tmp_path, time_horizon=T, action_dim=D)
    np.testing.assert_array_equal(fixed.decode(ids), decoded)


def test_undecodable_rows_are_nan(tokenizer, smooth, caplog):
    good = tokenizer(smooth[:2])
    batch = [good[0], good[1][:-1], good[0] + [tokenizer.vocab_size + 5], [-1] + good[0], [], [1.5], good[1]]
    with caplog.at_level(logging.WARNING, logger="hf_vla.action_tokenizers.fast"):
        actions, valid = tokenizer.decode(batch, return_valid=True)
    assert valid.tolist() == [True, False, False, False, False, False, True]
    assert np.isnan(actions[~valid]).all() and np.isfinite(actions[valid]).all()
    np.testing.assert_array_equal(actions[[0, 6]], tokenizer.decode([good[0], good[1]]))
    assert "5 of 7 sequences could not be decoded" in caplog.text


def test_out_of_range_values_are_clipped_not_dropped(tokenizer, caplog):
    chunk = np.full((T, D), 5.0, dtype=np.float32)  # DC coefficient far beyond anything seen while fitting
    with caplog.at_level(logging.WARNING, logger="hf_vla.action_tokenizers.fast"):
        ids = tokenizer(chunk)
    assert "were clipped" in caplog.text
    assert tokenizer.decode(ids, return_valid=True)[1].all()
    top = tokenizer.decode(ids)[0, 0, 0]
    for value in (1e18, 1e19):  # beyond int64 once scaled: still the top end, never wrapped to the bottom
        assert tokenizer.decode(tokenizer(np.full((T, D), value, dtype=np.float64)))[0, 0, 0] == top


def test_coefficients_the_bpe_cannot_spell_snap_to_the_nearest_one_it_can(caplog):
    """A byte-level BPE spells only the symbols its training text held: here 0, 1, 4 and 5 of the alphabet 0..5. A
    coefficient of 2 or 3 would be dropped by the BPE (shifting every later one), so it snaps to 1 and 4."""
    from scipy.fft import idct

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.post_processor = processors.ByteLevel(trim_offsets=True)
    trainer = trainers.BpeTrainer(vocab_size=64, min_frequency=1, special_tokens=[], show_progress=False,
                                  initial_alphabet=[chr(i) for i in range(6)])
    rng = np.random.default_rng(0)
    bpe.train_from_iterator(["".join(map(chr, rng.choice([0, 1, 4, 5], size=4))) for _ in range(50)], trainer=trainer)
    tokenizer = FASTTokenizer(bpe, scale=1.0, min_token=0, time_horizon=4, action_dim=1)
    chunk = idct(np.array([2.0, 0.0, 3.0, 5.0]), norm="ortho")[:, None]  # rounded DCT coefficients 2, 0, 3, 5
    with caplog.at_level(logging.WARNING, logger="hf_vla.action_tokenizers.fast"):
        ids = tokenizer(chunk)
    assert "2 of 4 DCT coefficients" in caplog.text
    assert ids == [bpe.encode("".join(map(chr, [1, 0, 4, 5]))).ids]
    decoded, valid = tokenizer.decode(ids, return_valid=True)
    assert valid.all()
    np.testing.assert_allclose(decoded[0, :, 0], idct(np.array([1.0, 0.0, 4.0, 5.0]), norm="ortho"), atol=1e-6)


def test_bad_inputs(tokenizer, smooth, tmp_path):
    with pytest.raises(ValueError, match=r"action_dim.*expects action_dim=7.*\(4, 10, 6\)"):
        tokenizer(np.zeros((4, T, 6)))
    with pytest.raises(ValueError, match=r"time_horizon.*expects time_horizon=10.*\(4, 12, 7\)"):
        tokenizer(np.zeros((4, 12, D)))
    with pytest.raises(ValueError, match="NaN"):
        tokenizer(np.where(np.arange(T)[:, None] == 3, np.nan, smooth[0]))
    with pytest.raises(ValueError, match="shape"):
        tokenizer(np.zeros(T))
    with pytest.raises(ValueError, match="vocab_size"):
        FASTTokenizer.fit(smooth, scale=1000.0, vocab_size=64)

    tokenizer.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "processor_config.json").read_text())
    del config["min_token"]
    (tmp_path / "processor_config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="missing required keys.*min_token"):
        FASTTokenizer.from_pretrained(tmp_path)
    (tmp_path / "tokenizer.json").unlink()
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        FASTTokenizer.from_pretrained(tmp_path)
