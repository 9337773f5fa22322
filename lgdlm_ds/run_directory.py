"""Whether a run may write into ``logging.run_dir``: checked before DeepSpeed starts, changing nothing.

The directory must be a directory (or not exist yet, below a writable one) and must not hold
another run. A run directory belongs to one model: the ``config.yaml`` a run writes when it starts
names the model whose checkpoints and log the directory holds. A run of a model with other
parameter shapes would resume checkpoints that do not fit it, or append its log to another model's,
so it is refused, whether it starts fresh or resumes, and the directory is left as it is. What else
a recipe says (learning rate, steps, data, the DeepSpeed JSON) may change between the starts of one
run, as may the model keys that change no shape (dropout, activation checkpointing, the warm start).
"""
from __future__ import annotations

import os
from pathlib import Path

import torch

from .config import Config, ConfigError, ModelConfig, load_config
from .loading import CONFIG_FILE
from .model import build_model

# Read only when a run starts fresh: a difference here is no other model.
_START_ONLY_KEYS = ("init_from", "init_fresh_keys")


def check_run_directory(cfg: Config, resuming: bool) -> None:
    """Refuse (ConfigError naming logging.run_dir and the fix) a run directory that is not a
    writable directory, or whose config.yaml describes a model of other shapes. ``resuming``: the
    run continues from a checkpoint (the message says what that means)."""
    run_dir = Path(cfg.logging.run_dir)
    existing = next(p for p in (run_dir, *run_dir.absolute().parents) if p.exists())
    if not existing.is_dir():
        raise ConfigError(f"config key 'logging.run_dir': '{run_dir}' cannot be a directory: {existing} exists and "
                          "is not one. Choose another logging.run_dir.")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(f"config key 'logging.run_dir': '{run_dir}' is not writable (no write permission on "
                          f"{existing}). Choose a writable logging.run_dir, or give this user write access.")
    stored = run_dir / CONFIG_FILE
    if not stored.is_file():
        return
    try:
        theirs = load_config(stored).model
    except ConfigError as e:
        raise ConfigError(f"config key 'logging.run_dir': {stored} cannot be read ({e}); it says which run "
                          f"{run_dir} holds. Fix it, or choose another logging.run_dir.") from e
    difference = _shape_difference(theirs, cfg.model)
    if difference is None:
        return
    if resuming:
        raise ConfigError(f"config key 'logging.run_dir': the checkpoints in {run_dir} are of a model of other "
                          f"shapes ({difference}; {stored}), so they cannot be resumed with this recipe. Resume "
                          "them with that model's model.* keys, or choose another logging.run_dir for this model.")
    raise ConfigError(f"config key 'logging.run_dir': {run_dir} holds another run, of a model of other shapes "
                      f"({difference}; {stored}). Choose another logging.run_dir; this one is left as it is.")


def _shapes(model: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Parameter name -> shape of the model ``model`` describes (built on the meta device: no memory;
    on a forked generator: a check draws nothing from the run's)."""
    with torch.random.fork_rng(devices=[]):
        return {n: tuple(p.shape) for n, p in build_model(model, device="meta").named_parameters()}


def _shape_difference(theirs: ModelConfig, ours: ModelConfig) -> str | None:
    """None when both configs describe the same parameter shapes; else the model keys that differ
    ("model.KEY: THEIRS there, OURS here"), or, when no key does, the first parameter that differs."""
    their_shapes, our_shapes = _shapes(theirs), _shapes(ours)
    if their_shapes == our_shapes:
        return None
    keys = [f"model.{k}: {getattr(theirs, k)!r} there, {getattr(ours, k)!r} here"
            for k in vars(ours) if k not in _START_ONLY_KEYS and getattr(theirs, k) != getattr(ours, k)]
    if keys:
        return "; ".join(keys)
    name = next(n for n in {**their_shapes, **our_shapes} if their_shapes.get(n) != our_shapes.get(n))
    return f"parameter {name}: {their_shapes.get(name)} there, {our_shapes.get(name)} here"
