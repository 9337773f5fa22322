"""``lgdlm_ds.plot`` on a run trained by the real engine (conftest.py's ``packed_run``)."""
import json
from pathlib import Path

import pytest

from lgdlm_ds.baselines import Baselines
from lgdlm_ds.evaluate import evaluate, load_batches
from lgdlm_ds.loading import load
from lgdlm_ds.metrics import LOG_NAME, LogError
from lgdlm_ds.tools import plot as plot_cli
from core_utils import run_cli


def test_plot_writes_the_figures(packed_run, tmp_path):
    run = packed_run.run_dir
    rc, (result,), err = run_cli(plot_cli.main, run, "--out", tmp_path)
    assert rc == 0, err
    names = {Path(p).name for p in result["written"]}
    assert names == {"losses.png", "cycle_weights.png", "optimization.png", "throughput.png", "eval.png",
                     "metrics.png"}
    for p in result["written"]:
        assert Path(p).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and Path(p).stat().st_size > 10_000


def test_plot_keeps_the_last_line_of_a_repeated_step(packed_run, tmp_path):
    lines = (packed_run.run_dir / LOG_NAME).read_text().splitlines()
    replayed = json.loads(lines[0])
    replayed["loss"] = 123.0  # a resumed run logs the step again; its line is the one that counts
    (tmp_path / LOG_NAME).write_text("\n".join(lines + [json.dumps(replayed)]) + "\n")
    records = plot_cli.read_log(tmp_path)
    assert [r["step"] for r in records] == [1, 2, 3]
    assert records[0]["loss"] == 123.0
    with pytest.raises(LogError, match="does not exist"):
        plot_cli.read_log(tmp_path / "nowhere")


def test_plot_draws_an_evaluation_beside_its_baselines(packed_run, tmp_path):
    loaded = load(packed_run.run_dir)
    cfg = loaded.cfg
    baselines = Baselines.from_split(cfg, "train", loaded.latent_space.to_data)
    metrics = evaluate(loaded.model, cfg, load_batches(cfg, "validation", 4, 2), t2l_steps=2, baselines=baselines)
    saved = tmp_path / "eval.json"
    saved.write_text(json.dumps(metrics))
    rc, (result,), err = run_cli(plot_cli.main, packed_run.run_dir, "--out", tmp_path / "plots", "--evaluation", saved)
    assert rc == 0, err
    figure = tmp_path / "plots" / "evaluation.png"
    assert str(figure) in result["written"] and figure.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # An ablation.json names its runs; anything else is refused before drawing.
    ablation = tmp_path / "ablation.json"
    ablation.write_text(json.dumps({"runs": [{"run": name, "evaluation": metrics} for name in ("a", "b")]}))
    assert list(plot_cli.read_evaluations(ablation)) == ["a", "b"]
    assert list(plot_cli.read_evaluations(saved)) == ["eval"]
    (tmp_path / "bad.json").write_text("{}")
    rc, _, err = run_cli(plot_cli.main, packed_run.run_dir, "--out", tmp_path / "x",
                         "--evaluation", tmp_path / "bad.json")
    assert rc == 2 and "neither an evaluation" in err and not (tmp_path / "x").exists()
