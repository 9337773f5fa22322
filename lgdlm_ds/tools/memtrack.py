"""Exact memory accounting on any device, CPU included (RSS is too noisy to compare designs).

``LiveBytes`` follows every tensor storage created inside it and reports the peak of their live
bytes; tensors that existed before (parameters, preallocated gradients) are not counted, so the
peak of a forward+backward is its non-model memory: activations, logits, temporaries. It works
on the meta device too, which counts a model's activations at any size without allocating them.
"""
from __future__ import annotations

import weakref
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves


class LiveBytes(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.live = 0
        self.peak = 0
        self._seen: set[int] = set()

    def _free(self, key: int, nbytes: int) -> None:
        self.live -= nbytes
        self._seen.discard(key)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        # Views and in-place results share an input's storage: nothing new was allocated (and a
        # view of a parameter must not count the parameter).
        inputs = {t.untyped_storage()._cdata for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                storage = t.untyped_storage()
                key, nbytes = storage._cdata, storage.nbytes()
                if key not in self._seen and key not in inputs and nbytes:
                    self._seen.add(key)
                    self.live += nbytes
                    self.peak = max(self.peak, self.live)
                    # Fires when the storage itself is freed, whichever tensor held it last.
                    weakref.finalize(storage, self._free, key, nbytes)
        return out

