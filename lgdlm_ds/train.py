"""Train LGDLM: ``python -m lgdlm_ds.train RECIPE.yaml [section.key=value ...]``.

Runs as a plain process (a world of one) or under the launcher:
``deepspeed --num_gpus N --module lgdlm_ds.train RECIPE.yaml ...``. Bad input fails with one line
on stderr before DeepSpeed starts. SIGUSR1 or SIGTERM to the ranks stops the run after the current
step with a complete checkpoint (preemption.py): exit status 3, and the same command resumes.
"""
from __future__ import annotations

import argparse
import os
import socket
import sys
from pathlib import Path

from . import cli
from .config import load_config
from .preemption import StopSignal
from .slurm_env import export_ranks


def _world_of_one() -> None:
    """Without a launcher, make this process rank 0 of 1 (DeepSpeed would otherwise look for MPI)."""
    if "RANK" in os.environ:
        return
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", LOCAL_SIZE="1")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(port))


def main(argv: list[str] | None = None) -> int:
    parser = cli.parser("train", __doc__)
    parser.add_argument("recipe", help="recipe YAML, e.g. recipes/00_smoke/recipe.yaml")
    cli.add_overrides(parser)
    # The launcher's; LOCAL_RANK is set too.
    parser.add_argument("--local_rank", "--local-rank", type=int, help=argparse.SUPPRESS)
    return cli.run(_train, parser.parse_intermixed_args(argv))


def _train(args: argparse.Namespace) -> int | None:
    stop = StopSignal()  # first: a signal during the start-up stops the run after its first step
    cfg = load_config(args.recipe, args.overrides)
    if not cfg.logging.run_dir:
        cfg.logging.run_dir = str(Path("runs") / Path(args.recipe).resolve().parent.name)
    from .trainer import Trainer, preflight
    ds_config = preflight(cfg)
    export_ranks()  # srun with one task per GPU: RANK etc. from SLURM_*
    _world_of_one()
    trainer = Trainer(cfg, ds_config, stop=stop)
    summary = trainer.train()
    if not summary["stopped_on_signal"]:
        return None
    if trainer.rank == 0:
        print(f"stopped on a signal after step {summary['step']}; {summary['last_checkpoint']} is complete "
              "and the same command resumes from it", file=sys.stderr)
    return cli.STOPPED_AFTER_SAVE


if __name__ == "__main__":
    sys.exit(main())
