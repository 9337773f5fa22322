"""Figures of a run's training log: ``python -m lgdlm_ds.plot RUN_DIR [--out DIR]``.

Reads ``RUN_DIR/training_log.jsonl`` and writes PNGs into ``RUN_DIR/plots`` (or ``--out``), one
panel per logged value:

- ``losses.png``: the total loss and every loss term (base_l2t_text_loss, cycle_text_loss, ...);
- ``cycle_weights.png``: the cycle_text / cycle_latent ramp weights (cycle_vae runs);
- ``optimization.png``: learning rate, gradient norm and skipped steps, with every skipped step
  marked (and its reason: non-finite loss or gradient norm);
- ``throughput.png``: samples and tokens per second;
- ``eval.png``: every eval_* value of the evaluations during training;
- ``metrics.png``: every other logged value (accuracies, norms, latent times, ...).

A resumed run logs the steps after its checkpoint again; only the last line per step, the one
the run continued from, is plotted (``metrics.read_log``). Prints one JSON line naming the files
written.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: no display needed
import matplotlib.pyplot as plt  # noqa: E402

from .. import cli  # noqa: E402
from ..metrics import read_log  # noqa: E402

OPTIMIZATION = ("lr", "grad_norm", "skipped_steps")
THROUGHPUT = ("samples_per_sec", "tokens_per_sec")
CYCLE_WEIGHTS = ("cycle_text_weight", "cycle_latent_weight")
NOT_PLOTTED = ("step", "epoch", "skip_reason", "nonfinite_terms", "eval_nonfinite_terms")


def _numeric(records: list[dict]) -> dict[str, tuple[list[int], list[float]]]:
    """Every numeric value by key: (steps, values); null (a non-finite value in the log) is skipped."""
    series: dict[str, tuple[list[int], list[float]]] = {}
    for r in records:
        for key, value in r.items():
            if key in NOT_PLOTTED or isinstance(value, bool) or not isinstance(value, (int, float)):
                continue
            steps, values = series.setdefault(key, ([], []))
            steps.append(r["step"])
            values.append(float(value))
    return series


def _figure(series: dict, keys: list[str], title: str, path: Path, marks: list[tuple[int, str]] = ()) -> None:
    cols = min(3, len(keys))
    rows = math.ceil(len(keys) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.0 * rows), squeeze=False)
    for ax, key in zip(axes.flat, keys):
        steps, values = series[key]
        ax.plot(steps, values, marker="." if len(steps) < 50 else None, linewidth=1.2)
        for step, reason in marks:
            ax.axvline(step, color="tab:red", alpha=0.4, linewidth=0.8,
                       label=f"skipped ({reason})" if (step, reason) == marks[0] else None)
        if marks and ax is axes.flat[0]:
            ax.legend(fontsize=7)
        ax.ticklabel_format(axis="y", useOffset=False)  # losses near 10.34 read as 10.34, not +1.034e1
        ax.set_title(key, fontsize=9)
        ax.set_xlabel("step", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(keys):]:
        ax.set_visible(False)
    fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot(run_dir: str | Path, out: str | Path | None = None) -> list[Path]:
    """Write the figures of the module doc that the log has values for; returns their paths."""
    run_dir = Path(run_dir)
    records = read_log(run_dir)
    out = Path(out) if out is not None else run_dir / "plots"
    out.mkdir(parents=True, exist_ok=True)
    series = _numeric(records)
    skips = [(r["step"], r["skip_reason"]) for r in records if r.get("skip_reason")]
    evals = sorted(k for k in series if k.startswith("eval_"))
    losses = (["loss"] if "loss" in series else []) + sorted(k for k in series if k.endswith("_loss") and
                                                                 not k.startswith("eval_"))
    groups = {"losses": (losses, "losses by term", ()),
              "cycle_weights": ([k for k in CYCLE_WEIGHTS if k in series], "cycle weights", ()),
              "optimization": ([k for k in OPTIMIZATION if k in series], "optimization", skips),
              "throughput": ([k for k in THROUGHPUT if k in series], "throughput", ()),
              "eval": (evals, "evaluation on the validation split", ())}
    used = {k for keys, _, _ in groups.values() for k in keys}
    groups["metrics"] = (sorted(k for k in series if k not in used), "other metrics", ())
    written = []
    for name, (keys, title, marks) in groups.items():
        if keys:
            path = out / f"{name}.png"
            _figure(series, keys, f"{run_dir.name}: {title}", path, list(marks))
            written.append(path)
    return written


def main(argv: list[str] | None = None) -> int:
    parser = cli.parser("plot", __doc__)
    parser.add_argument("run_dir", help="run directory holding training_log.jsonl")
    parser.add_argument("--out", default=None, help="directory for the PNGs (default: RUN_DIR/plots)")
    return cli.run(_plot, parser.parse_args(argv))


def _plot(args: argparse.Namespace) -> None:
    print(json.dumps({"written": [str(p) for p in plot(args.run_dir, args.out)]}))


if __name__ == "__main__":
    sys.exit(main())
