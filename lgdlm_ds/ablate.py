"""The ablation matrix: seven runs over one base recipe, each trained, then evaluated, in one table.

    python -m lgdlm_ds.ablate [--launcher local|deepspeed] [--steps N] [--out DIR] [--recipe RECIPE.yaml]
                              [--runs RUNS.yaml] [--report FILE.md] [section.key=value ...]

The runs are named in ``runs.yaml`` beside the recipe (default recipes/ablations/; ``--runs`` names
another file, e.g. recipes/ablations/runs.yaml for the matrix over another recipe): the baselines
l2t, t2l, unconditional and random, then cycle_vae (base L2T + base T2L) with cycle_text only, with
cycle_latent only, and with both. A run's config is the recipe, then the command's overrides (for
every run: sizes, data, learning rate), then the run's own overrides from runs.yaml (a command
override may not set one of those keys), then ``training.num_train_steps`` from ``--steps`` and
``logging.run_dir``: OUT/<run>. Every run is checked before the first one starts.

Launchers: ``local`` trains the runs one after another in this process, as rank 0 of a world of
one (the GPU if there is one, else the CPU); ``deepspeed`` starts each with launch/train.sh (every
GPU of this node; NUM_GPUS to choose). Each run is then evaluated by lgdlm_ds.evaluate on its
validation split, from its final checkpoint. The runs resume (``training.resume: auto``): launched
again, the command continues an unfinished run and only evaluates a finished one again.

Writes OUT/ablation.md and OUT/ablation.json: per run its overrides, the evaluation (the one-step
x0 prediction and the DDIM sample side by side; lgdlm_ds.baselines' rows under the runs), and the last
line of its training log (one line per step: a resumed run logs some steps twice, the later line
counts), and OUT/ablation.png, the evaluations as bars beside the baselines (lgdlm_ds.plot). The last
line printed is one JSON object naming the files.

``--report FILE.md`` also writes a report for a results page (docs/results.md): the command, the
machine and the versions, each run's training time, the table, and the figures copied into a folder
beside it (FILE/ablation.png and FILE/eval_curves.png, every run's validation losses during
training, when the runs log them: training.eval_every). Everything below the line ``REPORT_NOTES``
in an existing FILE.md, the reading of the table written by hand, is kept.

Exit status: 0 done, 1 a run failed, 2 bad input, 3 a signal stopped a run after its checkpoint (the
same command resumes).
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import platform
import re
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import yaml

from . import cli
from .config import ConfigError, load_config
from .fileio import write_atomic

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "recipes" / "ablations" / "recipe.yaml"
RUNS_FILE = "runs.yaml"
TABLE_MD, TABLE_JSON, TABLE_PNG = "ablation.md", "ablation.json", "ablation.png"
CURVES_PNG = "eval_curves.png"
REPORT_NOTES = "<!-- Written by hand below this line: python -m lgdlm_ds.ablate --report keeps it. -->"
# Markdown columns: (header, evaluation metric); every metric is also in the JSON.
COLUMNS = (("l2t text loss", "l2t_text_loss"), ("l2t token acc.", "l2t_token_accuracy"),
           ("t2l cosine x0", "t2l_x0_latent_cosine"), ("t2l cosine DDIM", "t2l_latent_cosine"),
           ("t2l retrieval x0", "t2l_x0_retrieval_accuracy"), ("t2l retrieval DDIM", "t2l_retrieval_accuracy"),
           ("cycle_text token acc.", "cycle_text_token_accuracy"), ("latent information", "latent_information"))
# Rows under the runs: lgdlm_ds.baselines' predictors, in the columns they have values for.
BASELINES = (("mean latent", "mean_latent"), ("ridge TF-IDF", "ridge_tfidf"), ("unigram", "unigram"),
             ("nearest neighbour", "nearest_neighbour"))


@dataclass
class Run:
    name: str
    overrides: list[str]  # the run's own, from runs.yaml
    config: list[str]     # every override of the run, in the order applied
    run_dir: Path


def read_runs(path: Path) -> dict[str, list[str]]:
    """The run names and their overrides from a runs file (``runs.yaml`` beside the recipe)."""
    if not path.is_file():
        raise ConfigError(f"{path} does not exist: the ablation runs are listed beside the recipe or named by "
                          f"--runs (see {RECIPE.with_name(RUNS_FILE).relative_to(ROOT)}).")
    runs = yaml.safe_load(path.read_text())
    if not isinstance(runs, dict) or not runs:
        raise ConfigError(f"{path} must map run names to lists of section.key=value overrides.")
    for name, overrides in runs.items():
        if not (isinstance(name, str) and re.fullmatch(r"[A-Za-z0-9_.-]+", name)):
            raise ConfigError(f"{path}: run name {name!r} must be a folder name (letters, digits, _ . -).")
        if not (isinstance(overrides, list) and all(isinstance(o, str) for o in overrides)):
            raise ConfigError(f"{path}: run '{name}' must list section.key=value strings, got {overrides!r}.")
    return runs


def _keys(overrides: list[str]) -> set[str]:
    return {o.split("=", 1)[0].strip() for o in overrides}


def plan_runs(recipe: Path, runs_file: Path, overrides: list[str], steps: int | None, out: Path) -> list[Run]:
    """Every run's overrides, each config loaded and checked (ConfigError naming the run)."""
    from .trainer import preflight
    if not recipe.is_file():
        raise ConfigError(f"recipe '{recipe}' does not exist.")
    runs = read_runs(runs_file)
    if clash := sorted(_keys(overrides) & set().union(*map(_keys, runs.values()))):
        raise ConfigError(f"{', '.join(clash)}: set by the runs themselves ({runs_file}); an "
                          "override for every run cannot change it. Edit the recipe or the runs file instead.")
    planned = []
    for name, run_overrides in runs.items():
        run_dir = (out / name).resolve()
        config = [*overrides, *run_overrides, *([f"training.num_train_steps={steps}"] if steps else []),
                  f"logging.run_dir={run_dir}"]
        try:
            preflight(load_config(recipe, config))
        except ConfigError as e:
            raise ConfigError(f"ablation run '{name}': {e}") from e
        planned.append(Run(name, run_overrides, config, run_dir))
    return planned


def train(run: Run, recipe: Path, launcher: str) -> int:
    """Train one run; its exit status: DONE, or STOPPED_AFTER_SAVE when a signal stopped it."""
    if launcher == "local":
        from . import train as train_command
        status = train_command.main([str(recipe), *run.config])
    else:
        status = subprocess.run(["bash", str(ROOT / "launch" / "train.sh"), str(recipe), *run.config],
                                cwd=ROOT).returncode
    if status not in (cli.DONE, cli.STOPPED_AFTER_SAVE):
        raise cli.CommandFailed(f"ablation run '{run.name}' ended with exit status {status}; its run directory "
                                f"is {run.run_dir}. Launched again, the command resumes it.")
    return status


def evaluate(run: Run) -> dict:
    """lgdlm_ds.evaluate on the run's final checkpoint: the JSON object it prints last."""
    import torch

    from . import evaluate as evaluate_command
    device = "cuda" if torch.cuda.is_available() else "cpu"
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        status = evaluate_command.main([str(run.run_dir), "--device", device])
    if status != cli.DONE:
        raise cli.CommandFailed(f"evaluating ablation run '{run.name}' ({run.run_dir}) ended with exit status "
                                f"{status}.")
    return json.loads(printed.getvalue().strip().splitlines()[-1])


def last_log_line(run: Run) -> dict:
    from .metrics import read_log
    return read_log(run.run_dir)[-1]


HEADER = ("Evaluated by lgdlm_ds.evaluate on the validation split, from each run's final checkpoint; "
          "t2l x0: the one-step x0 prediction, DDIM: the sampler's latent (evaluate's t2l_steps); "
          "the baseline rows: lgdlm_ds.baselines, fit on the training split; "
          "t2l retrieval: in the batch, chance in brackets; "
          "train loss: the last logged loss of the run's own objective "
          "(not comparable across objectives). ablation.json holds every metric and each run's last log line.")


def _cell(value) -> str:
    return "—" if value is None else f"{value:.3f}" if isinstance(value, float) else str(value)


def markdown(rows: list[dict], recipe: Path) -> str:
    lines = [f"# Ablation: {recipe}", "", HEADER, "",
             "| run | overrides | step | train loss | " + " | ".join(h for h, _ in COLUMNS) + " | skipped steps |",
             "|---" * (len(COLUMNS) + 5) + "|"]
    for row in rows:
        ev, log = row["evaluation"], row["last_log"]
        chance = f" ({_cell(ev.get('t2l_retrieval_chance'))})"
        cells = [_cell(ev.get(k)) + (chance if k.endswith("_retrieval_accuracy") else "") for _, k in COLUMNS]
        lines.append(f"| {row['run']} | {' '.join(f'`{o}`' for o in row['overrides']) or '—'} | {ev['step']} | "
                     f"{_cell(log.get('loss'))} | " + " | ".join(cells) + f" | {_cell(log.get('skipped_steps'))} |")
    ev = rows[0]["evaluation"] if rows else {}  # every run has the same data, hence the same baselines
    for label, name in BASELINES:
        # A baseline has one T2L latent: it fills the x0 and the DDIM columns alike.
        cells = [_cell(ev.get(f"baseline_{name}_{k.replace('t2l_x0_', 't2l_')}")) for _, k in COLUMNS]
        if any(c != "—" for c in cells):
            lines.append(f"| baseline: {label} | — | — | — | " + " | ".join(cells) + " | — |")
    return "\n".join(lines) + "\n"


def ablate(args: argparse.Namespace) -> int | None:
    """Train and evaluate every run, then write the tables; STOPPED_AFTER_SAVE when a signal stopped
    a run (the same command resumes the sweep)."""
    from .tools.plot import evaluation_figure
    recipe, out = Path(args.recipe).resolve(), Path(args.out)
    runs_file = Path(args.runs).resolve() if args.runs else recipe.with_name(RUNS_FILE)
    report = Path(args.report) if args.report else None
    if report is not None and report.suffix != ".md":
        raise ConfigError(f"--report {report}: name a Markdown file (FILE.md); its figures go into FILE/ beside it.")
    runs = plan_runs(recipe, runs_file, args.overrides, args.steps, out)
    rows = []
    for run in runs:
        print(f"[ablate] {run.name}: training into {run.run_dir}", file=sys.stderr, flush=True)
        started = time.perf_counter()
        if train(run, recipe, args.launcher) == cli.STOPPED_AFTER_SAVE:
            print(f"[ablate] stopped during {run.name}; the same command resumes.", file=sys.stderr)
            return cli.STOPPED_AFTER_SAVE
        rows.append({"run": run.name, "overrides": run.overrides, "run_dir": str(run.run_dir),
                     "train_seconds": round(time.perf_counter() - started, 1),
                     "evaluation": evaluate(run), "last_log": last_log_line(run)})
    out.mkdir(parents=True, exist_ok=True)
    write_atomic(out / TABLE_MD, markdown(rows, recipe))
    evaluation_figure({r["run"]: r["evaluation"] for r in rows}, out / TABLE_PNG, f"ablation: {recipe.parent.name}")
    write_atomic(out / TABLE_JSON, json.dumps({"recipe": str(recipe), "runs_file": str(runs_file),
                                               "launcher": args.launcher, "steps": args.steps,
                                               "overrides": args.overrides, "runs": rows}, indent=1) + "\n")
    written = {"markdown": str(out / TABLE_MD), "json": str(out / TABLE_JSON), "figure": str(out / TABLE_PNG)}
    if report is not None:
        written["report"] = str(write_report(report, rows, recipe, out, args.argv))
    print(json.dumps({**written, "runs": [r.name for r in runs]}))


def machine() -> str:
    """The CPU (or GPU), the threads and the versions the numbers were measured with."""
    from importlib.metadata import version

    import torch
    cpuinfo = Path("/proc/cpuinfo")
    names = [line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines()
             if line.startswith("model name")] if cpuinfo.is_file() else []
    cpu = names[0] if names else platform.processor() or "an unnamed CPU"
    device = (torch.cuda.get_device_name() if torch.cuda.is_available()
              else f"{cpu}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads")
    return (f"{device}; " + ", ".join(f"{name} {version(name)}" for name in ("torch", "deepspeed", "mmdit"))
            + f", Python {platform.python_version()}")


def write_report(path: Path, rows: list[dict], recipe: Path, out: Path, argv: list[str]) -> Path:
    """The report of the module doc; keeps the hand-written notes of an existing ``path``."""
    from .tools.plot import eval_curves_figure
    figures = path.with_suffix("")
    figures.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(out / TABLE_PNG, figures / TABLE_PNG)
    curves = eval_curves_figure({r["run"]: Path(r["run_dir"]) for r in rows}, figures / CURVES_PNG,
                                "validation losses during training")
    previous = path.read_text(encoding="utf-8") if path.is_file() else ""
    notes = previous[previous.index(REPORT_NOTES):] if REPORT_NOTES in previous else REPORT_NOTES + "\n"
    minutes = ", ".join(f"{r['run']} {r['train_seconds'] / 60:.1f}" for r in rows)
    table = markdown(rows, recipe).split("\n", 2)[2]  # without its title
    rel = figures.name
    text = "\n".join([
        "# Results", "",
        f"Written by `python -m lgdlm_ds.ablate {shlex.join(argv)}` on {time.strftime('%Y-%m-%d')} "
        f"(the run directories and ablation.json: `{out}`).", "",
        f"Machine: {machine()}.", "",
        f"Training minutes per run, as this command measured them (a resumed run: its last part): {minutes}.", "",
        table,
        f"![evaluation of every run beside the baselines]({rel}/{TABLE_PNG})", "",
        f"![validation losses during training]({rel}/{CURVES_PNG})" if curves else
        "No validation losses during training: the runs logged none (training.eval_every 0).", "",
        notes])
    write_atomic(path, text)
    return path


def main(argv: list[str] | None = None) -> int:
    parser = cli.parser("ablate", __doc__)
    parser.add_argument("--launcher", choices=("local", "deepspeed"), default="local",
                        help="local: every run in this process, one rank; deepspeed: launch/train.sh per run "
                             "(default local)")
    parser.add_argument("--steps", type=int, default=None,
                        help="training.num_train_steps of every run (default: the recipe's)")
    parser.add_argument("--out", default="runs/ablations", help="run directories and tables (default runs/ablations)")
    parser.add_argument("--recipe", default=str(RECIPE),
                        help=f"base recipe, with {RUNS_FILE} beside it (default recipes/ablations/recipe.yaml)")
    parser.add_argument("--runs", default=None, help=f"the runs file (default: {RUNS_FILE} beside the recipe)")
    parser.add_argument("--report", default=None, help="also write a results page here (FILE.md, figures in FILE/)")
    cli.add_overrides(parser, "every run")
    args = parser.parse_intermixed_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    if args.steps is not None and args.steps < 1:
        parser.error("--steps must be at least 1.")
    return cli.run(ablate, args)


if __name__ == "__main__":
    sys.exit(main())
