"""Train LGDLM: ``python -m lgdlm_ds.train RECIPE.yaml [section.key=value ...]``.

Runs as a plain process (a world of one) or under the launcher:
``deepspeed --num_gpus N --module lgdlm_ds.train RECIPE.yaml ...``. Bad input fails with one line
on stderr before DeepSpeed starts. Exit status: 0 done, 1 training stopped, 2 bad input.
"""
from __future__ import annotations

import os
import socket
import sys
from pathlib import Path

from .checkpoint import CheckpointError
from .config import ConfigError, load_config
from .slurm_env import export_ranks

USAGE = "usage: python -m lgdlm_ds.train RECIPE.yaml [section.key=value ...]"


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


def main(argv: list[str]) -> int:
    args = [a for a in argv if not a.startswith("--local_rank")]  # the launcher's; LOCAL_RANK is set too
    if not args or args[0] in ("-h", "--help"):
        print(USAGE, file=sys.stderr)
        return 0 if args else 2
    try:
        cfg = load_config(args[0], args[1:])
        if not cfg.logging.run_dir:
            cfg.logging.run_dir = str(Path("runs") / Path(args[0]).resolve().parent.name)
        from .trainer import preflight
        ds_config = preflight(cfg)
    except (ConfigError, CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    export_ranks()  # srun with one task per GPU: RANK etc. from SLURM_*
    _world_of_one()
    from .trainer import Trainer, TrainingError
    try:
        Trainer(cfg, ds_config).train()
    except (TrainingError, CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
