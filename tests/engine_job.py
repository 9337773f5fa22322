"""Engine checks that need real ranks, run as ONE launched job per world size so the suite pays the
launcher and DeepSpeed start-up once:

    deepspeed --num_gpus 2 tests/engine_job.py two_ranks OUT_DIR
    deepspeed --num_gpus 1 tests/engine_job.py one_rank OUT_DIR

(with the repository on PYTHONPATH; an optional third argument runs only the named scenarios.)

Every rank writes OUT_DIR/<scenario>_w<world>_rank<r>.json; test_trainer.py asserts on
them. The first failing scenario ends the job (the other rank may wait in a collective). Runs
use a tiny cycle_vae model in fp32 unless said otherwise, global batch 4 (2 ranks x 1 micro-step
x 2, or 1 rank x 2 micro-steps x 2), and 9 training samples (2 steps per epoch), so 6 steps cross
two epoch boundaries. The cycle terms ramp in over the first steps.
"""
from __future__ import annotations

import contextlib
import io
import json
import os
import sys
from pathlib import Path

import torch

from lgdlm_ds.config import load_config
from lgdlm_ds.ds_config import load_ds_config
from lgdlm_ds.metrics import LOG_NAME
from lgdlm_ds.shm_names import SHM_DIR, buffer_name
from lgdlm_ds.trainer import Trainer, TrainingError
from core_utils import SMOKE
from engine_utils import ds_json, record

STEPS = 6
TINY = ["model.vocab_size=128", "model.hidden_size=32", "model.cond_dim=32", "model.n_blocks=2",
        "model.max_seq_len=16", "model.latent_dim=8", "model.attn_heads=2", "model.attn_dim_head=16",
        "data.kind=synthetic", "data.path=", "data.corpus=", "data.standardize_latents=false",
        "data.num_samples=9", "data.val_fraction=0.5",
        "loss.cycle_text_warmup_steps=1", "loss.cycle_text_ramp_steps=3",
        "loss.cycle_latent_warmup_steps=2", "loss.cycle_latent_ramp_steps=2",
        f"training.num_train_steps={STEPS}", "training.warmup_steps=2", "training.lr=3e-3",
        "training.num_workers=0", "training.eval_every=0",
        "logging.log_every=1", "logging.save_every=0", "logging.progress_bar=false"]


def make(out: Path, name: str, ds: str, *extra: str, world: int, poison=None) -> Trainer:
    accumulation = 2 // world  # global batch 4 whatever the world size
    cfg = load_config(SMOKE, TINY + [f"training.ds_config={ds}", f"logging.run_dir={out / name}",
                                     "training.micro_batch_size=2",
                                     f"training.gradient_accumulation_steps={accumulation}", *extra])
    return Trainer(cfg, load_ds_config(cfg), poison=poison)


def log_lines(trainer: Trainer) -> list[dict]:
    return [json.loads(line) for line in (trainer.run_dir / LOG_NAME).read_text().splitlines()]


def local_state(trainer: Trainer) -> list[torch.Tensor]:
    """This rank's fp32 master values and AdamW state. The inner optimizer's parameters are the
    masters under every stage (ZeRO swaps in its flat fp32 partitions)."""
    opt = trainer.engine.basic_optimizer
    masters = [p.detach().clone() for g in opt.param_groups for p in g["params"]]
    states = [v.detach().clone() for s in opt.state.values() for v in s.values() if torch.is_tensor(v)]
    return masters + states


def same_state(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    return len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b))


# ---- scenarios: each returns a JSON-able dict for this rank


def parity(out: Path, world: int) -> dict:
    """Loss lines of ZeRO-0/2/3 in fp32."""
    result = {}
    for stage in (0, 2, 3):
        t = make(out, f"parity_zero{stage}_w{world}", ds_json(out, stage), world=world)
        t.train()
        result[f"zero{stage}"] = log_lines(t)
    result["shm_names_left"] = [name for name in map(buffer_name, range(world)) if (SHM_DIR / name).exists()]
    return result


def antithetic(out: Path, world: int) -> dict:
    """Loss lines of the unconditional objective with antithetic text times (stratified over the
    global batch by slot position) and the ELBO weighting, ZeRO-0 fp32."""
    t = make(out, f"antithetic_w{world}", ds_json(out, 0), "loss.loss_type=unconditional",
             "loss.text_time_antithetic=true", "loss.text_elbo_weighting=true", world=world)
    t.train()
    return {"lines": log_lines(t)}


def stagewise(out: Path, world: int) -> dict:
    """loss.cycle_stagewise: each micro-batch as two DeepSpeed micro-steps (stage 1 backward before
    stage 2 runs); ZeRO-0/2/3, ZeRO-3 with the trace warnings on."""
    result = {}
    for stage in (0, 2, 3):
        t = make(out, f"stagewise_zero{stage}", ds_json(out, stage, trace_warnings=stage == 3),
                 "loss.cycle_stagewise=true", world=world)
        captured = io.StringIO()
        with contextlib.redirect_stdout(captured):
            t.train()
        result[f"zero{stage}"] = {"lines": log_lines(t), "trace_warnings": sum(
            "Invalidate trace cache" in line for line in captured.getvalue().splitlines())}
    return result


def zero3_trace(out: Path, world: int) -> dict:
    """ZeRO-3 with log_trace_cache_warnings: one engine call per micro-step should keep the
    prefetch trace valid once the set of passes is fixed (cycle weights on from step 0), also
    across an evaluation."""
    t = make(out, "zero3_trace", ds_json(out, 3, trace_warnings=True), "loss.cycle_text_warmup_steps=0",
             "loss.cycle_text_ramp_steps=0", "loss.cycle_latent_warmup_steps=0", "loss.cycle_latent_ramp_steps=0",
             "training.eval_every=2", "training.eval_batches=1", "training.num_train_steps=4", world=world)
    captured = io.StringIO()
    with contextlib.redirect_stdout(captured):  # DeepSpeed prints the warning on rank 0
        t.train()
    return {"warnings": [line for line in captured.getvalue().splitlines() if "Invalidate trace cache" in line],
            "lines": log_lines(t)}


def resume(out: Path, world: int) -> dict:
    """Straight 6 steps vs 3 steps, a new engine resuming, 3 more; ZeRO-2 and ZeRO-3, with evaluation."""
    result = {}
    for stage in (2, 3):
        ds = ds_json(out, stage)
        extra = ("training.eval_every=3", "training.eval_batches=1")
        straight = make(out, f"straight_zero{stage}", ds, *extra, world=world)
        straight.train()
        first = make(out, f"resumed_zero{stage}", ds, *extra, world=world)
        first.train(until_step=STEPS // 2)
        second = make(out, f"resumed_zero{stage}", ds, *extra, world=world)
        resumed_at = second.progress.step
        second.train()
        result[f"zero{stage}"] = {"straight": log_lines(straight), "resumed": log_lines(second),
                                  "resumed_at": resumed_at,
                                  "checkpoints": sorted(p.name for p in second.checkpointer.ckpt_dir.iterdir())}
    return result


def nan_once(out: Path, world: int) -> dict:
    """NaN in rank 1's loss at step index 2 (logged step 3) only; ZeRO-0, 2 and 3."""
    result = {}
    for stage in (0, 2, 3):
        t = make(out, f"nan_zero{stage}", ds_json(out, stage), world=world,
                 poison=lambda step, rank: step == 2 and rank == world - 1)
        t.train(until_step=2)
        before = local_state(t)
        t.train(until_step=3)
        after_skip = local_state(t)
        t.train(until_step=4)
        after_next = local_state(t)
        result[f"zero{stage}"] = {"unchanged_by_skip": same_state(before, after_skip),
                                  "changed_by_next": not same_state(after_skip, after_next),
                                  "lines": log_lines(t)}
    return result


def nan_grad(out: Path, world: int) -> dict:
    """A finite loss but a NaN gradient on the last rank at step 3 (a tensor hook on one weight):
    ZeRO-0 fp32 (the engine's own norm check), ZeRO-2/3 fp32 and ZeRO-2 bf16 (DeepSpeed's)."""
    result = {}
    for name, ds in (("zero0", ds_json(out, 0)), ("zero2", ds_json(out, 2)), ("zero3", ds_json(out, 3)),
                     ("zero2_bf16", ds_json(out, 2, bf16=True))):
        t = make(out, f"nan_grad_{name}", ds, world=world)
        poison = {"on": False}
        weight = t.engine.module.model.latent_head[0].weight
        weight.register_hook(lambda g: g * float("nan") if poison["on"] and int(os.environ["RANK"]) == world - 1
                             else g)
        t.train(until_step=2)
        before = local_state(t)
        poison["on"] = True
        t.train(until_step=3)
        poison["on"] = False
        after_skip = local_state(t)
        t.train(until_step=4)
        result[name] = {"unchanged_by_skip": same_state(before, after_skip),
                        "changed_by_next": not same_state(after_skip, local_state(t)), "lines": log_lines(t)}
    return result


def nan_streak(out: Path, world: int) -> dict:
    """max_consecutive_skips=2 and NaN on rank 0 at step indices 1, 2, 3: the third skip stops it."""
    t = make(out, "nan_streak", ds_json(out, 2), "training.max_consecutive_skips=2", world=world,
             poison=lambda step, rank: step in (1, 2, 3) and rank == 0)
    t.train(until_step=1)
    try:
        t.train()
    except TrainingError as e:
        return {"error": str(e), "step": t.progress.step, "lines": log_lines(t)}
    return {"error": None, "step": t.progress.step}


def bf16(out: Path, world: int) -> dict:
    """ZeRO-2 bf16: finite losses, bf16 module, fp32 master weights."""
    t = make(out, "bf16_zero2", ds_json(out, 2, bf16=True), world=world)
    t.train()
    masters = t.engine.optimizer.single_partition_of_fp32_groups
    return {"lines": log_lines(t), "module_dtypes": sorted({str(p.dtype) for p in t.engine.module.parameters()}),
            "master_dtypes": sorted({str(m.dtype) for m in masters})}


SETS = {"two_ranks": [parity, antithetic, stagewise, zero3_trace, resume, nan_once, nan_grad, nan_streak, bf16],
        "one_rank": [parity, antithetic]}


def main() -> None:
    which, out, *only = [a for a in sys.argv[1:] if not a.startswith("--local_rank")]
    out, world, rank = Path(out), 2 if which == "two_ranks" else 1, int(os.environ["RANK"])
    out.mkdir(parents=True, exist_ok=True)
    for scenario in SETS[which]:
        if only and scenario.__name__ not in only[0].split(","):
            continue
        record(out / f"{scenario.__name__}_w{world}_rank{rank}.json", lambda: scenario(out, world))


if __name__ == "__main__":
    main()
