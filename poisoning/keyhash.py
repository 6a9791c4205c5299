"""Keyed randomness for the whole project: every random choice is a pure function of names, never of a process.

Python's ``hash()`` is salted per process, so it would give each DataLoader worker a different poisoned set or
view; blake2b gives the same bits on every worker, rank, restart and machine. Two families, kept bit-stable
because poisoned sets, manifests and exact resume depend on them:

- ``key_uniform`` / ``key_randint`` / ``key_choice`` / ``key_rng``: the poisoner's choices, fixed by
  (seed, key, purpose); the selection hash is exactly ``blake2b(f"{seed}:{key}")``.
- ``derive_seed``: the data pipeline's seeds (shard order, shuffle buffer, views, augmentations, subsets), fixed
  by any printable parts such as (seed, epoch, key, purpose).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import TypeVar

import numpy as np

T = TypeVar("T")

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


def key_choice(seed: int, key: str, purpose: str, options: Sequence[T]) -> T:
    """One of ``options`` fixed by (seed, key, purpose), each equally likely."""
    return options[min(int(key_uniform(seed, key, purpose) * len(options)), len(options) - 1)]


def key_rng(seed: int, key: str, purpose: str) -> np.random.Generator:
    """A numpy generator fixed by (seed, key, purpose), for draws that need more than one number."""
    return np.random.default_rng(int.from_bytes(_digest(seed, key, purpose), "big"))


def derive_seed(*parts: object) -> int:
    """A 63-bit seed from any printable parts, stable across processes and Python versions (unlike hash())."""
    digest = hashlib.blake2b("\x1f".join(map(str, parts)).encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1
