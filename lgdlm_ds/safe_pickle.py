"""Unpickling files that may come from someone else, without running their code.

A pickle names the functions and classes that rebuild its objects, and unpickling calls them: a
file read with ``torch.load(weights_only=False)`` can run anything it names (``os.system``,
``eval``, ``subprocess.Popen``). Every torch file this package reads weights from (a weights file,
an older ``checkpoint.pt``, a DeepSpeed checkpoint read by evaluate, sample, export or
``model.init_from``) goes through ``load``, whose unpickler admits only:

- tensors and their storages (torch's own rebuild functions), ``torch.Size``, torch dtypes;
- containers (``OrderedDict``, ``set``, ``frozenset``; dicts, lists and tuples need no name) and
  bytes (``_codecs.encode`` with latin1, how protocol 2 writes them);
- numpy arrays, dtypes and scalars (DeepSpeed's client state holds numpy's RNG state);
- the three DeepSpeed classes its ZeRO checkpoints hold (``ALLOWED``).

Any other name becomes an inert ``Unavailable`` placeholder, recorded in ``Loaded.unavailable``:
the older trainer pickled its training state as a dataclass, whose class this package does not
have (or, where the older code is installed, must not import). A placeholder is never imported;
building an instance the way pickle rebuilds a dataclass (``__new__``, then its state) runs nothing
and drops the state. Calling a name is how a pickle runs code (``os.system(...)``), so calling the
placeholder of a name that exists here raises ``UnsafePickleError`` naming it, before anything ran.

Not covered: a run resuming from its own checkpoints (``training.resume``) goes through DeepSpeed's
``load_checkpoint``, which unpickles fully; those files are the run's own output.
"""
from __future__ import annotations

import _compat_pickle
import contextlib
import importlib
import importlib.util
import pickle
import sys
import types
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import torch

# (module, name) -> what the pickle may call or instantiate under that name.
ALLOWED: dict[tuple[str, str], str] = {
    **{("torch._utils", n): "tensor" for n in ("_rebuild_tensor", "_rebuild_tensor_v2", "_rebuild_parameter",
                                               "_rebuild_parameter_with_state")},
    ("torch._tensor", "_rebuild_from_type_v2"): "tensor",
    ("torch", "Tensor"): "tensor",
    ("torch.nn.parameter", "Parameter"): "tensor",
    ("torch", "Size"): "tensor shape",
    ("collections", "OrderedDict"): "container",
    ("builtins", "set"): "container",
    ("builtins", "frozenset"): "container",
    **{(m, n): "numpy array" for m in ("numpy.core.multiarray", "numpy._core.multiarray")
       for n in ("_reconstruct", "scalar")},
    ("numpy", "ndarray"): "numpy array",
    ("numpy", "dtype"): "numpy dtype",
    ("deepspeed.runtime.zero.config", "ZeroStageEnum"): "DeepSpeed ZeRO stage",
    ("deepspeed.runtime.fp16.loss_scaler", "LossScaler"): "DeepSpeed loss scaler",
    ("deepspeed.runtime.fp16.loss_scaler", "DynamicLossScaler"): "DeepSpeed loss scaler",
    ("deepspeed.utils.tensor_fragment", "fragment_address"): "DeepSpeed fragment address",
}


class UnsafePickleError(pickle.UnpicklingError):
    """A pickle that names something able to run code; the message names it."""


class Unavailable:
    """Stands in for an object whose class does not exist here. Building it runs nothing and its
    pickled state is dropped; ``pickled_as`` is the class the file named."""
    pickled_as = ""

    def __init__(self, *args, **kwargs):
        pass

    def __setstate__(self, state):
        pass

    def __repr__(self) -> str:
        return f"<{self.pickled_as}, not available here>"


def _latin1_bytes(text: str, encoding: str) -> bytes:
    """``_codecs.encode`` as pickle protocol 2 uses it for bytes; no other codec."""
    if encoding != "latin1":
        raise UnsafePickleError(f"the file asks for _codecs.encode with codec {encoding!r}; only 'latin1' "
                                "(how pickle stores bytes) is admitted.")
    return text.encode("latin1")


def _exists(module: str, name: str) -> bool:
    """Whether ``module.name`` names something here, found without importing anything."""
    if module in sys.modules:
        obj: Any = sys.modules[module]
        for part in name.split("."):
            obj = getattr(obj, part, None)
            if obj is None:
                return False
        return True
    try:
        return importlib.util.find_spec(module.partition(".")[0]) is not None
    except (ImportError, ValueError):
        return False


class RestrictedUnpickler(pickle.Unpickler):
    """Resolves only ``ALLOWED`` names (and torch dtypes); see the module docstring."""
    unavailable: list[str]

    def find_class(self, module: str, name: str):
        # Protocol 2 writes some names as Python 2 had them (subprocess.call as commands.call);
        # judge them by what they resolve to, as pickle's own find_class would.
        if (module, name) in _compat_pickle.NAME_MAPPING:
            module, name = _compat_pickle.NAME_MAPPING[(module, name)]
        else:
            module = _compat_pickle.IMPORT_MAPPING.get(module, module)
        if (module, name) == ("_codecs", "encode"):
            return _latin1_bytes
        if (module, name) in ALLOWED:
            return getattr(importlib.import_module(module), name)
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        qualified = f"{module}.{name}"
        self.unavailable.append(qualified)
        placeholder = {"pickled_as": qualified, "__module__": __name__}
        if _exists(module, name):
            placeholder["__init__"] = _refuse_call
        return type(name, (Unavailable,), placeholder)


def _refuse_call(self, *args, **kwargs):
    """``__init__`` of the placeholder of a name that exists here: reached when the pickle calls the
    name (pickle rebuilds a dataclass with ``__new__`` alone)."""
    raise UnsafePickleError(f"the file names {self.pickled_as}, which unpickling would call; only tensors, "
                            "containers, numpy arrays and DeepSpeed's checkpoint classes are admitted, so it was "
                            "refused before anything ran. Do not use a file you cannot trust; ask for its weights "
                            "as .safetensors.")


def _pickle_module(unavailable: list[str]) -> types.ModuleType:
    """A module in the shape torch.load's ``pickle_module`` expects, unpickling restrictedly and
    recording the unavailable classes in ``unavailable``."""
    class Unpickler(RestrictedUnpickler):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.unavailable = unavailable

    module = types.ModuleType("restricted_pickle")
    module.Unpickler = Unpickler
    module.load = lambda f, **kwargs: Unpickler(f, **kwargs).load()
    return module


@dataclass
class Loaded:
    """What ``load`` read: the object and the classes that became ``Unavailable`` placeholders."""
    obj: Any
    unavailable: list[str] = field(default_factory=list)


def load(path: str | Path, map_location: Any = "cpu", mmap: bool | None = None) -> Loaded:
    """``torch.load`` of ``path`` through the restricted unpickler. Tensors of a zip-format file are
    memory-mapped by default, so what is never used (an optimizer state) is never read."""
    unavailable: list[str] = []
    if mmap is None:
        mmap = zipfile.is_zipfile(path)
    obj = torch.load(path, map_location=map_location, weights_only=False, mmap=mmap,
                     pickle_module=_pickle_module(unavailable))
    return Loaded(obj, unavailable)


class _TorchWithRestrictedLoad:
    """torch, except that ``load`` unpickles restrictedly."""

    def __getattr__(self, name: str):
        return getattr(torch, name)

    @staticmethod
    def load(f, map_location=None, mmap=None, **_ignored):
        return load(f, map_location, mmap).obj


@contextlib.contextmanager
def restricted_loads_in(module: types.ModuleType) -> Iterator[None]:
    """Within the block, ``module``'s calls of ``torch.load`` go through ``load``. For DeepSpeed's
    zero_to_fp32, which reads the ZeRO shards with ``torch.load(weights_only=False)`` itself."""
    saved = module.torch
    module.torch = _TorchWithRestrictedLoad()
    try:
        yield
    finally:
        module.torch = saved
