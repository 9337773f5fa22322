"""DeepSpeed in the tests, on the CPU with gloo: this process as a world of one, the shipped JSONs
with precision switched, short training runs in-process, jobs under the real launcher, and
deepspeed.comm as one rank sees it (for the trainer's parts tested without an engine)."""
from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import traceback
from pathlib import Path
from typing import Callable

import pytest

from core_utils import ROOT
from lgdlm_ds.config import load_config

# The variables a launcher sets for each rank.
WORLD_KEYS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_SIZE", "MASTER_ADDR", "MASTER_PORT")

# Log keys that measure the machine, not the training: they differ between any two runs.
TIMING_KEYS = frozenset({"samples_per_sec", "tokens_per_sec", "tflops", "mfu", "peak_memory_gib", "data_loading_share"})


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def world_of_one():
    """Within it, this process is rank 0 of 1, so DeepSpeed starts in-process (no launcher, no MPI
    lookup); under a launcher its variables are kept."""
    with pytest.MonkeyPatch.context() as mp:
        for key, value in dict(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", LOCAL_SIZE="1",
                               MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port())).items():
            mp.setenv(key, os.environ.get(key, value))
        yield


def launch(ranks: int, script: str | Path, *args: str) -> subprocess.CompletedProcess:
    """``script args`` under the DeepSpeed launcher with ``ranks`` CPU ranks, the repository on
    PYTHONPATH. The launcher sets every rank's variables: this process's world of one stays here."""
    env = {k: v for k, v in os.environ.items() if k not in WORLD_KEYS}
    env.update(PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", DEEPSPEED_TIMEOUT="5")
    cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(ranks),
           "--master_port", str(free_port()), str(script), *args]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


def record(path: Path, check: Callable[[], object]) -> None:
    """In a launched job: write ``check()``'s result to ``path`` as JSON. On an exception, write its
    traceback there instead and end this rank: the other rank may wait in a collective, and the
    launcher stops the job when one rank exits non-zero. The test shows the traceback."""
    try:
        path.write_text(json.dumps(check()))
    except Exception:
        path.write_text(json.dumps({"exception": traceback.format_exc()}))
        traceback.print_exc()
        sys.exit(1)


def ds_json(out: Path, stage: int, bf16: bool = False, trace_warnings: bool = False) -> str:
    """The shipped JSON of that stage, with precision switched as asked: fp32 by default, so the
    engine's weights and the exported ones compare exactly."""
    src = {0: "zero0.json", 2: "zero2_bf16.json", 3: "zero3_bf16.json"}[stage]
    ds = json.loads((ROOT / "ds_configs" / src).read_text())
    ds["bf16"]["enabled"] = bf16
    if trace_warnings:
        ds["zero_optimization"]["log_trace_cache_warnings"] = True
    name = f"zero{stage}{'_bf16' if bf16 else ''}{'_trace' if trace_warnings else ''}"
    path = out / f"{name}_rank{os.environ['RANK']}.json"  # one file per rank: two ranks writing one file race
    path.write_text(json.dumps(ds))
    return str(path)


# The short runs that evaluate, sample, export, load and plot: a tiny model, one rank unless launched.
RUN = ["model.hidden_size=32", "model.cond_dim=32", "model.n_blocks=2", "model.attn_heads=2",
       "model.attn_dim_head=16", "training.num_workers=0", "training.warmup_steps=2",
       "logging.progress_bar=false", "logging.log_every=1", "data.corpus="]
SYNTHETIC = ["data.kind=synthetic", "model.vocab_size=128", "model.max_seq_len=16", "model.latent_dim=16"]
LEARN_STEPS = 80  # conftest.py's learned_run
SENTENCES = ["The fire spread quickly through the dry bush near Sydney.",
             "The minister said the talks would continue next week."]


def train_run(tmp: Path, stage: int, overrides: list[str]):
    """A Trainer of ``RUN + overrides`` under ZeRO-``stage`` in fp32, trained, its run directory in tmp/run."""
    from lgdlm_ds.ds_config import load_ds_config
    from lgdlm_ds.trainer import Trainer
    with world_of_one():
        cfg = load_config(None, RUN + overrides + [f"training.ds_config={ds_json(tmp, stage)}",
                                                   f"logging.run_dir={tmp / 'run'}"])
        trainer = Trainer(cfg, load_ds_config(cfg))
        trainer.train()
    return trainer


class OneRank:
    """deepspeed.comm as a world of one sees it."""
    class ReduceOp:
        MAX = "max"

    @staticmethod
    def all_reduce(tensor, op=None):
        pass

    @staticmethod
    def get_rank():
        return 0

    @staticmethod
    def get_world_size():
        return 1
