"""The DeepSpeed JSON a run uses: read, checked, and completed from the recipe.

The recipe owns the batch (micro-batch, accumulation) and the optimiser and schedule; the JSON owns
ZeRO, precision and clipping. So one JSON serves any number of GPUs, and a JSON that tries to own
what the recipe owns is refused, as is anything whose meaning moved between DeepSpeed versions
unless it is written out.
"""
from __future__ import annotations

import difflib
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
    "train_batch_size": "the global batch is training.micro_batch_size x training.gradient_accumulation_steps "
                        "x ranks ({micro} x {accumulation} x ranks for this recipe), so that one JSON serves any "
                        "number of GPUs; set those two keys in the recipe",
    "train_micro_batch_size_per_gpu": "set training.micro_batch_size in the recipe",
    "gradient_accumulation_steps": "set training.gradient_accumulation_steps in the recipe",
    "optimizer": "the engine builds AdamW from training.lr, betas, eps and weight_decay",
    "scheduler": "the engine builds the warmup + cosine schedule from training.lr, warmup_steps and "
                 "min_lr_ratio",
    "activation_checkpointing": "DeepSpeed applies it only to a model that calls deepspeed.checkpointing, which "
                                "this one does not, so it would change nothing; set model.activation_checkpointing: "
                                "true in the recipe",
}

# The top-level keys these JSONs use. DeepSpeed ignores a key it does not know, so a typo of one of
# them (zero_optimisation) would silently train without it.
KNOWN_KEYS = ("zero_optimization", "bf16", "fp16", "data_types", "checkpoint", *EXPLICIT_KEYS)

# The smallest ZeRO stage that reads each offload section; a lower stage ignores it.
OFFLOAD_STAGE = {"offload_optimizer": 1, "offload_param": 3}


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
            where = where.format(micro=cfg.training.micro_batch_size, accumulation=cfg.training.gradient_accumulation_steps)
            raise _fail(path, f"remove '{key}': {where} (the JSON says {json.dumps(ds[key])}).")
    for key in ds:
        close = difflib.get_close_matches(key, KNOWN_KEYS, n=1, cutoff=0.8)
        if key not in KNOWN_KEYS and close:
            raise _fail(path, f"'{key}' is not a DeepSpeed key, and DeepSpeed ignores keys it does not know; "
                              f"did you mean '{close[0]}'?")
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
    if "load_universal" in ds.get("checkpoint", {}):
        raise _fail(path, "remove 'checkpoint.load_universal': the engine sets it itself when it resumes a "
                          "checkpoint saved by another number of ranks, which it converts to a universal one.")
    bf16 = ds.get("bf16", {})
    if bf16.get("enabled", False) and bf16.get("check_grad_overflow") is not True:
        raise _fail(path, "bf16 needs \"check_grad_overflow\": true, written out: the skip policy relies on "
                          "DeepSpeed refusing a step whose gradient norm is not finite.")
    _check_zero_and_precision(path, ds)
    ds["train_micro_batch_size_per_gpu"] = cfg.training.micro_batch_size
    # DeepSpeed counts micro-steps: the stage-wise cycle_vae takes more than one per micro-batch.
    ds["gradient_accumulation_steps"] = (cfg.training.gradient_accumulation_steps
                                         * ObjectivePlan.from_config(cfg).micro_steps_per_batch)
    return ds


def _check_zero_and_precision(path: Path, ds: dict) -> None:
    """zero_optimization and bf16 as DeepSpeed's own config models read them (unknown keys, types,
    values), and the combinations DeepSpeed ignores or refuses only once the engine is built."""
    from deepspeed.runtime.config import DtypeEnum
    from deepspeed.runtime.precision_config import DeepSpeedBF16Config
    from deepspeed.runtime.zero.config import DeepSpeedZeroConfig
    from pydantic import ValidationError
    zero = ds.get("zero_optimization", {})
    stage = zero.get("stage", 0) if isinstance(zero, dict) else None
    if stage not in (0, 1, 2, 3):
        raise _fail(path, f"'zero_optimization.stage' is {json.dumps(stage)}; the ZeRO stages are 0, 1, 2 and 3 "
                          "(ds_configs/README.md).")
    for section, model in (("zero_optimization", DeepSpeedZeroConfig), ("bf16", DeepSpeedBF16Config)):
        try:
            model(**ds.get(section, {}))
        except ValidationError as e:
            error = e.errors()[0]
            where = ".".join([section, *map(str, error["loc"])])
            raise _fail(path, f"'{where}': {error['msg']} (got {json.dumps(error['input'])}); see "
                              "ds_configs/README.md for every key.") from e
    for key, needs in OFFLOAD_STAGE.items():
        device = zero.get(key, {}).get("device", "none")
        if device != "none" and stage < needs:
            raise _fail(path, f"'zero_optimization.{key}' moves states to {device}, but ZeRO stage {stage} ignores "
                              f"it: it needs stage {needs if needs == 3 else '1, 2 or 3'}. Set zero_optimization.stage "
                              f"(ds_configs/zero3_offload_bf16.json offloads both), or remove {key}.")
    accumulation = ds.get("data_types", {}).get("grad_accum_dtype")
    try:
        accumulation = accumulation and DtypeEnum(accumulation)
    except ValueError as e:
        raise _fail(path, f"'data_types.grad_accum_dtype' is {json.dumps(accumulation)}; write fp32 or bf16.") from e
    if ds.get("bf16", {}).get("enabled", False) and stage == 0 and accumulation is DtypeEnum.fp32:
        raise _fail(path, "bf16 with ZeRO stage 0 accumulates gradients in bf16, and DeepSpeed refuses "
                          "'data_types.grad_accum_dtype' fp32 there once the engine is built. Remove data_types, or "
                          "use ZeRO-2 for fp32 accumulation (ds_configs/zero2_bf16.json).")


def offloads_optimizer(ds: dict) -> bool:
    return ds.get("zero_optimization", {}).get("offload_optimizer", {}).get("device", "none") in ("cpu", "nvme")
