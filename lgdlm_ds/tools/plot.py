"""Figures of a run's training log: ``python -m lgdlm_ds.plot RUN_DIR [--out DIR] [--evaluation FILE]``.

Reads ``RUN_DIR/training_log.jsonl`` and writes PNGs into ``RUN_DIR/plots`` (or ``--out``), one
panel per logged value:

- ``losses.png``: the total loss and every loss term (base_l2t_text_loss, cycle_text_loss, ...);
- ``cycle_weights.png``: the cycle_text / cycle_latent ramp weights (cycle_vae runs);
- ``optimization.png``: learning rate, gradient norm and skipped steps, with every skipped step
  marked (and its reason: non-finite loss or gradient norm);
- ``throughput.png``: samples and tokens per second;
- ``eval.png``: every eval_* value of the evaluations during training;
- ``metrics.png``: every other logged value (accuracies, norms, latent times, ...).

With ``--evaluation FILE`` (the JSON line lgdlm_ds.evaluate prints last, saved to a file, or an
``ablation.json`` of lgdlm_ds.ablate) also ``evaluation.png``: the held-out metrics as bars, one
group per run: T2L cosine and retrieval (in the batch and over pools of 64) with the one-step x0
prediction and the DDIM sample side by side, L2T text loss and token accuracy; every baseline
(``baseline_*``) as a dashed line. The baselines are the first evaluation's: the runs of one
ablation share their data, hence their baselines. lgdlm_ds.ablate draws it as ``ablation.png``, and
with ``--report`` ``eval_curves.png`` (``eval_curves_figure``): the eval_* values of all its runs
during training, a line per run.

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
from ..metrics import LogError, read_log  # noqa: E402

OPTIMIZATION = ("lr", "grad_norm", "skipped_steps")
THROUGHPUT = ("samples_per_sec", "tokens_per_sec")
CYCLE_WEIGHTS = ("cycle_text_weight", "cycle_latent_weight")
NOT_PLOTTED = ("step", "epoch", "skip_reason", "nonfinite_terms", "eval_nonfinite_terms")
# Evaluation panels: (title, model keys drawn as bars side by side, the metric the baselines' keys end in).
EVALUATION_PANELS = (
    ("t2l latent cosine", (("x0", "t2l_x0_latent_cosine"), ("DDIM", "t2l_latent_cosine")), "t2l_latent_cosine"),
    ("t2l retrieval in the batch", (("x0", "t2l_x0_retrieval_accuracy"), ("DDIM", "t2l_retrieval_accuracy")),
     "t2l_retrieval_accuracy"),
    ("t2l retrieval among 64", (("x0", "t2l_x0_retrieval_accuracy_at_64"), ("DDIM", "t2l_retrieval_accuracy_at_64")),
     "t2l_retrieval_accuracy_at_64"),
    ("l2t text loss (nats/token)", (("model", "l2t_text_loss"), ("no latent", "text_loss_without_latent")),
     "l2t_text_loss"),
    ("l2t token accuracy", (("model", "l2t_token_accuracy"),), "l2t_token_accuracy"),
)
BASELINE_NAMES = ("mean_latent", "ridge_tfidf", "unigram", "nearest_neighbour")


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


def _grid(keys: list[str], title: str, path: Path, draw) -> None:
    """A figure of one panel per key, ``draw(ax, key)`` filling each, three panels to a row."""
    cols = min(3, len(keys))
    rows = math.ceil(len(keys) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.0 * rows), squeeze=False)
    for ax, key in zip(axes.flat, keys):
        draw(ax, key)
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


def _figure(series: dict, keys: list[str], title: str, path: Path, marks: list[tuple[int, str]] = ()) -> None:
    def draw(ax, key):
        steps, values = series[key]
        ax.plot(steps, values, marker="." if len(steps) < 50 else None, linewidth=1.2)
        for step, reason in marks:
            ax.axvline(step, color="tab:red", alpha=0.4, linewidth=0.8,
                       label=f"skipped ({reason})" if (step, reason) == marks[0] else None)
        if marks and key == keys[0]:
            ax.legend(fontsize=7)
    _grid(keys, title, path, draw)


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


def read_evaluations(path: str | Path) -> dict[str, dict]:
    """Evaluations by run name from ``path``: one evaluate line (named after its file) or an ablation.json."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise LogError(f"--evaluation {path}: cannot read a JSON object ({e}); save the last line of "
                       "python -m lgdlm_ds.evaluate, or pass an ablation.json.") from e
    if isinstance(data, dict) and isinstance(data.get("runs"), list):
        return {r["run"]: r["evaluation"] for r in data["runs"]}
    if isinstance(data, dict) and "t2l_latent_cosine" in data:
        return {path.stem: data}
    raise LogError(f"--evaluation {path}: neither an evaluation (no t2l_latent_cosine) nor an ablation.json "
                   "(no runs).")


def eval_curves_figure(run_dirs: dict[str, Path], path: Path, title: str) -> Path | None:
    """One panel per eval_* value logged by any of the runs (run name -> run directory), a line per run
    that logs it: the validation losses of several runs during training, on one set of axes each.
    None (nothing written) when no run logged one (training.eval_every 0)."""
    series = {name: _numeric(read_log(run_dir)) for name, run_dir in run_dirs.items()}
    keys = sorted({k for s in series.values() for k in s if k.startswith("eval_")})
    if not keys:
        return None

    def draw(ax, key):
        for c, (name, s) in enumerate(series.items()):
            if key in s:
                ax.plot(*s[key], marker=".", linewidth=1.2, color=f"C{c}", label=name)
        ax.legend(fontsize=6)
    _grid(keys, title, path, draw)
    return path


def evaluation_figure(evaluations: dict[str, dict], path: Path, title: str) -> Path:
    """The evaluation figure of the module doc for ``evaluations`` (run name -> evaluate's metrics)."""
    first = next(iter(evaluations.values()))
    panels = [(t, bars, b) for t, bars, b in EVALUATION_PANELS if any(k in first for _, k in bars)]
    panel_width = max(3.2, 0.8 * len(evaluations) + 1.5)
    fig, axes = plt.subplots(1, len(panels), figsize=(panel_width * len(panels), 3.6), squeeze=False)
    for ax, (panel, bars, baseline_metric) in zip(axes.flat, panels):
        width = 0.8 / len(bars)
        for b, (label, key) in enumerate(bars):
            xs = [i + (b - (len(bars) - 1) / 2) * width for i in range(len(evaluations))]
            ax.bar(xs, [ev.get(key, math.nan) for ev in evaluations.values()], width, label=label)
        for c, name in enumerate(BASELINE_NAMES):  # a colour each, after the two bars' C0 and C1
            value = first.get(f"baseline_{name}_{baseline_metric}")
            if value is not None:
                ax.axhline(value, linestyle="--", linewidth=1, color=f"C{2 + c}", label=name.replace("_", " "))
        ax.set_xticks(range(len(evaluations)), list(evaluations), rotation=30, ha="right", fontsize=7)
        ax.set_title(panel, fontsize=9)
        ax.tick_params(axis="y", labelsize=7)
        ax.legend(fontsize=6)
        ax.grid(alpha=0.3, axis="y")
    fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> int:
    parser = cli.parser("plot", __doc__)
    parser.add_argument("run_dir", help="run directory holding training_log.jsonl")
    parser.add_argument("--out", default=None, help="directory for the PNGs (default: RUN_DIR/plots)")
    parser.add_argument("--evaluation", default=None, help="a file holding lgdlm_ds.evaluate's JSON line, or an "
                        "ablation.json: also draw evaluation.png")
    return cli.run(_plot, parser.parse_args(argv))


def _plot(args: argparse.Namespace) -> None:
    evaluations = read_evaluations(args.evaluation) if args.evaluation else None  # bad input before any work
    written = plot(args.run_dir, args.out)
    if evaluations:
        out = Path(args.out) if args.out is not None else Path(args.run_dir) / "plots"
        written.append(evaluation_figure(evaluations, out / "evaluation.png",
                                         f"{Path(args.run_dir).name}: held-out evaluation"))
    print(json.dumps({"written": [str(p) for p in written]}))


if __name__ == "__main__":
    sys.exit(main())
