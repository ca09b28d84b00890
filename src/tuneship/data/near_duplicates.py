"""Near-duplicate detection without a pairwise scan: MinHash signatures + LSH banding.

Text is normalized (lower case, punctuation removed, white space folded) and cut into word
bigrams. Two records are near-duplicates when the Jaccard similarity of their bigram sets is at
least the threshold (`data.near_duplicate_similarity`, 0.9 by default). LSH only proposes
candidates (records sharing a band of their signature); each candidate is then checked with the
exact Jaccard similarity, so the threshold is exact and not a probability. Each record is compared
with at most `MAX_COMPARISONS_PER_BUCKET` earlier members of a bucket, which keeps templated data
(thousands of records in one bucket) linear.
"""

from __future__ import annotations

import re
import zlib

import numpy as np

NUM_PERMUTATIONS = 64
MAX_COMPARISONS_PER_BUCKET = 8
_PUNCTUATION = re.compile(r"[^\w\s]+")
_MASK32 = np.uint64(0xFFFFFFFF)


def normalize(text: str) -> str:
    return " ".join(_PUNCTUATION.sub(" ", text.lower()).split())


def shingles(text: str) -> np.ndarray:
    words = normalize(text).split()
    grams = [" ".join(pair) for pair in zip(words, words[1:])] or words or [""]
    return np.unique(np.fromiter((zlib.crc32(g.encode()) for g in grams), dtype=np.uint64, count=len(grams)))


def jaccard(a: np.ndarray, b: np.ndarray) -> float:
    inter = np.intersect1d(a, b, assume_unique=True).size
    return inter / (a.size + b.size - inter)


def choose_bands(threshold: float) -> tuple[int, int]:
    """(bands, rows) whose LSH threshold (1/b)^(1/r) sits safely below the similarity threshold."""
    options = [(32, 2), (16, 4), (8, 8), (4, 16)]
    safe = [(b, r) for b, r in options if (1 / b) ** (1 / r) <= threshold - 0.1]
    return max(safe, key=lambda br: (1 / br[0]) ** (1 / br[1])) if safe else options[0]


class NearDuplicateIndex:
    """Feed records in order; `add` returns the index of an earlier near-duplicate, if any."""

    def __init__(self, threshold: float, seed: int = 0):
        rng = np.random.default_rng(seed)
        self.threshold = threshold
        self.bands, self.rows = choose_bands(threshold)
        self._a = rng.integers(1, 2**63, NUM_PERMUTATIONS, dtype=np.uint64) | np.uint64(1)
        self._b = rng.integers(0, 2**63, NUM_PERMUTATIONS, dtype=np.uint64)
        self._buckets: dict[bytes, list[int]] = {}
        self._shingles: list[np.ndarray] = []

    def _signature(self, hashed: np.ndarray) -> np.ndarray:
        with np.errstate(over="ignore"):
            mixed = (hashed[:, None] * self._a[None, :] + self._b[None, :]) >> np.uint64(32)
        return (mixed & _MASK32).min(axis=0)

    def add(self, text: str) -> tuple[int | None, float]:
        index = len(self._shingles)
        hashed = shingles(text)
        self._shingles.append(hashed)
        signature = self._signature(hashed)
        match, best = None, 0.0
        for band in range(self.bands):
            key = band.to_bytes(2, "little") + signature[band * self.rows : (band + 1) * self.rows].tobytes()
            members = self._buckets.setdefault(key, [])
            if match is None:
                for other in members[:MAX_COMPARISONS_PER_BUCKET]:
                    similarity = jaccard(hashed, self._shingles[other])
                    if similarity >= self.threshold:
                        match, best = other, similarity
                        break
            members.append(index)
        return match, best
