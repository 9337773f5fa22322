"""Benchmark of a cycle_vae step against the naive four-call step and a single pass.

    python -m lgdlm_ds.bench [--quick] [--blocks 12 --hidden 256 --seq 256 --vocab 30522 --batch 8]

Each variant runs in its own process (same model size, sequence, micro-batch and data):
  naive               reference kept here, not in the training path: four separate model calls,
                      both heads on every pass, full [B,S,V] logits, one backward
  single              one l2t step of the training path (the floor: one pass)
  cycle               the training path's cycle_vae step (two stage-fused calls, chunked CE)
  cycle_ac            the same with activation checkpointing per MMDiT block
  cycle_stagewise     stage 1 backpropagated before stage 2 runs
  cycle_stagewise_ac  both
  cycle_1stream       cycle with one residual stream (plain residuals): the floor the
                      hyper-connections are measured against
and a 2-rank ZeRO-3 job counts forward all-gather traffic (DeepSpeed's comms logger) for naive and
the training path. Per variant: median step time (forward+backward) after a warm-up step, aten ops
per step (each at least one kernel launch on a GPU; tools/op_count.py), FLOPs as executed
(FlopCounterMode: recomputation and the naive step's extra heads included), the objective's model
FLOPs (lgdlm_ds/flops.py; the same for every cycle variant), real tokens per second, MFU where the
device's peak is known (fp32: the benchmark runs in fp32; or --peak-tflops), and peak memory: on
CPU the exact peak of live tensor bytes (LiveBytes), on CUDA torch.cuda.max_memory_allocated,
split into model states (parameters + gradients) and the rest. The last line printed is one JSON
object with the ratios.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import default_collate

from .. import cli
from ..config import Config, load_config
from ..data import SyntheticDataset
from ..diffusion import LatentDiffusion
from ..flops import StepFlops, flop_counter, peak_tflops, utilisation
from ..model import build_model
from ..objectives import TrainStep
from ..plan import ObjectivePlan
from .compare import max_rel_diff, param_grads
from .memtrack import LiveBytes
from .op_count import OpCounter

VARIANTS = ("naive", "single", "cycle", "cycle_ac", "cycle_stagewise", "cycle_stagewise_ac", "cycle_1stream")


@dataclass
class Sizes:
    blocks: int = 12
    hidden: int = 256
    seq: int = 256
    vocab: int = 30522
    batch: int = 8
    latent_dim: int = 32
    steps: int = 3

    def overrides(self) -> list[str]:
        return [f"model.n_blocks={self.blocks}", f"model.hidden_size={self.hidden}", f"model.cond_dim={self.hidden}",
                f"model.max_seq_len={self.seq}", f"model.vocab_size={self.vocab}",
                f"model.latent_dim={self.latent_dim}", f"model.attn_heads={max(1, self.hidden // 64)}",
                "model.attn_dim_head=64", f"training.micro_batch_size={self.batch}",
                f"data.num_samples={max(64, self.batch)}"]


QUICK = Sizes(blocks=4, hidden=128, seq=64, vocab=30522, batch=4, steps=3)


def bench_config(sizes: Sizes, variant: str) -> Config:
    """Every cycle term on from step 0, random latent t, stop-grad (the stage-wise mode needs it)."""
    mode = "l2t" if variant == "single" else "cycle_vae"
    return load_config(None, sizes.overrides() + [
        f"loss.loss_type={mode}", "loss.latent_t_mode=random", "loss.cycle_stop_grad_latent=true",
        f"model.activation_checkpointing={variant.endswith('_ac')}",
        f"loss.cycle_stagewise={variant.startswith('cycle_stagewise')}"]
        + (["model.num_residual_streams=1"] if variant == "cycle_1stream" else []))


class NaiveStep(nn.Module):
    """The cycle_vae step as the older code meant it: four separate model calls with both heads
    and full logits, one loss. Draws its noise in TrainStep's order, so at the same seed its loss
    equals the training path's (the benchmark checks it)."""

    def __init__(self, model: nn.Module, cfg: Config):
        super().__init__()
        self.model, self.cfg = model, cfg
        self.plan = ObjectivePlan.from_config(cfg)
        self.diffusion = LatentDiffusion.from_config(cfg.diffusion)

    def forward(self, batch: dict, step: int) -> tuple[torch.Tensor, dict]:
        lo, d, plan = self.cfg.loss, self.diffusion, self.plan
        ids, x0, real = batch["input_ids"], batch["latent"], batch["attention_mask"]
        b = ids.shape[0]
        t_base, eps_base = plan.latent_time.sample(b, ids.device, step), torch.randn_like(x0)
        t_cyc, eps_cyc = plan.latent_time.sample(b, ids.device, step), torch.randn_like(x0)
        ones, zeros = torch.ones(b, device=ids.device), torch.zeros(b, device=ids.device)
        masked = torch.where(real, torch.full_like(ids, self.cfg.data.mask_token_id), ids)

        logits, _ = self.model(masked, x0, ones, zeros, real)
        base_l2t = F.cross_entropy(logits[real].float(), ids[real])
        x_t = d.add_noise(x0, t_base, eps_base)
        _, pred = self.model(ids, x_t, zeros, t_base, real)
        base_t2l = F.mse_loss(pred.float(), d.target(x0, eps_base, t_base).float())
        x0_hat = d.predict_x0(x_t, t_base, pred).detach()
        cycle_logits, _ = self.model(masked, x0_hat, ones, zeros, real)
        cycle_text = F.cross_entropy(cycle_logits[real].float(), ids[real])
        pseudo = torch.where(real, logits.detach().argmax(-1), ids)
        _, pred2 = self.model(pseudo, d.add_noise(x0, t_cyc, eps_cyc), zeros, t_cyc, real)
        cycle_latent = F.mse_loss(pred2.float(), d.target(x0, eps_cyc, t_cyc).float())
        w_text, w_lat = plan.cycle_text.at(step), plan.cycle_latent.at(step)
        return base_l2t + lo.latent_loss_weight * base_t2l + w_text * cycle_text + w_lat * cycle_latent, {}


def make_step(variant: str, model: nn.Module, cfg: Config) -> nn.Module:
    return NaiveStep(model, cfg) if variant == "naive" else TrainStep(model, cfg)


def run_step(module: nn.Module, batch: dict, step: int, seed: int) -> float:
    """One forward+backward (both stages for the stage-wise mode); returns the loss."""
    torch.manual_seed(seed)
    if isinstance(module, TrainStep) and module.cfg.loss.cycle_stagewise:
        loss1, _ = module(batch, step, stage=1)
        loss1.backward()
        loss2, _ = module(batch, step, stage=2)
        loss2.backward()
        return (loss1 + loss2).item()
    loss, _ = module(batch, step)
    loss.backward()
    return loss.item()


def measure(variant: str, sizes: Sizes) -> dict:
    """Run in a fresh process: time, FLOPs and peak memory of one variant."""
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    cfg = bench_config(sizes, variant)
    torch.manual_seed(0)
    model = build_model(cfg.model).to(device)
    module = make_step(variant, model, cfg)
    ds = SyntheticDataset(cfg, "train")
    batch = {k: v.to(device) for k, v in default_collate([ds[i] for i in range(sizes.batch)]).items()}
    out = {"variant": variant}

    if variant.startswith("cycle_stagewise"):  # equal gradients to the plain mode, same seed
        plain = TrainStep(model, bench_config(sizes, variant.replace("_stagewise", "")))
        run_step(plain, batch, 1, seed=7)
        reference = param_grads(model)
        model.zero_grad(set_to_none=True)
        run_step(module, batch, 1, seed=7)
        out["grad_rel_diff_vs_plain"] = max_rel_diff(param_grads(model), reference)

    out["loss_at_step_1"] = run_step(module, batch, 1, seed=1)  # warm-up; allocates the gradients
    out["model_state_bytes"] = sum(p.numel() * p.element_size() * 2 for p in model.parameters())
    for p in model.parameters():  # keep gradients allocated: they are model states, not counted below
        if p.grad is not None:
            p.grad.zero_()
    if cuda:
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        run_step(module, batch, 1, seed=1)
        out["peak_other_bytes"] = torch.cuda.max_memory_allocated() - base
    else:
        with LiveBytes() as live:
            run_step(module, batch, 1, seed=1)
        out["peak_other_bytes"] = live.peak
    with flop_counter() as flops:
        run_step(module, batch, 1, seed=1)
    out["flops"] = flops.get_total_flops()
    with OpCounter() as ops:
        run_step(module, batch, 1, seed=1)
    out["ops"] = ops.total
    out["model_flops"] = float(StepFlops(cfg)(batch["attention_mask"], 1))
    times = []
    for k in range(sizes.steps):
        if cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        run_step(module, batch, 1, seed=1)
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    out["step_time_s"] = statistics.median(times)
    out["tokens_per_step"] = int(batch["attention_mask"].sum())
    return out


def _zero3_traffic(sizes: Sizes, workdir: Path) -> dict:
    """Launch the 2-rank ZeRO-3 comms measurement (lgdlm_ds.tools.bench_zero3) and read its result."""
    result = workdir / "zero3.json"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    # Traffic does not depend on the batch: one sample per rank keeps two ranks' activations small.
    one = asdict(sizes) | {"batch": 1}
    cmd = ["deepspeed", "--num_gpus", "2", "--master_port", str(29500 + os.getpid() % 1000),
           "--module", "lgdlm_ds.tools.bench_zero3", "--out", str(result), "--sizes", json.dumps(one)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0 or not result.exists():
        raise cli.CommandFailed(f"ZeRO-3 traffic job failed ({' '.join(cmd)}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return json.loads(result.read_text())


def _machine() -> str:
    if torch.cuda.is_available():
        return f"{torch.cuda.get_device_name()}, torch {torch.__version__}"
    return f"CPU {platform.machine()} x{os.cpu_count()} cores ({torch.get_num_threads()} threads), fp32, torch {torch.__version__}"


def _table(rows: list[dict]) -> str:
    lines = [f"{'variant':<20}{'step s':>9}{'ops':>9}{'GFLOP':>9}{'model GFLOP':>13}{'tokens/s':>10}{'MFU':>7}"
             f"{'model MiB':>11}{'other MiB':>11}"]
    for r in rows:
        mfu = f"{r['mfu']:.1%}" if r["mfu"] is not None else "-"
        lines.append(f"{r['variant']:<20}{r['step_time_s']:>9.2f}{r['ops']:>9,}{r['flops'] / 1e9:>9.1f}"
                     f"{r['model_flops'] / 1e9:>13.1f}{r['tokens_per_s']:>10.0f}{mfu:>7}"
                     f"{r['model_state_bytes'] / 2**20:>11.1f}{r['peak_other_bytes'] / 2**20:>11.1f}")
    return "\n".join(lines)


def _tflops(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0 <= value < float("inf"):
        raise argparse.ArgumentTypeError(f"expects a finite number of TFLOP/s >= 0 (0: the device's known peak), "
                                         f"got {text!r}")
    return value


def main(argv: list[str] | None = None) -> int:
    parser = cli.parser("bench", __doc__)
    parser.add_argument("--quick", action="store_true", help=f"smaller sizes ({QUICK}), under two minutes")
    for field, default in asdict(Sizes()).items():
        parser.add_argument(f"--{field.replace('_', '-')}", type=int, default=None, help=f"default {default}")
    parser.add_argument("--no-zero3", action="store_true", help="skip the 2-rank ZeRO-3 traffic job")
    parser.add_argument("--peak-tflops", type=_tflops, default=0.0,
                        help="the device's peak TFLOP/s in fp32 for MFU (default: known GPUs' peaks; none on CPU)")
    parser.add_argument("--worker", choices=VARIANTS, help=argparse.SUPPRESS)
    return cli.run(_bench, parser.parse_args(argv))


def _bench(args: argparse.Namespace) -> None:
    sizes = QUICK if args.quick else Sizes()
    sizes = Sizes(**{k: getattr(args, k) if getattr(args, k) is not None else v for k, v in asdict(sizes).items()})
    if args.worker:
        print(json.dumps(measure(args.worker, sizes)))
        return

    from .memory import predict_other_bytes

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    peak = peak_tflops(args.peak_tflops, device, torch.float32)
    rows = []
    for variant in VARIANTS:
        cmd = [sys.executable, "-m", "lgdlm_ds.tools.bench", "--worker", variant] + \
              [a for k, v in asdict(sizes).items() for a in (f"--{k.replace('_', '-')}", str(v))]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            raise cli.CommandFailed(f"benchmark variant {variant} failed:\n{proc.stderr[-3000:]}")
        rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
        rows[-1]["tokens_per_s"] = rows[-1]["tokens_per_step"] / rows[-1]["step_time_s"]
        rows[-1]["mfu"] = utilisation(rows[-1]["model_flops"], rows[-1]["step_time_s"], 1, peak)[1]
        print(f"[bench] {variant}: {rows[-1]['step_time_s']:.2f} s/step", file=sys.stderr, flush=True)
    r = {row["variant"]: row for row in rows}
    print(f"sizes: {asdict(sizes)}\n" + _table(rows))
    loss_gap = abs(r["naive"]["loss_at_step_1"] - r["cycle"]["loss_at_step_1"]) / abs(r["cycle"]["loss_at_step_1"])
    if loss_gap > 1e-4:
        raise cli.CommandFailed(f"naive and training-path losses differ ({loss_gap:.2e} relative): the comparison "
                                "is not like for like.")
    other = {k: v["peak_other_bytes"] for k, v in r.items()}
    fill = r["cycle"]["tokens_per_step"] / (sizes.batch * sizes.seq)
    prediction_errors = {v: abs(predict_other_bytes(bench_config(sizes, v), sizes.batch, fill) - other[v]) / other[v]
                         for v in VARIANTS if v != "naive"}
    print("lgdlm_ds.memory prediction error: " + ", ".join(f"{v} {e:.1%}" for v, e in prediction_errors.items()))
    summary = {
        "cycle_vs_naive_time": r["cycle"]["step_time_s"] / r["naive"]["step_time_s"],
        "cycle_vs_single_time": r["cycle"]["step_time_s"] / r["single"]["step_time_s"],
        "cycle_vs_single_flops": r["cycle"]["flops"] / r["single"]["flops"],
        "cycle_ac_vs_naive_mem": other["cycle_ac"] / other["naive"],
        "cycle_ac_vs_single_mem": other["cycle_ac"] / other["single"],
        "cycle_stagewise_ac_vs_single_mem": other["cycle_stagewise_ac"] / other["single"],
        "stagewise_vs_plain_mem": other["cycle_stagewise"] / other["cycle"],
        "stagewise_grad_rel_diff": r["cycle_stagewise"]["grad_rel_diff_vs_plain"],
        "memory_prediction_rel_error": max(prediction_errors.values()),
        "naive_vs_cycle_loss_rel_diff": loss_gap,
    }
    summary["cycle_vs_single_time_over_flops"] = summary["cycle_vs_single_time"] / summary["cycle_vs_single_flops"]
    summary |= {"cycle_ops_per_step": r["cycle"]["ops"], "cycle_1stream_ops_per_step": r["cycle_1stream"]["ops"],
                "cycle_vs_1stream_time": r["cycle"]["step_time_s"] / r["cycle_1stream"]["step_time_s"],
                "cycle_vs_1stream_model_flops": r["cycle"]["model_flops"] / r["cycle_1stream"]["model_flops"],
                "cycle_tokens_per_s": r["cycle"]["tokens_per_s"], "cycle_mfu": r["cycle"]["mfu"]}
    if not args.no_zero3:
        with tempfile.TemporaryDirectory() as tmp:
            z3 = _zero3_traffic(sizes, Path(tmp))
        print(f"ZeRO-3 forward all-gather per step (2 ranks, reuse distance 0): naive "
              f"{z3['naive_allgather_bytes_vs_model']:.2f} x model, training path "
              f"{z3['cycle_allgather_bytes_vs_model']:.2f} x model ({z3['cycle_allgather_calls']} calls)")
        summary["zero3_allgather_bytes_vs_model"] = z3["cycle_allgather_bytes_vs_model"]
        summary["zero3_naive_allgather_bytes_vs_model"] = z3["naive_allgather_bytes_vs_model"]
    summary["machine"] = _machine()
    summary["sizes"] = asdict(sizes)
    print(json.dumps(summary))


if __name__ == "__main__":
    sys.exit(main())
