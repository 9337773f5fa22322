"""The DeepSpeed JSON a run uses: read, checked, and completed from the recipe.

The recipe owns the batch (micro-batch, accumulation) and the optimiser and schedule; the JSON owns
ZeRO, precision and clipping. So one JSON serves any number of GPUs, and a JSON that tries to own
what the recipe owns is refused, as is anything whose meaning moved between DeepSpeed versions
unless it is written out.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .config import Config, ConfigError
from .plan import ObjectivePlan

REPO_ROOT = Path(__file__).resolve().parent.parent

# Defaults that changed between DeepSpeed releases (0.19.3 alone moved the first and the last):
# a JSON that relies on them trains differently depending on the installed version.
EXPLICIT_KEYS = ("gradient_clipping", "steps_per_print", "wall_clock_breakdown")

# Keys the engine fills in or builds itself; the message says where they live instead.
RECIPE_OWNED = {
    "train_batch_size": "the global batch is micro_batch_size x gradient_accumulation_steps x ranks; "
                        "set training.micro_batch_size and training.gradient_accumulation_steps",
    "train_micro_batch_size_per_gpu": "set training.micro_batch_size in the recipe",
    "gradient_accumulation_steps": "set training.gradient_accumulation_steps in the recipe",
    "optimizer": "the engine builds AdamW from training.lr, betas, eps and weight_decay",
    "scheduler": "the engine builds the warmup + cosine schedule from training.lr, warmup_steps and "
                 "min_lr_ratio",
}


def resolve_ds_config_path(name: str) -> Path:
    """A relative path is looked up in the working directory, then in the repository."""
    path = Path(name)
    if path.is_absolute() or path.is_file():
        return path
    return REPO_ROOT / path


def _find_auto(node: Any, where: str) -> str | None:
    if node == "auto":
        return where
    if isinstance(node, dict):
        for key, value in node.items():
            found = _find_auto(value, f"{where}.{key}" if where else key)
            if found:
                return found
    return None


def _fail(path: Path, message: str) -> ConfigError:
    return ConfigError(f"training.ds_config '{path}': {message}")


def load_ds_config(cfg: Config) -> dict:
    """The JSON named by ``training.ds_config``, checked, with the recipe's batch injected."""
    path = resolve_ds_config_path(cfg.training.ds_config)
    if not path.is_file():
        raise _fail(path, "file not found (see ds_configs/ for the shipped ones).")
    try:
        ds = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise _fail(path, f"not valid JSON: {e}.") from e
    if not isinstance(ds, dict):
        raise _fail(path, "must be a JSON object.")
    for key, where in RECIPE_OWNED.items():
        if key in ds:
            raise _fail(path, f"remove '{key}': {where}.")
    auto = _find_auto(ds, "")
    if auto:
        raise _fail(path, f"'{auto}' is \"auto\"; only the Hugging Face integration fills \"auto\" in, "
                          "raw DeepSpeed silently drops it. Write the value.")
    missing = [k for k in EXPLICIT_KEYS if k not in ds]
    if missing:
        raise _fail(path, f"set {', '.join(missing)} explicitly (their defaults changed between DeepSpeed "
                          "versions; see ds_configs/README.md).")
    if ds.get("fp16", {}).get("enabled", False):
        raise _fail(path, "fp16 is not supported (LGDLM trains in bf16 or fp32); use a bf16 JSON.")
    bf16 = ds.get("bf16", {})
    if bf16.get("enabled", False) and bf16.get("check_grad_overflow") is not True:
        raise _fail(path, "bf16 needs \"check_grad_overflow\": true, written out: the skip policy relies on "
                          "DeepSpeed refusing a step whose gradient norm is not finite.")
    ds["train_micro_batch_size_per_gpu"] = cfg.training.micro_batch_size
    # DeepSpeed counts micro-steps: the stage-wise cycle_vae takes more than one per micro-batch.
    ds["gradient_accumulation_steps"] = (cfg.training.gradient_accumulation_steps
                                         * ObjectivePlan.from_config(cfg).micro_steps_per_batch)
    return ds


def offloads_optimizer(ds: dict) -> bool:
    return ds.get("zero_optimization", {}).get("offload_optimizer", {}).get("device", "none") in ("cpu", "nvme")
