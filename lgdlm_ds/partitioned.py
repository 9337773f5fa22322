"""The model built and warm-started partitioned, under ZeRO-3: no rank ever holds all of it.

Built whole, every rank would hold the model in fp32 (4 bytes per parameter: 29 GB per rank for
7.2B parameters, 230 GB on an 8-GPU node) before DeepSpeed shards it. Under a ZeRO-3 JSON
``build_model(cfg, ds_config=...)`` builds it inside ``construction``, DeepSpeed's
``deepspeed.zero.Init`` with two changes that keep one seed -> one model (every rank ends up with
its share of exactly the weights a whole build draws):

- Partitioned per unit, not per module. ``zero.Init`` partitions each module as soon as its own
  ``__init__`` returns, but the MMDiT's blocks initialise their children's weights after building
  them (``nn.init.zeros_(cond_linear.weight)``), which would then write into an empty placeholder
  and leave the random values in place. Here all parameters of a unit (model.PARTITION_UNITS: an
  MMDiT block, the text encoder, the text head, ...) are partitioned once the unit is complete, so
  the most a rank holds whole is one unit.
- Drawn in fp32. Under a bf16 JSON ``zero.Init`` creates bf16 tensors and initialises them in bf16,
  which draws other numbers than an fp32 initialisation rounded to bf16 (what the engine does to a
  model built whole). Here every weight is drawn in fp32 and rounded to the JSON's dtype just
  before it is partitioned, as the engine would round it.

``load(model, state, names)`` writes weights (held by rank 0 only) into a partitioned model one
module at a time; warm_start.py reads ``model.init_from`` on rank 0 only and uses it.

DeepSpeed is imported when a partitioned model is built or loaded, not before (it takes seconds).
"""
from __future__ import annotations

import contextlib

from torch import Tensor, nn


def partitions_parameters(ds_config: dict | None) -> bool:
    """Whether the DeepSpeed JSON shards the parameters themselves (ZeRO-3)."""
    return ds_config is not None and ds_config.get("zero_optimization", {}).get("stage", 0) == 3


def is_partitioned(model: nn.Module) -> bool:
    """Whether ``model``'s parameters are ZeRO-3 partitions (DeepSpeed marks each with ``ds_id``)."""
    return any(hasattr(p, "ds_id") for p in model.parameters())


def construction(ds_config: dict | None, units: tuple[type[nn.Module], ...]) -> contextlib.AbstractContextManager:
    """Within it, modules are built partitioned when ``ds_config`` is a ZeRO-3 JSON (else it does
    nothing). ``units``: the module classes whose parameters are partitioned, all of them, when an
    instance is complete; parameters of no unit stay whole until a unit that contains them is."""
    if not partitions_parameters(ds_config):
        return contextlib.nullcontext()
    import deepspeed
    from deepspeed.runtime.zero.partition_parameters import DeepSpeedTensorOverride

    class UnitInit(deepspeed.zero.Init):
        def _post_init_method(self, module: nn.Module) -> None:
            if not isinstance(module, units):
                return
            for sub in module.modules():
                whole = [p for p in sub.parameters(recurse=False) if not hasattr(p, "ds_id")]
                for p in whole:
                    if p.is_floating_point():
                        p.data = p.data.to(self.dtype)
                if whole:
                    super()._post_init_method(sub)

    # Only the device of new tensors is overridden, not their dtype: the draws stay fp32.
    return UnitInit(config_dict_or_path=ds_config, tensor_overrides=[DeepSpeedTensorOverride.device])


def load(model: nn.Module, state: dict[str, Tensor] | None, names: list[str]) -> None:
    """Copy the weights ``names`` into the partitioned ``model``, from ``state``, which rank 0 holds
    (other ranks pass None). Module by module, every rank gathers that module's weights, rank 0
    writes them, and DeepSpeed partitions rank 0's values again. The model's state dict holds
    parameters only (no persistent buffers), so there is nothing else to load."""
    from deepspeed import comm as dist
    from deepspeed import zero
    wanted = set(names)
    if unknown := wanted - {name for name, _ in model.named_parameters()}:
        raise KeyError(f"not parameters of the model: {', '.join(sorted(unknown))}")
    for prefix, module in model.named_modules():
        own = [(f"{prefix}.{n}" if prefix else n, p) for n, p in module.named_parameters(recurse=False)]
        own = [(name, p) for name, p in own if name in wanted]
        if own:
            with zero.GatheredParameters([p for _, p in own], modifier_rank=0):
                if dist.get_rank() == 0:
                    for name, p in own:
                        p.data.copy_(state[name])
