"""Peak host memory per rank of starting a ZeRO-3 run: the model built whole on every rank and then
partitioned by DeepSpeed (what training did before), against built partitioned from the start
(lgdlm_ds/partitioned.py, what training does under ZeRO-3).

    python -m lgdlm_ds.tools.construction_memory RECIPE [section.key=value ...] [--ranks 2] [--build-only]

The recipe's ``training.ds_config`` must be a ZeRO-3 JSON. The command launches ``--ranks`` ranks
under the DeepSpeed launcher once per construction. Each rank reports its resident set size after
start-up and its high-water mark (Linux VmHWM, reset after start-up) after building the model
(warm-started from ``model.init_from`` when the recipe sets it) and after ``deepspeed.initialize``,
which adds the optimizer's fp32 weights and AdamW states: on a GPU those live in device memory,
on the CPU accelerator in host memory too. ``--build-only`` stops after the build (for shapes whose
optimizer states do not fit here). Prints a table, then one JSON line: every rank's numbers and
the ratios whole / partitioned of the largest rank's peak, over the whole peak and over what the
run added to the start-up size.

The ranks run with glibc's ``MALLOC_MMAP_THRESHOLD_`` fixed at 128 KiB (unless it is set already),
so that every freed weight goes back to the system: by default glibc raises that threshold to the
largest block freed so far (up to 32 MiB), after which freed weights stay in its heap, scattered
between the partitions kept, and the high-water mark measures that fragmentation rather than the
tensors held (on this machine it added about 0.3 GiB per rank to the partitioned build of 0.22B
parameters and nothing to the whole one).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from .. import cli, shm_names
from ..config import ConfigError, load_config
from ..ds_config import REPO_ROOT, load_ds_config
from ..partitioned import partitions_parameters

CONSTRUCTIONS = ("whole", "partitioned")
GIB = 2**30


def _status_bytes(key: str) -> int:
    """A size from /proc/self/status (VmRSS, VmHWM), in bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"/proc/self/status has no {key}: peak memory is measured on Linux only.")


def _reset_peak() -> None:
    """The high-water mark starts again from the current size (Linux clear_refs, value 5)."""
    Path("/proc/self/clear_refs").write_text("5")


def worker(construction: str, recipe: str, overrides: list[str], out: Path, build_only: bool) -> None:
    """One launched rank: build the model (and the engine), writing its sizes to out/<rank>.json."""
    import deepspeed
    from deepspeed import comm as dist

    from ..ds_config import offloads_optimizer
    from ..model import build_model
    from ..objectives import TrainStep
    from ..optim import build_optimizer
    from ..seeding import seed_everything
    from ..warm_start import apply_init_from

    deepspeed.init_distributed()
    shm_names.release(dist)
    cfg = load_config(recipe, overrides)
    ds = load_ds_config(cfg)
    seed_everything(cfg.training.seed)
    _reset_peak()
    sizes = {"start_rss": _status_bytes("VmRSS")}
    model = build_model(cfg.model, warm_start=False, ds_config=ds if construction == "partitioned" else None)
    if cfg.model.init_from:
        apply_init_from(model, cfg.model)
    sizes["params"] = sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters())
    sizes["build_peak"] = _status_bytes("VmHWM")
    if not build_only:
        step = TrainStep(model, cfg)
        optimizer = build_optimizer(step, cfg.training, offloads_optimizer(ds))
        deepspeed.initialize(model=step, optimizer=optimizer, config=ds)
        sizes["engine_peak"] = _status_bytes("VmHWM")
    (out / f"{dist.get_rank()}.json").write_text(json.dumps(sizes))


def _launch(construction: str, args: argparse.Namespace, out: Path) -> list[dict]:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {"OMP_NUM_THREADS": "1", "MALLOC_MMAP_THRESHOLD_": str(128 * 1024), **os.environ,
           "PYTHONPATH": str(REPO_ROOT)}
    cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(args.ranks), "--master_port",
           str(port), "--module", "lgdlm_ds.tools.construction_memory", "--worker", construction, "--out", str(out),
           args.recipe, *args.overrides, *(["--build-only"] if args.build_only else [])]
    proc = subprocess.run(cmd, cwd=REPO_ROOT, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise cli.CommandFailed(f"the {construction} launch failed (exit {proc.returncode}):\n"
                                f"{(proc.stdout + proc.stderr)[-4000:]}")
    return [json.loads((out / f"{r}.json").read_text()) for r in range(args.ranks)]


def _compare(args: argparse.Namespace) -> None:
    cfg = load_config(args.recipe, args.overrides)
    if not partitions_parameters(load_ds_config(cfg)):
        raise ConfigError(f"config key 'training.ds_config': '{cfg.training.ds_config}' is not a ZeRO-3 JSON; "
                          "partitioned construction applies to ZeRO-3 only (e.g. ds_configs/zero3_bf16.json).")
    ranks = {}
    for construction in CONSTRUCTIONS:
        with tempfile.TemporaryDirectory() as tmp:
            ranks[construction] = _launch(construction, args, Path(tmp))
    phases = ["build_peak"] + ([] if args.build_only else ["engine_peak"])
    result = {"params": ranks["whole"][0]["params"], "ranks": args.ranks, "ds_config": cfg.training.ds_config,
              **{f"{c}_gib": [{k: round(v / GIB, 3) for k, v in r.items() if k != "params"} for r in ranks[c]]
                 for c in CONSTRUCTIONS}}
    print(f"{'':12}" + "".join(f"{c + ' ' + p + ' GiB':>30}" for p in ["start_rss", *phases] for c in CONSTRUCTIONS))
    for r in range(args.ranks):
        print(f"rank {r:<7}" + "".join(f"{ranks[c][r][p] / GIB:>30.3f}" for p in ["start_rss", *phases]
                                       for c in CONSTRUCTIONS))
    for p in phases:
        peak = {c: max(r[p] for r in ranks[c]) for c in CONSTRUCTIONS}
        added = {c: max(r[p] - r["start_rss"] for r in ranks[c]) for c in CONSTRUCTIONS}
        result[f"{p}_ratio"] = round(peak["whole"] / peak["partitioned"], 3)
        result[f"{p}_added_ratio"] = round(added["whole"] / added["partitioned"], 3)
        print(f"{p}: whole / partitioned {result[f'{p}_ratio']:.2f}x (largest rank), "
              f"{result[f'{p}_added_ratio']:.2f}x over the start-up size")
    print(json.dumps(result))


def main(argv: list[str] | None = None) -> int:
    parser = cli.parser("tools.construction_memory", __doc__)
    parser.add_argument("recipe", help="recipe YAML (its training.ds_config a ZeRO-3 JSON)")
    cli.add_overrides(parser)
    parser.add_argument("--ranks", type=int, default=2, help="ranks per launch (default 2)")
    parser.add_argument("--build-only", action="store_true", help="stop after the build, before deepspeed.initialize")
    parser.add_argument("--worker", choices=CONSTRUCTIONS, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--local_rank", type=int, help=argparse.SUPPRESS)  # the launcher passes it
    args = parser.parse_intermixed_args(argv)
    if args.worker:
        worker(args.worker, args.recipe, args.overrides, args.out, args.build_only)
        return cli.DONE
    return cli.run(_compare, args)


if __name__ == "__main__":
    sys.exit(main())
