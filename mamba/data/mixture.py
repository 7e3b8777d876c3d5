"""Index arithmetic of the data mixture: which source and which window each global sample reads.

Global sample g (0, 1, 2, ... over the whole run, all ranks together) maps to a window in two steps:

1. `WeightedSchedule`: g -> (source s, k), where k counts the earlier samples of source s. The
   weights are made integers n_s (0.75 and 0.25 become 3 and 1); one period of P = sum(n_s)
   samples holds exactly n_s samples of source s, so every source gets exactly its share of the
   tokens over each period, with no random drift. Inside a period the samples are ordered by the
   Sainte-Lague divisor sequence (occurrence j of source s sits at (2j + 1) / n_s), which spreads
   each source evenly: after any g samples source s has g * n_s / P samples, give or take about one.
2. `WindowShuffle`: k -> window. Epoch e = k // N_s of source s (N_s windows) reads its windows in
   the order of a seeded pseudorandom permutation of 0..N_s-1, a different one per (source,
   epoch). The permutation is a keyed Feistel network (Luby & Rackoff 1988) with cycle walking
   (Black & Rogaway 2002), so a window index costs O(1) time and memory even for 10^8 windows,
   where a materialised permutation would cost 800 MB in every worker.

Both steps are pure functions of g, so a resumed or re-sharded run continues from any g in O(1).
"""
from __future__ import annotations

import math
from fractions import Fraction

import numpy as np

MAX_PERIOD = 1 << 20  # largest schedule period (samples) whose ~9 MB table we build per process
_MASK64 = np.uint64(0xFFFFFFFFFFFFFFFF)


def integer_weights(weights: list[float]) -> list[int]:
    """Smallest integers in the same ratio as `weights`, read as the decimals they print as.

    0.7 and 0.3 give [7, 3]; 2 and 6 give [1, 3]. Raises if the period sum() exceeds MAX_PERIOD.
    """
    fractions = [Fraction(repr(float(w))) for w in weights]
    if any(f <= 0 for f in fractions):
        raise ValueError(f"mixture weights must be > 0, got {weights}")
    scale = math.lcm(*(f.denominator for f in fractions))
    ints = [int(f * scale) for f in fractions]
    common = math.gcd(*ints)
    ints = [i // common for i in ints]
    if sum(ints) > MAX_PERIOD:
        raise ValueError(
            f"mixture weights {weights} are exact only over a period of {sum(ints)} samples (more "
            f"than {MAX_PERIOD}); round them to fewer significant digits, e.g. 0.333 -> 1 and 0.667 -> 2"
        )
    return ints


class WeightedSchedule:
    """g -> (source, k): the deterministic interleaving of sources described in the module doc."""

    def __init__(self, weights: list[float]):
        self.counts = np.array(integer_weights(weights), dtype=np.int64)  # (S,) n_s per period
        self.period = int(self.counts.sum())
        sources = np.repeat(np.arange(len(self.counts)), self.counts)  # (P,)
        occurrence = np.arange(self.period) - np.repeat(np.cumsum(self.counts) - self.counts, self.counts)
        # Correctly rounded division maps equal rationals to equal floats and, with n_s <= 2^20,
        # distinct ones to distinct floats, so sorting these keys is the exact rational order.
        key = (2 * occurrence + 1) / self.counts[sources]
        order = np.lexsort((sources, key))  # ties go to the source listed first
        # int32 (P <= 2^20): these tables are pickled into every DataLoader worker.
        self.source_at = sources[order].astype(np.int32)  # (P,) which source period slot i reads
        self.occurrence_at = occurrence[order].astype(np.int32)  # (P,) which of that source's n_s samples
        # slot_of[s][j]: the period slot of occurrence j of source s (inverse of the two above).
        self.slot_of = [np.flatnonzero(self.source_at == s).astype(np.int32) for s in range(len(self.counts))]

    def locate(self, g: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Global sample indices g (int64 array) -> (source index, k) arrays of g's shape."""
        cycle, slot = np.divmod(np.asarray(g, dtype=np.int64), self.period)
        source = self.source_at[slot]
        return source, cycle * self.counts[source] + self.occurrence_at[slot]

    def first_sample(self, source: int, k: int) -> int:
        """The global index g of the k-th sample (from 0) drawn from `source`."""
        cycle, j = divmod(k, int(self.counts[source]))
        return cycle * self.period + int(self.slot_of[source][j])


def _mix64(x: np.ndarray) -> np.ndarray:
    """SplitMix64's finaliser (Steele, Lea & Flood 2014): a bijective avalanche on uint64."""
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def hash64(*keys: int | np.ndarray) -> np.ndarray:
    """A uint64 hash of a sequence of non-negative integer keys (arrays broadcast)."""
    h = np.uint64(0x9E3779B97F4A7C15)  # 2^64 / golden ratio, SplitMix64's increment
    with np.errstate(over="ignore"):
        for key in keys:
            h = _mix64(h ^ (np.asarray(key).astype(np.uint64) + np.uint64(0x9E3779B97F4A7C15)))
    return h


def hash_uniform(*keys: int | np.ndarray) -> np.ndarray:
    """Uniform floats in [0, 1) from a hash of integer keys (broadcast): a counter-based RNG, so
    the value for given keys never depends on what was drawn before (resume needs exactly that)."""
    return (hash64(*keys) >> np.uint64(11)).astype(np.float64) / float(1 << 53)


class WindowShuffle:
    """A seeded permutation of range(n) evaluated pointwise: `permute(i)` for an index array i."""

    ROUNDS = 4  # four Feistel rounds make a strong pseudorandom permutation (Luby & Rackoff)

    def __init__(self, n: int, seed: int, source: int, epoch: int):
        self.n = int(n)
        bits = max(2, (self.n - 1).bit_length())
        self.half = (bits + 1) // 2  # the domain is 2^(2*half) >= n, at most 4n
        self.low = np.uint64((1 << self.half) - 1)
        self.keys = [hash64(seed, source, epoch, r) for r in range(self.ROUNDS)]  # one per round

    def _encrypt(self, x: np.ndarray) -> np.ndarray:
        left, right = x >> np.uint64(self.half), x & self.low
        with np.errstate(over="ignore"):
            for key in self.keys:
                left, right = right, left ^ (_mix64(right ^ key) & self.low)
        return (left << np.uint64(self.half)) | right

    def permute(self, i: np.ndarray) -> np.ndarray:
        """Indices in [0, n) -> their images in [0, n) (int64); a bijection on range(n)."""
        x = self._encrypt(np.asarray(i, dtype=np.uint64))
        outside = x >= np.uint64(self.n)
        while outside.any():  # cycle walking: re-encrypt until back inside range(n)
            x[outside] = self._encrypt(x[outside])
            outside = x >= np.uint64(self.n)
        return x.astype(np.int64)
