"""Engine checks of the cycle options, run as ONE launched job (DeepSpeed start-up paid once):

    deepspeed --num_gpus 2 tests/cycle_options_job.py OUT_DIR

(with the repository on PYTHONPATH). Every rank writes OUT_DIR/<scenario>_rank<r>.json;
tests/test_cycle_options.py asserts on them.

audit: the gradient of the restricted cycle_text micro-step under ZeRO-2 and ZeRO-3 (fp32, real
partitioning over two ranks), read back whole with safe_get_full_grad, for the group
[text_head.*, mmdit.blocks.1.*] and for ['*'] (every parameter: no restriction).
trace: ZeRO-3 with log_trace_cache_warnings through the Trainer, for steps that differ in their
passes (with evaluations): alternation (cycle_every, cycle_probability), alternation with
restricted updates (the stage-wise mode), and a control that must invalidate the trace
(cycle_latent switched on after a warmup, without alternation).
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
from lgdlm_ds.trainer import Trainer
from core_utils import SMOKE
from engine_job import TINY
from engine_utils import ds_json, record

GROUP = "[text_head.*, mmdit.blocks.1.*]"


def audit(out: Path) -> dict:
    """{zero2, zero3} x {restricted, unrestricted}: name -> the cycle_text micro-step's gradient.
    Stages 1 and 2 run (forward, backward, step at lr 0: the weights do not move) to make stage 3's
    inputs; each micro-step is its own accumulation boundary, so stage 3's gradient is read alone,
    after its backward and before its step."""
    import deepspeed
    from deepspeed.utils import safe_get_full_grad
    from core_utils import tiny_batch
    from lgdlm_ds.model import build_model
    from lgdlm_ds.objectives import TrainStep
    result = {}
    for stage in (2, 3):
        ds = json.loads(Path(ds_json(out, stage)).read_text())
        ds.update(gradient_accumulation_steps=1, train_micro_batch_size_per_gpu=4, train_batch_size=8,
                  gradient_clipping=0.0)
        for name, patterns in (("restricted", GROUP), ("unrestricted", "['*']")):
            cfg = load_config(SMOKE, TINY + ["loss.cycle_stagewise=true", f"loss.cycle_text_params={patterns}",
                                             "loss.cycle_text_warmup_steps=0", "loss.cycle_text_ramp_steps=0"])
            torch.manual_seed(0)
            module = TrainStep(build_model(cfg.model), cfg)
            with torch.no_grad():  # wake the zero-initialised gates, so every path carries gradient
                for p in module.parameters():
                    p.add_(torch.randn_like(p) * 0.02)
            engine, *_ = deepspeed.initialize(model=module, config=ds,
                                              optimizer=torch.optim.AdamW(module.parameters(), lr=0.0))
            batch = {k: v.to(engine.device) for k, v in tiny_batch(cfg).items()}
            torch.manual_seed(1)  # the same batch and noise on both ranks
            for s in (1, 2, 3):
                loss, _ = engine(batch, 5, stage=s)
                engine.backward(loss)
                if s < 3:
                    engine.step()
            grads = {n: safe_get_full_grad(p) for n, p in engine.module.named_parameters()}
            result[f"zero{stage}_{name}"] = {n: g.tolist() for n, g in grads.items()}
            engine.step()
            engine.destroy()
    return result


def _trace_run(out: Path, name: str, *extra: str) -> dict:
    cfg = load_config(SMOKE, TINY + [f"training.ds_config={ds_json(out, 3, trace_warnings=True)}",
                                     f"logging.run_dir={out / name}", "training.micro_batch_size=2",
                                     "training.gradient_accumulation_steps=1", "training.num_train_steps=4",
                                     "loss.cycle_latent_warmup_steps=0", "loss.cycle_latent_ramp_steps=0",
                                     "loss.cycle_text_ramp_steps=0", "training.eval_every=2",
                                     "training.eval_batches=1", *extra])
    t = Trainer(cfg, load_ds_config(cfg))
    captured = io.StringIO()
    with contextlib.redirect_stdout(captured):  # DeepSpeed prints the warning on rank 0
        t.train()
    lines = [json.loads(line) for line in (t.run_dir / LOG_NAME).read_text().splitlines()]
    return {"warnings": [w for w in captured.getvalue().splitlines() if "Invalidate trace cache" in w],
            "lines": lines}


def trace(out: Path) -> dict:
    return {
        "every": _trace_run(out, "trace_every", "loss.cycle_every=2", "loss.cycle_text_warmup_steps=0"),
        "probability": _trace_run(out, "trace_probability", "loss.cycle_probability=0.5",
                                  "loss.cycle_text_warmup_steps=0"),
        "restricted": _trace_run(out, "trace_restricted", "loss.cycle_every=2", "loss.cycle_stagewise=true",
                                 f"loss.cycle_text_params={GROUP}", "loss.cycle_text_warmup_steps=1"),
        "control": _trace_run(out, "trace_control", "loss.cycle_text_warmup_steps=0",
                              "loss.cycle_latent_warmup_steps=2"),
    }


SCENARIOS = [audit, trace]


def main() -> None:
    out, *only = [a for a in sys.argv[1:] if not a.startswith("--local_rank")]
    out, rank = Path(out), int(os.environ["RANK"])
    out.mkdir(parents=True, exist_ok=True)
    for scenario in SCENARIOS:
        if only and scenario.__name__ not in only[0].split(","):
            continue
        record(out / f"{scenario.__name__}_rank{rank}.json", lambda: scenario(out))


if __name__ == "__main__":
    main()
