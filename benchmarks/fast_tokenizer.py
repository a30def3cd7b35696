"""FAST tokenizer benchmark: round-trip error and compression on random smooth and non-smooth action chunks.

    python benchmarks/fast_tokenizer.py [--n-fit 2000] [--n-test 500] [--scale 10]

Each setting fits a tokenizer on `n-fit` chunks and evaluates on `n-test` held-out ones. "smooth" chunks are sums of
low-frequency sinusoids, "noise" chunks are uniform in [-1, 1]. Reported per setting: tokens per chunk, compression
(T * D / tokens), the worst per-dimension L2 error over time against its bound sqrt(T) * 0.5 / scale (over all
chunks, and over the chunks whose coefficients all lie in the fitted range), the RMSE, how many held-out coefficients
fell outside the fitted range (they are clipped, so the bound need not hold for their chunk), and timings.
"""

from __future__ import annotations

import argparse
import logging
import time

import numpy as np
from scipy.fft import dct

from hf_vla.action_tokenizers import FASTTokenizer


def smooth_chunks(rng, n, t, d):
    steps = np.linspace(0.0, 1.0, t)[None, :, None]
    return sum(rng.uniform(0, 0.4, (n, 1, d)) * np.sin(2 * np.pi * (k * steps + rng.uniform(0, 1, (n, 1, d))))
               for k in (0.5, 1.0, 1.5)).astype(np.float32)


def noise_chunks(rng, n, t, d):
    return rng.uniform(-1, 1, (n, t, d)).astype(np.float32)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n-fit", type=int, default=2000)
    parser.add_argument("--n-test", type=int, default=500)
    parser.add_argument("--scale", type=float, default=10.0)
    parser.add_argument("--vocab-size", type=int, default=1024)
    args = parser.parse_args()
    logging.getLogger("hf_vla.action_tokenizers.fast").setLevel(logging.ERROR)  # clipping is counted below instead

    header = (f"{'data':<7}{'T x D':>8}{'tokens':>9}{'compr.':>8}{'max L2 err':>12}{'in range':>10}{'bound':>8}"
              f"{'RMSE':>8}{'clipped':>9}{'valid':>7}{'fit s':>7}{'enc us':>8}{'dec us':>8}")
    print(f"scale={args.scale}, vocab_size={args.vocab_size}, fit on {args.n_fit}, test on {args.n_test} held-out")
    print(header)
    print("-" * len(header))
    for kind, make in (("smooth", smooth_chunks), ("noise", noise_chunks)):
        for t, d in ((10, 7), (50, 7), (50, 14)):
            rng = np.random.default_rng(0)
            fit_data, test_data = make(rng, args.n_fit, t, d), make(rng, args.n_test, t, d)
            start = time.perf_counter()
            tokenizer = FASTTokenizer.fit(fit_data, scale=args.scale, vocab_size=args.vocab_size)
            fit_s = time.perf_counter() - start

            start = time.perf_counter()
            ids = tokenizer(test_data)
            encode_us = (time.perf_counter() - start) / len(test_data) * 1e6
            start = time.perf_counter()
            decoded, valid = tokenizer.decode(ids, return_valid=True)
            decode_us = (time.perf_counter() - start) / len(test_data) * 1e6

            error = np.linalg.norm(decoded.astype(np.float64) - test_data, axis=1)  # L2 over time, per dimension
            rmse = np.sqrt(np.mean((decoded.astype(np.float64) - test_data) ** 2))
            q_fit = np.around(dct(fit_data, axis=1, norm="ortho") * args.scale)
            q_test = np.around(dct(test_data, axis=1, norm="ortho") * args.scale)
            clipped = (q_test < q_fit.min()) | (q_test > q_fit.max())
            in_range = ~clipped.any(axis=(1, 2))
            tokens = np.mean([len(i) for i in ids])
            print(f"{kind:<7}{f'{t}x{d}':>8}{tokens:>9.1f}{t * d / tokens:>8.2f}{error.max():>12.4f}"
                  f"{error[in_range].max():>10.4f}{np.sqrt(t) * 0.5 / args.scale:>8.4f}{rmse:>8.4f}"
                  f"{clipped.sum():>9d}{valid.mean():>7.0%}{fit_s:>7.2f}{encode_us:>8.0f}{decode_us:>8.0f}")


if __name__ == "__main__":
    main()
