"""Every random number of a run comes from ``training.seed``.

``seed_everything`` seeds the process-wide generators (torch, Python's ``random``, NumPy) once, before
the model is built: the same seed on every rank gives the same initial model everywhere (the
hyper-connection init draws from Python's ``random``). Everything drawn later (the data order, the
synthetic samples, each micro-step's noise, the evaluation noise) seeds a generator of its own with
``derive_seed(seed, use, ...)``: a draw then depends only on what names it, never on what ran before
it, so a resumed run or a run on another number of ranks draws exactly the same numbers.
"""
from __future__ import annotations

import hashlib
import random

import numpy as np
import torch


def derive_seed(seed: int, *parts: str | int) -> int:
    """A 63-bit seed for one use of ``seed``, named by ``parts`` (e.g. ``"train", step, slot``).
    A hash, not arithmetic: nearby seeds and indices give unrelated streams."""
    name = ":".join(str(p) for p in (seed, *parts))
    return int.from_bytes(hashlib.blake2b(name.encode(), digest_size=8).digest(), "little") >> 1


def seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed)
