"""What a run writes besides checkpoints: ``training_log.jsonl``, W&B, the rank-0 progress bar, and
the files that say how the run was made (``config.yaml``, ``ds_config.json``, ``env.txt``).

Only rank 0 writes. The log is opened for appending: a resumed run adds to it and never truncates
it, so steps logged after the interrupted run's last checkpoint appear twice; the later line is the
one the run continued from.
"""
from __future__ import annotations

import importlib.metadata
import json
import math
import netrc
import os
import platform
import shutil
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path
from urllib.parse import urlparse

import torch
from tqdm import tqdm

from .config import Config, config_to_dict, save_config

LOG_NAME = "training_log.jsonl"
LINE_KEYS = ("step", "epoch", "loss", "lr", "grad_norm", "skipped_steps", "samples_per_sec", "tokens_per_sec")
"""Keys of every line; the objective's metrics (and eval_* at evaluation steps) come after them."""
_BAR_KEYS = {"loss": "loss", "base_l2t_text_loss": "l2t", "base_t2l_latent_loss": "t2l", "text_loss": "text",
             "latent_loss": "latent", "skipped_steps": "skipped"}


def _json_value(v):
    """Non-finite numbers become null: NaN is not JSON, and a skipped step's loss often is NaN."""
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v


def wandb_mode() -> str:
    """WANDB_MODE if set; online when an API key or a netrc login for the W&B host exists; else offline."""
    if os.environ.get("WANDB_MODE"):
        return os.environ["WANDB_MODE"]
    if os.environ.get("WANDB_API_KEY"):
        return "online"
    host = urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname
    try:
        return "online" if netrc.netrc(os.environ.get("NETRC")).authenticators(host) else "offline"
    except (FileNotFoundError, netrc.NetrcParseError):
        return "offline"


class RunLog:
    def __init__(self, cfg: Config, run_dir: Path, rank: int, total_steps: int, start_step: int):
        self.active = rank == 0
        if not self.active:
            return
        self.file = open(run_dir / LOG_NAME, "a")
        self.bar = tqdm(total=total_steps, initial=start_step, desc="train", dynamic_ncols=True,
                        disable=not cfg.logging.progress_bar)
        self.wandb = self._init_wandb(cfg, run_dir) if cfg.logging.wandb else None

    @staticmethod
    def _init_wandb(cfg: Config, run_dir: Path):
        import wandb
        id_file = run_dir / "wandb_id.txt"  # the same W&B run across resumes
        if not id_file.is_file():
            id_file.write_text(uuid.uuid4().hex[:12])
        return wandb.init(project=cfg.logging.wandb_project, name=cfg.logging.wandb_run_name or run_dir.name,
                          id=id_file.read_text().strip(), resume="allow", dir=str(run_dir),
                          mode=wandb_mode(), config=config_to_dict(cfg))

    def advance(self) -> None:
        if self.active:
            self.bar.update(1)

    def write(self, record: dict) -> None:
        if not self.active:
            return
        self.file.write(json.dumps({k: _json_value(v) for k, v in record.items()}) + "\n")
        self.file.flush()
        if self.wandb is not None:
            self.wandb.log({k: v for k, v in record.items() if k != "step"}, step=record["step"])
        self.bar.set_postfix({short: f"{record[k]:.4g}" if isinstance(record[k], float) else record[k]
                              for k, short in _BAR_KEYS.items() if record.get(k) is not None}, refresh=False)

    def close(self) -> None:
        if self.active:
            self.bar.close()
            self.file.close()
            if self.wandb is not None:
                self.wandb.finish()


def write_run_files(cfg: Config, ds_config: dict, run_dir: Path, world: int, accelerator: str) -> None:
    """config.yaml and ds_config.json as used now (replaced on resume); env.txt gets one section per start."""
    save_config(cfg, run_dir / "config.yaml")
    (run_dir / "ds_config.json").write_text(json.dumps(ds_config, indent=2) + "\n")
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
