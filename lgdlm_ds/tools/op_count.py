"""Aten ops per training step: every op one TrainStep dispatches, counted in forward and backward.

    python -m lgdlm_ds.tools.op_count [--recipe RECIPE.yaml] [--top N] [--time STEPS] [section.key=value ...]

On a GPU each op is at least one kernel launch, so at small micro-batches the op count, not the
FLOPs, bounds the step time. The count does not depend on the width, so without a recipe the
model is built small (width 32, 2 heads x 16, vocabulary 300, sequence 16, latent 8) at the
configured depth, streams and objective (defaults: 24 blocks, 2 streams, cycle_vae, micro-batch
4); a recipe keeps its shape. Either runs on the CPU on synthetic data; overrides change anything.
``--time STEPS`` also times STEPS more steps (medians of wall and CPU time). The last line printed
is one JSON object.
"""
from __future__ import annotations

import argparse
import collections
import json
import statistics
import sys
import time

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.data import default_collate

from .. import cli
from ..config import load_config
from ..data import build_dataset
from ..model import build_model
from ..objectives import TrainStep

SMALL = ["model.hidden_size=32", "model.cond_dim=32", "model.attn_heads=2", "model.attn_dim_head=16",
         "model.vocab_size=300", "model.max_seq_len=16", "model.latent_dim=8"]
SYNTHETIC = ["data.kind=synthetic", "data.path=", "data.corpus=", "data.standardize_latents=false"]


class OpCounter(TorchDispatchMode):
    """Counts every aten op dispatched while active, by name."""

    def __init__(self):
        super().__init__()
        self.ops: collections.Counter[str] = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[str(func.overloadpacket)] += 1
        return func(*args, **(kwargs or {}))

    @property
    def total(self) -> int:
        return sum(self.ops.values())


def step_ops(step: TrainStep, batch: dict, at_step: int = 1) -> tuple[OpCounter, OpCounter]:
    """(forward, backward) op counters of one training step."""
    with OpCounter() as forward:
        loss, _ = step(batch, at_step)
    with OpCounter() as backward:
        loss.backward()
    return forward, backward


def _run(args: argparse.Namespace) -> None:
    cfg = load_config(args.recipe, ([] if args.recipe else SMALL) + SYNTHETIC + args.overrides)
    torch.manual_seed(cfg.training.seed)
    step = TrainStep(build_model(cfg.model), cfg)
    ds = build_dataset(cfg, "train")
    batch = default_collate([ds[i] for i in range(cfg.training.micro_batch_size)])
    forward, backward = step_ops(step, batch)
    m = cfg.model
    out = {"forward_ops": forward.total, "backward_ops": backward.total, "step_ops": forward.total + backward.total,
           "loss_type": cfg.loss.loss_type, "n_blocks": m.n_blocks, "num_residual_streams": m.num_residual_streams,
           "fused_hyper_connections": m.fused_hyper_connections, "micro_batch_size": cfg.training.micro_batch_size}
    if args.top:
        both = forward.ops + backward.ops
        for name, n in both.most_common(args.top):
            print(f"{n:>8}  {name}")
    if args.time:  # wall and CPU time: on a shared machine the CPU time is the steadier one
        wall, cpu = [], []
        for _ in range(args.time):
            step.zero_grad(set_to_none=True)
            start, start_cpu = time.perf_counter(), time.process_time()
            loss, _ = step(batch, 1)
            loss.backward()
            wall.append(time.perf_counter() - start)
            cpu.append(time.process_time() - start_cpu)
        out |= {"step_time_s": statistics.median(wall), "step_cpu_s": statistics.median(cpu),
                "threads": torch.get_num_threads()}
    print(json.dumps(out))


def _count(text: str) -> int:
    if not text.isdigit():
        raise argparse.ArgumentTypeError(f"expects a whole number >= 0, got {text!r}")
    return int(text)


def main(argv: list[str] | None = None) -> int:
    parser = cli.parser("tools.op_count", __doc__.split("\n\n")[0])
    parser.add_argument("--recipe", default=None, help="recipe YAML to start from (default: the config defaults)")
    parser.add_argument("--top", type=_count, default=0, metavar="N", help="also print the N most frequent ops")
    parser.add_argument("--time", type=_count, default=0, metavar="STEPS",
                        help="also time STEPS steps (median wall and CPU time)")
    cli.add_overrides(parser, of="the model and objective")
    return cli.run(_run, parser.parse_intermixed_args(argv))


if __name__ == "__main__":
    sys.exit(main())
