"""The files that say how a run was made: ``config.yaml`` and ``ds_config.json`` as used now
(replaced on resume) and ``env.txt`` (versions, host, world size; one section per start)."""
from __future__ import annotations

import importlib.metadata
import json
import os
import platform
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import torch

from .config import Config, save_config
from .fileio import write_atomic


def write_run_files(cfg: Config, ds_config: dict, run_dir: Path, world: int, accelerator: str) -> None:
    save_config(cfg, run_dir / "config.yaml")
    write_atomic(run_dir / "ds_config.json", json.dumps(ds_config, indent=2) + "\n")
    lines = [f"== start {time.strftime('%Y-%m-%d %H:%M:%S %z')}",
             f"host: {socket.gethostname()}", f"platform: {platform.platform()}",
             f"python: {sys.version.split()[0]}", f"world_size: {world}",
             f"local_size: {os.environ.get('LOCAL_SIZE', os.environ.get('LOCAL_WORLD_SIZE', '?'))}",
             f"accelerator: {accelerator}", f"torch: {torch.__version__} (cuda {torch.version.cuda})"]
    if torch.cuda.is_available():
        lines += [f"device {i}: {torch.cuda.get_device_name(i)}" for i in range(torch.cuda.device_count())]
    for name in ("deepspeed", "mmdit", "hyper-connections", "x-transformers", "numpy", "transformers", "wandb"):
        try:
            lines.append(f"{name}: {importlib.metadata.version(name)}")
        except importlib.metadata.PackageNotFoundError:
            lines.append(f"{name}: not installed")
    if shutil.which("nvidia-smi"):
        smi = subprocess.run(["nvidia-smi"], capture_output=True, text=True, timeout=30)
        lines += ["nvidia-smi:", smi.stdout.rstrip()]
    lines += ["packages:"] + sorted(f"  {d.metadata['Name']}=={d.version}" for d in importlib.metadata.distributions())
    with open(run_dir / "env.txt", "a") as f:
        f.write("\n".join(lines) + "\n\n")
