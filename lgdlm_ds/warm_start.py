"""Warm start: a fresh model takes the weights of ``model.init_from``.

Weights only; the optimizer state, learning-rate schedule and progress are what
``training.resume`` restores, and a run resuming from its own checkpoint never applies
``model.init_from`` again (trainer.py decides). The source is any path ``loading.read_saved``
reads, unpickled without running code it may carry. Every tensor is matched before any is loaded
(weights_report.py): a missing or misshapen weight is an error unless ``model.init_fresh_keys``
names it, an unexpected one unless it is one of the older trainer's text noise schedule buffers
or a pattern names it. ``build_model`` logs the report; the trainer also writes it into the run
directory as ``init_report.json``.
"""
from __future__ import annotations

import sys

import torch

from .config import ModelConfig
from .loading import LoadError, read_saved
from .model import LGDLM, build_model
from .partitioned import is_partitioned
from .partitioned import load as load_partitioned
from .weights_report import SavedWeights, WeightsReport, loaded_state, match

REPORT_FILE = "init_report.json"


def apply_init_from(model: LGDLM, cfg: ModelConfig) -> WeightsReport:
    """Load the weights of ``cfg.init_from`` into ``model`` (built from ``cfg``) and say what was
    loaded, what starts fresh and what was ignored. Raises LoadError, before changing any weight,
    when the source does not fit. A model built partitioned (ZeRO-3, partitioned.py) takes them
    from rank 0, the only rank that reads the source: one copy of it in memory, not one per rank;
    every rank returns rank 0's report, or raises its error. Call it on every rank then."""
    if is_partitioned(model):
        return _apply_partitioned(model, cfg)
    saved, report = _fitting(model, cfg)
    with torch.no_grad():
        result = model.load_state_dict(loaded_state(saved, report, model), strict=False)
    assert not result.unexpected_keys and set(result.missing_keys) == set(report.missing) | set(report.mismatched)
    return report


def _fitting(model: LGDLM, cfg: ModelConfig) -> tuple[SavedWeights, WeightsReport]:
    """The weights of ``cfg.init_from`` and how they fit ``model`` (the shapes of its state dict);
    LoadError when they do not."""
    try:
        saved = read_saved(cfg.init_from, cfg)
    except LoadError as e:
        raise LoadError(f"model.init_from: {e}") from e
    report = match(saved, model, cfg.init_fresh_keys)
    if problems := report.problems():
        raise LoadError(
            f"model.init_from: {report.source} ({report.kind}) does not fit the configured model: "
            f"{'; '.join(problems)}. Set model.* to the shape of the model that wrote it (the older checkpoints: "
            "attn_heads 8, attn_dim_head 64, qk_norm false), or let the weights named above start fresh with "
            "model.init_fresh_keys (glob patterns of parameter names, e.g. ['latent_head.*']).")
    return saved, report


def _apply_partitioned(model: LGDLM, cfg: ModelConfig) -> WeightsReport:
    from deepspeed import comm as dist
    saved, outcome = None, [None, None]  # rank 0's report, or its error
    if dist.get_rank() == 0:
        # A partitioned model's tensors are empty placeholders; the shapes are the same model's on
        # the meta device (built on a forked generator: the run's draws stay what they were).
        with torch.random.fork_rng(devices=[]):
            shapes = build_model(cfg, device="meta", warm_start=False)
        try:
            saved, outcome[0] = _fitting(shapes, cfg)
        except LoadError as e:
            outcome[1] = str(e)
    dist.broadcast_object_list(outcome, src=0)
    report, error = outcome
    if error is not None:
        raise LoadError(error)
    load_partitioned(model, None if saved is None else loaded_state(saved, report, model), report.loaded)
    return report


def log(message: str) -> None:
    print(f"init_from: {message}", file=sys.stderr, flush=True)
