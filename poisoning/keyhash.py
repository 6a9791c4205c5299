"""Stable per-key randomness: every choice the poisoner makes is a pure function of (seed, key, purpose).

Python's ``hash()`` is salted per process, so it would give each DataLoader worker a different poisoned set;
blake2b gives the same bits on every worker, rank, restart and machine.
"""

from __future__ import annotations

import hashlib

import numpy as np

_SCALE = float(2**64)


def _digest(seed: int, key: str, purpose: str) -> bytes:
    # ``person`` separates purposes (selection, layout, reference choice, ...) without touching the message,
    # so the selection hash is exactly blake2b(f"{seed}:{key}").
    return hashlib.blake2b(f"{seed}:{key}".encode(), digest_size=8, person=purpose.encode()[:16]).digest()


def key_uniform(seed: int, key: str, purpose: str = "") -> float:
    """A number in [0, 1) fixed by (seed, key, purpose)."""
    return int.from_bytes(_digest(seed, key, purpose), "big") / _SCALE


def key_randint(seed: int, key: str, purpose: str, low: int, high: int) -> int:
    """An integer in [low, high] (both included) fixed by (seed, key, purpose)."""
    if high <= low:
        return low
    return low + min(int(key_uniform(seed, key, purpose) * (high - low + 1)), high - low)


def key_rng(seed: int, key: str, purpose: str) -> np.random.Generator:
    """A numpy generator fixed by (seed, key, purpose), for draws that need more than one number."""
    return np.random.default_rng(int.from_bytes(_digest(seed, key, purpose), "big"))
