"""ZeRO-3 parameter traffic of one cycle_vae step: naive four calls vs the stage-fused path.

Launched by ``lgdlm_ds.tools.bench`` as ``deepspeed --num_gpus 2 --module lgdlm_ds.tools.bench_zero3``.
With ``stage3_max_reuse_distance: 0`` (what a model too large to stay gathered gets) every
forward call of a module re-gathers its parameters, so the forward all-gather volume per step is
(number of model calls) x model size. DeepSpeed's comms logger counts the all-gathers; the first
step is a warm-up (the prefetch trace is recorded there).
"""
from __future__ import annotations

import argparse
import json

import deepspeed
import torch
from deepspeed import comm as dist
from torch.utils.data import default_collate

from .. import shm_names
from ..data import SyntheticDataset
from ..model import build_model
from .bench import Sizes, bench_config, make_step


def _allgather_totals() -> tuple[int, int]:
    """(calls, bytes) of every all-gather flavour the comms logger has recorded so far."""
    calls = nbytes = 0
    for name, by_size in dist.comms_logger.comms_dict.items():
        if "all_gather" in name or "allgather" in name:
            for size, record in by_size.items():
                calls += record[0]
                nbytes += record[0] * size
    return calls, nbytes


def traffic(variant: str, sizes: Sizes) -> dict:
    cfg = bench_config(sizes, "cycle" if variant == "cycle" else "naive")
    torch.manual_seed(0)
    model = build_model(cfg.model)
    model_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    ds_config = {
        "train_micro_batch_size_per_gpu": sizes.batch, "gradient_accumulation_steps": 1,
        "gradient_clipping": 1.0, "steps_per_print": 10**9, "wall_clock_breakdown": False,
        "optimizer": {"type": "AdamW", "params": {"lr": 1e-4, "torch_adam": True}},
        "zero_optimization": {"stage": 3, "stage3_max_reuse_distance": 0, "stage3_param_persistence_threshold": 0,
                              "stage3_prefetch_bucket_size": 0},
        "comms_logger": {"enabled": True, "verbose": False, "prof_all": True, "debug": False},
    }
    engine, *_ = deepspeed.initialize(model=make_step(variant, model, cfg), config=ds_config)
    ds = SyntheticDataset(cfg, "train")
    rank = dist.get_rank()
    batch = default_collate([ds[rank * sizes.batch + i] for i in range(sizes.batch)])
    result = {}
    for step in range(2):
        before = _allgather_totals()
        loss, _ = engine(batch, step)
        after = _allgather_totals()
        engine.backward(loss)
        engine.step()
        # The logger counts each rank's share of a gather; the model is gathered in full.
        result = {"calls": after[0] - before[0],
                  "bytes_vs_model": (after[1] - before[1]) * dist.get_world_size() / model_bytes}
    return result


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--sizes", required=True)
    ap.add_argument("--local_rank", type=int, default=0)
    args = ap.parse_args()
    sizes = Sizes(**json.loads(args.sizes))
    deepspeed.init_distributed()
    shm_names.release(dist)
    naive, cycle = traffic("naive", sizes), traffic("cycle", sizes)
    if dist.get_rank() == 0:
        with open(args.out, "w") as f:
            json.dump({"naive_allgather_bytes_vs_model": naive["bytes_vs_model"],
                       "naive_allgather_calls": naive["calls"],
                       "cycle_allgather_bytes_vs_model": cycle["bytes_vs_model"],
                       "cycle_allgather_calls": cycle["calls"]}, f)


if __name__ == "__main__":
    main()
