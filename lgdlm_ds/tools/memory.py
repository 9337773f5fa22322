"""Will a recipe fit? Per-GPU memory of model states (each ZeRO stage) plus activations.

    python -m lgdlm_ds.memory RECIPE.yaml [section.key=value ...] --gpus 8 --gpu-mem 80 [--nodes 1]

Model states come from DeepSpeed's estimators (parameters, gradients, fp32 master weights and
Adam moments, as partitioned by each stage). Activations are not in those estimators, and for a
four-pass objective they dominate. They are counted exactly for the trunk: the model's forward and
backward run on the meta device (no memory) under ``LiveBytes``, which gives what the forward
leaves alive for backward and the backward's peak, for the recipe's sizes and memory mode. The
objective then decides how many such calls are alive at once (cycle_vae: two stages of
2 x micro-batch rows, one at a time in the stage-wise mode), and the chunked text head adds its
buffers. ``python -m lgdlm_ds.bench`` compares the prediction with measured peaks.
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import sys

import torch

from .. import cli
from ..config import Config, ModelConfig, load_config
from ..ds_config import load_ds_config
from ..model import build_model, parameter_counts
from ..plan import ObjectivePlan
from ..text_head import CHUNK_ELEMENTS
from .memtrack import LiveBytes

GIB = 2**30
# Share of GPU memory kept free for the CUDA context, allocator fragmentation and communication buffers.
RESERVE = 0.10


def _shape(model_cfg: ModelConfig) -> tuple:
    """The model's fields as a cache key; the warm-start keys (a path, a list) do not change its memory."""
    return dataclasses.astuple(dataclasses.replace(model_cfg, init_from="", init_fresh_keys=()))


@functools.lru_cache(maxsize=None)
def _parameters(model_fields: tuple) -> tuple[int, int]:
    """(parameter count, largest parameter) of the model, built on the meta device once."""
    model = build_model(ModelConfig(*model_fields), device="meta")
    return parameter_counts(model)["total_params"], max(p.numel() for p in model.parameters())


@functools.lru_cache(maxsize=None)
def _trunk_profile(model_fields: tuple, rows: int, dtype: torch.dtype = torch.float32) -> tuple[int, int]:
    """(bytes the trunk's forward leaves alive for backward, peak bytes during forward+backward)
    for one model call on ``rows`` rows, run on the meta device. Gradients exist before the
    measured call, as in training (they are model states, accumulated in place)."""
    model_cfg = ModelConfig(*model_fields)
    if model_cfg.n_blocks > 2:
        # Blocks are identical: profile one and two, and extrapolate what each block adds to the
        # memory alive after forward (the backward's peak rides on top of all of it).
        one = _trunk_profile(_shape(dataclasses.replace(model_cfg, n_blocks=1)), rows, dtype)
        two = _trunk_profile(_shape(dataclasses.replace(model_cfg, n_blocks=2)), rows, dtype)
        per_block = two[0] - one[0]
        extra = (model_cfg.n_blocks - 2) * per_block
        return two[0] + extra, two[1] + extra
    model = build_model(model_cfg, device="meta").to(dtype)
    seq = model_cfg.max_seq_len
    ids = torch.zeros(rows, seq, dtype=torch.long, device="meta")
    z = torch.zeros(rows, model_cfg.latent_dim, device="meta", dtype=dtype)
    t = torch.zeros(rows, device="meta")
    mask = torch.ones(rows, seq, dtype=torch.bool, device="meta")

    def forward_backward(live: LiveBytes | None = None) -> int:
        text, latent = model.trunk(ids, z, t, t, mask)
        after_forward = live.live if live else 0
        (text.sum() + latent.sum()).backward()
        return after_forward

    forward_backward()
    with LiveBytes() as live:
        after_forward = forward_backward(live)
    return after_forward, live.peak


def predict_other_bytes(cfg: Config, micro_batch: int, fill: float = 1.0, dtype: torch.dtype = torch.float32) -> int:
    """Peak non-model memory (activations, head buffers, temporaries) of one micro-step.
    ``fill`` is the share of real (non-padding) tokens; 1.0 is the worst case. ``dtype``: the
    precision the model computes in (bf16 under the bf16 DeepSpeed JSONs)."""
    plan = ObjectivePlan.from_config(cfg)
    alive, trunk_peak = _trunk_profile(_shape(cfg.model), plan.rows_per_call(micro_batch), dtype)
    h, seq, vocab = cfg.model.hidden_size, cfg.model.max_seq_len, cfg.model.vocab_size
    positions = int(micro_batch * seq * fill)  # text positions supervised per model call, at most
    # The chunked CE computes its gradients in forward and keeps them for backward: one row per
    # supervised position and an fp32 weight-sized gradient. While it runs forward it also holds a
    # chunk of fp32 logits and a weight-sized product; its backward, one weight-sized gradient.
    weight_grad = vocab * h * 4
    stage = alive + positions * h * dtype.itemsize + weight_grad
    head = min(max(1, CHUNK_ELEMENTS // vocab), positions) * vocab * 4 + weight_grad
    if plan.stages_per_micro_step == 1:  # one model call's graph at a time
        return int(max(stage + head, trunk_peak))
    # Both stages in one graph: stage 2's backward runs while stage 1 is still saved, and every
    # parameter gradient it produces is held by autograd until stage 1's contribution is added.
    grads = _parameters(_shape(cfg.model))[0] * dtype.itemsize
    return int(max(2 * stage + head, stage + trunk_peak, stage + grads + weight_grad, grads + trunk_peak))


def model_state_bytes(total_params: int, largest_layer: int, gpus: int, nodes: int) -> dict[str, float]:
    """Per-GPU bytes of model states for ZeRO-0/2/3 and ZeRO-3 with CPU offload (DeepSpeed's estimators)."""
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

    return {
        "zero0": estimate_zero2_model_states_mem_needs(total_params, 1, 1, cpu_offload=False)[1],
        "zero2": estimate_zero2_model_states_mem_needs(total_params, gpus, nodes, cpu_offload=False)[1],
        "zero3": estimate_zero3_model_states_mem_needs(total_params, largest_layer, gpus, nodes,
                                                       cpu_offload=False, cpu_offload_params=False)[1],
        "zero3_offload": estimate_zero3_model_states_mem_needs(total_params, largest_layer, gpus, nodes,
                                                               cpu_offload=True, cpu_offload_params=True)[1],
    }


def _largest_micro_batch(cfg: Config, free: float, dtype: torch.dtype) -> int:
    """Largest micro-batch whose activations fit in ``free`` bytes. Activations grow linearly
    with it once its size-independent buffers are outweighed: extrapolate from two sizes, then
    step to the exact answer."""
    predict = lambda mb: predict_other_bytes(cfg, mb, dtype=dtype)  # noqa: E731
    if free <= 0 or predict(1) > free:
        return 0
    base = max(4, cfg.training.micro_batch_size)
    slope = max((predict(2 * base) - predict(base)) / base, 1.0)
    guess = max(1, base + int((free - predict(base)) // slope))
    if predict(guess) <= free:
        while predict(guess + 1) <= free:
            guess += 1
    else:
        while guess > 1 and predict(guess) > free:
            guess -= 1
    return guess


def report(cfg: Config, gpus: int, gpu_mem_gib: float, nodes: int = 1) -> dict:
    total, largest = _parameters(_shape(cfg.model))
    budget = gpu_mem_gib * GIB * (1 - RESERVE)
    mb = cfg.training.micro_batch_size
    dtype = torch.bfloat16 if load_ds_config(cfg).get("bf16", {}).get("enabled") else torch.float32
    other = predict_other_bytes(cfg, mb, dtype=dtype)
    stages = {}
    for stage, states in model_state_bytes(total, largest, gpus, nodes).items():
        stages[stage] = {"model_states_gib": states / GIB, "activations_gib": other / GIB,
                         "total_gib": (states + other) / GIB, "fits": states + other <= budget,
                         "max_micro_batch": _largest_micro_batch(cfg, budget - states, dtype)}
    return {"total_params": total, "micro_batch_size": mb, "compute_dtype": str(dtype).removeprefix("torch."), "gpus": gpus * nodes, "gpu_mem_gib": gpu_mem_gib,
            "reserve": RESERVE, "memory_mode": ("ac" if cfg.model.activation_checkpointing else "plain")
            + ("+stagewise" if cfg.loss.cycle_stagewise else ""), "stages": stages}


def main(argv: list[str] | None = None) -> int:
    parser = cli.parser("memory", __doc__)
    parser.add_argument("recipe", help="recipe YAML")
    cli.add_overrides(parser)
    parser.add_argument("--gpus", type=int, required=True, help="GPUs per node")
    parser.add_argument("--gpu-mem", type=float, required=True, help="memory of one GPU in GiB")
    parser.add_argument("--nodes", type=int, default=1, help="nodes (default 1)")
    args = parser.parse_intermixed_args(argv)
    if args.gpus < 1 or args.nodes < 1 or args.gpu_mem <= 0:
        parser.error("--gpus and --nodes must be >= 1 and --gpu-mem > 0.")
    return cli.run(_memory, args)


def _memory(args: argparse.Namespace) -> None:
    r = report(load_config(args.recipe, args.overrides), args.gpus, args.gpu_mem, args.nodes)
    size = f"{r['total_params'] / 1e9:.2f}B" if r["total_params"] >= 1e9 else f"{r['total_params'] / 1e6:.1f}M"
    print(f"{size} parameters, micro-batch {r['micro_batch_size']}, {r['compute_dtype']}, "
          f"{r['memory_mode']}, "
          f"{r['gpus']} x {r['gpu_mem_gib']:g} GiB ({RESERVE:.0%} reserved)")
    print(f"{'stage':<15}{'states GiB':>11}{'activ. GiB':>11}{'total GiB':>11}{'fits':>6}{'max micro-batch':>17}")
    for stage, s in r["stages"].items():
        print(f"{stage:<15}{s['model_states_gib']:>11.1f}{s['activations_gib']:>11.1f}{s['total_gib']:>11.1f}"
              f"{'yes' if s['fits'] else 'no':>6}{s['max_micro_batch']:>17}")
    print(json.dumps(r))


if __name__ == "__main__":
    sys.exit(main())
