"""Padding share and real-token throughput of training steps, without and with ``data.length_buckets``.

    python -m lgdlm_ds.tools.padding [--recipe RECIPE.yaml] [--buckets K[,K...]] [--steps N] [section.key=value ...]

On the recipe's training split (default: the smoke recipe, whose data is the embedded Lee news
corpus, prepared under data/ of the working directory on first use), for the data order without
buckets and with each K of ``--buckets``:
  padding_share   padded positions / all positions of the micro-batches after trimming each to its
                  longest row, over one epoch of one rank's data order (exact, no model)
  tokens_per_s    real tokens per second of the recipe's model and objective (no optimizer step):
                  forward + backward of every micro-batch of that epoch on the CPU, so that every
                  variant trains the same samples (``--steps N``: only the first N of each order,
                  different samples, so noisier), after one warm-up step; the variants' steps are
                  interleaved so that they share the machine's load, and both wall and CPU time are
                  reported (on a shared machine the CPU time is the steadier)
The last line printed is one JSON object, with each variant's ratios against the order without buckets.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from torch.utils.data import default_collate

from .. import cli
from ..batching import DataPosition, StepBatches
from ..config import load_config
from ..data import DataError, build_dataset
from ..model import build_model
from ..objectives import TrainStep

SMOKE = Path(__file__).resolve().parents[2] / "recipes" / "00_smoke" / "recipe.yaml"


def padding_share(lengths: torch.Tensor, micro_batches: list[list[int]]) -> float:
    """Padded positions / all positions once each micro-batch is trimmed to its longest row."""
    real = total = 0
    for batch in micro_batches:
        rows = lengths[batch]
        real += int(rows.sum())
        total += int(rows.max()) * len(batch)
    return 1.0 - real / total


def epoch_micro_batches(cfg, n: int, lengths: torch.Tensor, buckets: int) -> list[list[int]]:
    """The micro-batches of the first epoch, trained on one rank."""
    tr = cfg.training
    sampler = StepBatches(n, tr.seed, 1, 0, tr.gradient_accumulation_steps, tr.micro_batch_size, DataPosition(),
                          lengths, buckets)
    batches = iter(sampler)
    return [next(batches) for _ in range(n // sampler.global_batch * tr.gradient_accumulation_steps)]


def time_steps(step: TrainStep, dataset, epochs: dict[int, list[list[int]]],
               steps: int) -> dict[int, tuple[int, float, float]]:
    """(real tokens, wall seconds, CPU seconds) of forward + backward of the first ``steps``
    micro-batches of each order, after one warm-up step; the orders take turns step by step."""
    tokens, wall, cpu = dict.fromkeys(epochs, 0), dict.fromkeys(epochs, 0.0), dict.fromkeys(epochs, 0.0)
    for i in range(-1, steps):  # -1 warms up
        for k, micro_batches in epochs.items():
            batch = default_collate([dataset[j] for j in micro_batches[max(i, 0)]])
            step.zero_grad(set_to_none=True)
            start, start_cpu = time.perf_counter(), time.process_time()
            loss, _ = step(batch, max(i, 0))
            loss.backward()
            if i >= 0:
                wall[k] += time.perf_counter() - start
                cpu[k] += time.process_time() - start_cpu
                tokens[k] += int(batch["attention_mask"].sum())
    return {k: (tokens[k], wall[k], cpu[k]) for k in epochs}


def _run(args: argparse.Namespace) -> None:
    cfg = load_config(args.recipe, args.overrides)
    torch.manual_seed(cfg.training.seed)
    dataset = build_dataset(cfg, "train")
    lengths = dataset.sample_lengths()
    variants = [0, *args.buckets]
    epochs = {k: epoch_micro_batches(cfg, len(dataset), lengths, k) for k in variants}
    steps = args.steps or len(epochs[0])
    if steps > len(epochs[0]):
        raise DataError(f"--steps {steps}: an epoch of {len(dataset)} samples has only {len(epochs[0])} "
                        "micro-batches; time fewer steps.")
    timed = time_steps(TrainStep(build_model(cfg.model), cfg), dataset, epochs, steps)
    rows = {k: {"padding_share": padding_share(lengths, epochs[k]), "tokens_per_s": tokens / wall,
                "tokens_per_cpu_s": tokens / cpu} for k, (tokens, wall, cpu) in timed.items()}
    print(f"{len(dataset)} training samples, micro-batch {cfg.training.micro_batch_size}, {steps} timed "
          f"steps per variant, {torch.get_num_threads()} threads")
    print(f"{'length_buckets':>14} {'padding_share':>14} {'tokens/s':>10} {'tokens/cpu_s':>13}")
    for k, r in rows.items():
        print(f"{k:>14} {r['padding_share']:>14.3f} {r['tokens_per_s']:>10.0f} {r['tokens_per_cpu_s']:>13.0f}")
    off = rows[0]
    out = {"samples": len(dataset), "micro_batch_size": cfg.training.micro_batch_size, "steps": steps,
           "variants": {str(k): r | {"padding_ratio": r["padding_share"] / off["padding_share"],
                                     "tokens_per_s_ratio": r["tokens_per_s"] / off["tokens_per_s"],
                                     "tokens_per_cpu_s_ratio": r["tokens_per_cpu_s"] / off["tokens_per_cpu_s"]}
                        for k, r in rows.items()}}
    print(json.dumps(out))


def _positive(text: str) -> int:
    if not text.isdigit() or int(text) == 0:
        raise argparse.ArgumentTypeError(f"expects a whole number >= 1, got {text!r}")
    return int(text)


def _positives(text: str) -> list[int]:
    return [_positive(k) for k in text.split(",")]


def main(argv: list[str] | None = None) -> int:
    parser = cli.parser("tools.padding", __doc__.split("\n\n")[0])
    parser.add_argument("--recipe", default=str(SMOKE), help="recipe YAML (default: recipes/00_smoke)")
    parser.add_argument("--buckets", type=_positives, default=[16], metavar="K[,K...]",
                        help="data.length_buckets values to compare with off (default: 16)")
    parser.add_argument("--steps", type=_positive, default=None, metavar="N",
                        help="time only the first N micro-batches of each order (default: the whole epoch)")
    cli.add_overrides(parser)
    return cli.run(_run, parser.parse_intermixed_args(argv))


if __name__ == "__main__":
    sys.exit(main())
