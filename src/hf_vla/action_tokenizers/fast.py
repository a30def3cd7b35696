"""FAST action tokenizer: DCT + BPE compression of action chunks (Pertsch et al., 2025, "FAST").

A normalised chunk `[T, D]` (values about [-1, 1]) becomes discrete tokens in three steps:

    coeff = dct(chunk, axis=0, norm="ortho")                        # per-dimension DCT over time
    q     = round(coeff * scale)                                    # smooth chunks give few non-zero integers
    ids   = bpe("".join(chr(v - min_token) for v in q.flatten()))   # frequency-major, dimension-minor

Decoding inverts the steps. A sequence that does not map back to exactly `T * D` coefficients decodes to a NaN row.
Rounding moves each coefficient by at most 0.5 / scale and the orthonormal IDCT preserves the L2 norm, so the
reconstruction error of one dimension over the T steps is at most sqrt(T) * 0.5 / scale (in L2).

Saved directories follow Physical Intelligence's universal tokenizer (`physical-intelligence/fast`):
`processor_config.json` (scale, vocab_size, min_token, time_horizon, action_dim) beside the BPE's `tokenizer.json`,
so either implementation loads the other's files and produces the same token ids.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer, decoders, models, trainers

logger = logging.getLogger(__name__)

CONFIG_NAME = "processor_config.json"
TOKENIZER_NAME = "tokenizer.json"
REQUIRED_CONFIG_KEYS = ("scale", "vocab_size", "min_token")


def _as_chunks(chunks) -> np.ndarray:
    """`[N, T, D]` float array from an array, nested list or torch tensor; a single `[T, D]` chunk gets N = 1."""
    if hasattr(chunks, "detach"):  # torch tensor, possibly bf16 or on GPU
        chunks = chunks.detach().float().cpu().numpy()
    chunks = np.asarray(chunks)
    # float32 stays float32: the reference transforms the caller's dtype, and casting could flip a rounding.
    if chunks.dtype not in (np.float32, np.float64):
        chunks = chunks.astype(np.float64)
    if chunks.ndim == 2:
        chunks = chunks[None]
    if chunks.ndim != 3 or chunks.shape[1] == 0 or chunks.shape[2] == 0:
        raise ValueError(f"chunks: expected an [N, T, D] batch or one [T, D] chunk, got shape {tuple(chunks.shape)}")
    if not np.isfinite(chunks).all():
        raise ValueError("chunks: contain NaN or inf values; FAST only encodes finite, normalised actions")
    return chunks


def _quantise(chunks: np.ndarray, scale: float) -> np.ndarray:
    """Rounded DCT coefficients, `[N, T * D]` integers in time-major, dimension-minor order."""
    from scipy.fft import dct  # scipy only where actions are tokenised: `import hf_vla` must not need it

    rounded = np.around(dct(chunks, axis=1, norm="ortho") * scale)
    # clipped where int64 would wrap (a huge positive coefficient must stay at the top end once snapped to the vocab)
    return np.clip(rounded, -(2**62), 2**62).astype(np.int64).reshape(len(chunks), -1)


class FASTTokenizer:
    r"""
    Args:
        bpe (`tokenizers.Tokenizer`): the BPE over coefficient strings (`chr(q - min_token)` per coefficient).
        scale (`float`): DCT coefficients are multiplied by this before rounding; larger is finer and longer.
        vocab_size (`int`, *optional*): the BPE vocabulary size; defaults to the BPE's own size.
        min_token (`int`): the smallest rounded coefficient, encoded as `chr(0)`.
        time_horizon, action_dim (`int`, *optional*): the chunk shape `[T, D]`. `None` (the universal tokenizer)
            accepts any shape when encoding; `decode` then needs them as keyword arguments.
    """

    def __init__(
        self,
        bpe: Tokenizer,
        scale: float = 10.0,
        vocab_size: int | None = None,
        min_token: int = 0,
        *,
        time_horizon: int | None = None,
        action_dim: int | None = None,
    ):
        self.bpe = bpe
        self.scale = float(scale)
        self.vocab_size = int(vocab_size) if vocab_size is not None else bpe.get_vocab_size(with_added_tokens=True)
        self.min_token = int(min_token)
        self.time_horizon = None if time_horizon is None else int(time_horizon)
        self.action_dim = None if action_dim is None else int(action_dim)
        if bpe.get_vocab_size(with_added_tokens=True) > self.vocab_size:
            logger.warning("FAST: tokenizer.json holds %d tokens, more than vocab_size=%d; ids can exceed vocab_size",
                           bpe.get_vocab_size(with_added_tokens=True), self.vocab_size)
        self._special_ids = {i for i, token in bpe.get_added_tokens_decoder().items() if token.special}
        # The symbols the BPE can spell. Fitting puts chr(0) ... chr(max_token - min_token) in the vocabulary, but a
        # BPE without byte fallback silently drops unknown characters, which would shift every later coefficient.
        n = 0
        while bpe.token_to_id(chr(n)) is not None:
            n += 1
        self._symbols = np.array([s for s in range(n) if self._ids_to_text(bpe.encode(chr(s)).ids) == chr(s)])
        if len(self._symbols) == 0:
            raise ValueError("bpe: chr(0) is not in the vocabulary, so this is not a FAST coefficient tokenizer")

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(scale={self.scale}, vocab_size={self.vocab_size}, min_token={self.min_token}, "
                f"time_horizon={self.time_horizon}, action_dim={self.action_dim})")

    @classmethod
    def fit(cls, chunks, scale: float = 10.0, vocab_size: int = 1024, min_frequency: int = 2) -> FASTTokenizer:
        """Trains the BPE on the coefficient strings of `chunks` (`[N, T, D]`, normalised to about [-1, 1])."""
        chunks = _as_chunks(chunks)
        if len(chunks) == 0:
            raise ValueError("chunks: fit needs at least one chunk")
        q = _quantise(chunks, scale)
        min_token, max_token = int(q.min()), int(q.max())
        alphabet = [chr(i) for i in range(max_token - min_token + 1)]
        if len(alphabet) > vocab_size:
            raise ValueError(f"vocab_size: {vocab_size} is smaller than the {len(alphabet)} possible coefficient "
                             f"values in [{min_token}, {max_token}]; raise vocab_size or lower scale")
        bpe = Tokenizer(models.BPE())
        bpe.decoder = decoders.Fuse()  # tokens concatenate back into the string; without a decoder they join with " "
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=[],
                                      initial_alphabet=alphabet, show_progress=False)
        texts = ("".join(map(chr, row)) for row in (q - min_token).tolist())
        bpe.train_from_iterator(texts, trainer=trainer, length=len(q))
        return cls(bpe, scale, vocab_size, min_token, time_horizon=chunks.shape[1], action_dim=chunks.shape[2])

    def __call__(self, chunks) -> list[list[int]]:
        """Token ids of each chunk: `[N, T, D]` (or one `[T, D]`) normalised actions -> N lists of ints."""
        chunks = _as_chunks(chunks)
        for name, axis in (("time_horizon", 1), ("action_dim", 2)):
            expected = getattr(self, name)
            if expected is not None and chunks.shape[axis] != expected:
                expected_shape = f"[N, {self.time_horizon or 'T'}, {self.action_dim or 'D'}]"
                raise ValueError(f"{name}: this tokenizer expects {name}={expected}, i.e. chunks of shape "
                                 f"{expected_shape}; got {tuple(chunks.shape)}")
        if len(chunks) == 0:
            return []
        symbols = _quantise(chunks, self.scale) - self.min_token
        unknown = ~np.isin(symbols, self._symbols)
        if unknown.any():
            # Like the reference (which clips below min_token), snap to the nearest symbol rather than emit a
            # character the BPE would drop.
            right = np.searchsorted(self._symbols, symbols).clip(0, len(self._symbols) - 1)
            left, right = self._symbols[(right - 1).clip(0)], self._symbols[right]
            nearest = np.where(np.abs(symbols - left) <= np.abs(right - symbols), left, right)
            symbols = np.where(unknown, nearest, symbols)
            logger.warning("FAST: %d of %d DCT coefficients are not in this tokenizer's alphabet (fitted on rounded "
                           "values %d..%d) and were clipped to the nearest one", unknown.sum(), unknown.size,
                           self.min_token + self._symbols[0], self.min_token + self._symbols[-1])
        texts = ["".join(map(chr, row)) for row in symbols.tolist()]
        return [encoding.ids for encoding in self.bpe.encode_batch(texts)]

    def decode(
        self,
        ids: Sequence[Sequence[int]],
        *,
        time_horizon: int | None = None,
        action_dim: int | None = None,
        return_valid: bool = False,
    ) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
        """
        Actions `[N, T, D]` (float32) from N token id sequences. A sequence that cannot be decoded (ids outside the
        vocabulary, the wrong number of coefficients, ...) gives a NaN row and a warning; `return_valid=True` also
        returns the `[N]` boolean mask of rows that decoded.
        """
        T, D = time_horizon or self.time_horizon, action_dim or self.action_dim
        if T is None or D is None:
            raise ValueError("decode: time_horizon and action_dim are not in the config; pass them as keywords")
        if hasattr(ids, "tolist"):
            ids = ids.tolist()
        if len(ids) and isinstance(ids[0], (int, np.integer)):  # one flat sequence
            ids = [ids]
        coefficients = np.full((len(ids), T, D), np.nan)
        valid = np.zeros(len(ids), dtype=np.bool_)
        errors = []
        for row, sequence in enumerate(ids):
            try:
                text = self._ids_to_text(sequence)
                if len(text) != T * D:
                    raise ValueError(f"{len(text)} coefficients, expected T * D = {T} * {D} = {T * D}")
                coefficients[row] = (np.fromiter(map(ord, text), np.int64, len(text)) + self.min_token).reshape(T, D)
                valid[row] = True
            except Exception as error:  # a model can emit anything; one bad row must not sink the batch
                errors.append(f"row {row}: {error}")
        if errors:
            logger.warning("FAST: %d of %d sequences could not be decoded and are NaN (%s)",
                           len(errors), len(ids), "; ".join(errors[:5]) + ("; ..." if len(errors) > 5 else ""))
        from scipy.fft import idct

        actions = idct(coefficients / self.scale, axis=1, norm="ortho").astype(np.float32)
        return (actions, valid) if return_valid else actions

    def _ids_to_text(self, sequence: Sequence[int]) -> str:
        tokens = []
        for token_id in sequence:
            if isinstance(token_id, bool) or int(token_id) != token_id:
                raise ValueError(f"id {token_id!r} is not an integer")
            token = self.bpe.id_to_token(int(token_id)) if 0 <= token_id < 2**32 else None
            if token is None:
                raise ValueError(f"id {token_id} is outside the vocabulary")
            if int(token_id) not in self._special_ids:
                tokens.append(token)
        decoder = self.bpe.decoder
        text = decoder.decode(tokens) if decoder is not None else "".join(tokens)
        if "\ufffd" in text:  # byte-level tokens that stop mid-character
            raise ValueError("byte-level tokens do not form valid UTF-8")
        return text

    def save_pretrained(self, save_directory: str | Path) -> list[str]:
        """Writes `processor_config.json`, `tokenizer.json` and `tokenizer_config.json`; returns their paths."""
        directory = Path(save_directory)
        directory.mkdir(parents=True, exist_ok=True)
        config = {"processor_class": "UniversalActionProcessor", "scale": self.scale, "vocab_size": self.vocab_size,
                  "min_token": self.min_token, "time_horizon": self.time_horizon, "action_dim": self.action_dim}
        # Lets transformers' AutoTokenizer (which the reference processor uses) load the BPE as it is.
        tokenizer_config = {"tokenizer_class": "PreTrainedTokenizerFast", "clean_up_tokenization_spaces": False}
        files = [directory / CONFIG_NAME, directory / TOKENIZER_NAME, directory / "tokenizer_config.json"]
        files[0].write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        self.bpe.save(str(files[1]))
        files[2].write_text(json.dumps(tokenizer_config, indent=2) + "\n")
        return [str(f) for f in files]

    @classmethod
    def from_pretrained(cls, pretrained_path: str | Path, *, revision: str | None = None, **overrides) -> FASTTokenizer:
        """
        Loads a saved directory or Hub repo. `overrides` (`time_horizon`, `action_dim`) replace config values, e.g. to
        fix the chunk shape of the universal tokenizer.
        """
        directory = Path(pretrained_path)
        if not directory.is_dir():
            from huggingface_hub import snapshot_download

            try:
                directory = Path(snapshot_download(str(pretrained_path), revision=revision,
                                                   allow_patterns=[CONFIG_NAME, TOKENIZER_NAME]))
            except Exception as error:
                raise OSError(f"{pretrained_path!r} is neither a local directory nor a loadable Hub repo") from error
        for name in (CONFIG_NAME, TOKENIZER_NAME):
            if not (directory / name).is_file():
                raise FileNotFoundError(f"{directory}: no {name}; a FAST tokenizer needs {CONFIG_NAME} and "
                                        f"{TOKENIZER_NAME}")
        config = json.loads((directory / CONFIG_NAME).read_text())
        missing = [key for key in REQUIRED_CONFIG_KEYS if key not in config]
        if missing:
            raise ValueError(f"{directory / CONFIG_NAME}: missing required keys {missing}; a FAST config needs "
                             f"{list(REQUIRED_CONFIG_KEYS)} (time_horizon and action_dim are optional)")
        unknown = set(overrides) - {"time_horizon", "action_dim"}
        if unknown:
            raise TypeError(f"from_pretrained: unexpected keyword arguments {sorted(unknown)}")
        shape = {key: overrides.get(key, config.get(key)) for key in ("time_horizon", "action_dim")}
        bpe = Tokenizer.from_file(str(directory / TOKENIZER_NAME))
        return cls(bpe, config["scale"], config["vocab_size"], config["min_token"], **shape)


if __name__ == "__main__":
    # Smoke run: fit on random smooth chunks, then report compression and round-trip error on held-out ones.
    rng = np.random.default_rng(0)
    T, D, scale = 50, 7, 10.0
    t = np.linspace(0.0, 1.0, T)[None, :, None]
    chunks = sum(rng.uniform(0, 0.4, (1200, 1, D)) * np.sin(2 * np.pi * (k * t + rng.uniform(0, 1, (1200, 1, D))))
                 for k in (0.5, 1.0, 2.0))
    tokenizer = FASTTokenizer.fit(chunks[:1000], scale=scale)
    ids = tokenizer(chunks[1000:])
    decoded, valid = tokenizer.decode(ids, return_valid=True)
    error = np.linalg.norm(decoded - chunks[1000:], axis=1)  # L2 over time, per dimension
    print(tokenizer)
    print(f"tokens per chunk: {np.mean([len(i) for i in ids]):.1f} (T * D = {T * D}), valid: {valid.mean():.0%}")
    bound = np.sqrt(T) * 0.5 / scale
    print(f"max per-dimension L2 error: {error.max():.4f} (bound sqrt(T) * 0.5 / scale = {bound:.4f})")
