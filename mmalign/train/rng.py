"""Keyed random generators: a random draw is a pure function of its key.

Noise, timesteps and augmentation are drawn from generators seeded by `(seed, step, sample id,
stream)`, never from a global stream. A resumed run therefore repeats every draw exactly, and a
sample gets the same noise whether it is processed by one process or split across eight.
"""

from __future__ import annotations

import hashlib

import torch


def key_seed(*key: int | str) -> int:
    """A stable 63-bit seed from a tuple of ints and strings."""
    digest = hashlib.blake2b(repr(tuple(key)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def keyed_generator(*key: int | str) -> torch.Generator:
    """A CPU generator seeded from `key`."""
    return torch.Generator().manual_seed(key_seed(*key))
