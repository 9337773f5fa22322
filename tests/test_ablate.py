"""python -m lgdlm_ds.ablate: the seven runs of recipes/ablations trained (a few steps of a tiny
model on synthetic data, in this process), evaluated, and compared in a Markdown and a JSON table;
bad input refused before the first run."""
from __future__ import annotations

import json

import pytest
import yaml

from lgdlm_ds import ablate
from lgdlm_ds.config import load_config
from lgdlm_ds.metrics import LOG_NAME

RUNS = ["l2t", "t2l", "unconditional", "random", "cycle_text", "cycle_latent", "both"]
TINY = ["model.vocab_size=128", "model.hidden_size=32", "model.cond_dim=32", "model.n_blocks=1",
        "model.max_seq_len=16", "model.latent_dim=16", "model.attn_heads=2", "model.attn_dim_head=16",
        "data.kind=synthetic", "data.path=", "data.corpus=", "data.standardize_latents=false",
        "data.num_samples=32", "data.val_fraction=0.25", "training.micro_batch_size=4", "training.warmup_steps=1",
        "training.eval_every=2", "logging.log_every=1", "logging.progress_bar=false",
        "loss.cycle_text_ramp_steps=0", "loss.cycle_latent_ramp_steps=0"]


def test_the_runs_are_the_ablation_matrix_and_load():
    runs = ablate.read_runs(ablate.RECIPE.with_name(ablate.RUNS_FILE))
    assert list(runs) == RUNS
    loss_types = [load_config(ablate.RECIPE, o).loss for o in runs.values()]
    assert [lo.loss_type for lo in loss_types] == ["l2t", "t2l", "unconditional", "random"] + ["cycle_vae"] * 3
    assert [(lo.cycle_text_weight > 0, lo.cycle_latent_weight > 0) for lo in loss_types[4:]] == [
        (True, False), (False, True), (True, True)]
    assert all(lo.cycle_stop_grad_latent for lo in loss_types)


def test_seven_runs_trained_evaluated_and_tabled(tmp_path, world_of_one, capsys):
    out, report = tmp_path / "ablation", tmp_path / "docs" / "results.md"
    argv = ["--launcher", "local", "--steps", "2", "--out", str(out), "--report", str(report), *TINY]
    assert ablate.main(argv) == 0
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert printed["runs"] == RUNS and printed["report"] == str(report)

    table = json.loads((out / ablate.TABLE_JSON).read_text())
    assert [r["run"] for r in table["runs"]] == RUNS and table["steps"] == 2
    for row in table["runs"]:
        assert row["evaluation"]["step"] == 2 and row["last_log"]["step"] == 2
        assert 0 <= row["evaluation"]["l2t_token_accuracy"] <= 1
        assert yaml.safe_load((out / row["run"] / "config.yaml").read_text())["training"]["num_train_steps"] == 2
    by_run = {r["run"]: r["last_log"] for r in table["runs"]}
    assert "cycle_text_loss" in by_run["cycle_text"] and "cycle_latent_loss" not in by_run["cycle_text"]
    assert "cycle_latent_loss" in by_run["cycle_latent"] and "cycle_text_loss" not in by_run["cycle_latent"]

    md = (out / ablate.TABLE_MD).read_text().splitlines()
    rows = [line for line in md if line.startswith("| ") and not line.startswith("| run ")]
    assert [r.split("|")[1].strip() for r in rows] == RUNS + [f"baseline: {label}" for label, _ in ablate.BASELINES]
    assert (out / ablate.TABLE_PNG).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert len({len(line.split("|")) for line in md if line.startswith("|")}) == 1  # every row has every column

    # The report: the command, every run's training time, the same table, both figures beside it.
    text = report.read_text()
    assert f"`python -m lgdlm_ds.ablate {' '.join(argv)}`" in text
    assert all(f"{r['run']} {r['train_seconds'] / 60:.1f}" in text for r in table["runs"])
    assert "\n".join(md[2:]) in text and text.endswith(ablate.REPORT_NOTES + "\n")
    for name in (ablate.TABLE_PNG, ablate.CURVES_PNG):
        assert (tmp_path / "docs" / "results" / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert f"](results/{name})" in text
    # Written again, it keeps what was written by hand below the marker.
    report.write_text(text.replace("# Results", "# Stale") + "The cycle terms do not help here.\n")
    ablate.write_report(report, table["runs"], ablate.RECIPE, out, ["--out", str(out)])
    again = report.read_text()
    assert again.startswith("# Results") and "Stale" not in again
    assert again.endswith(ablate.REPORT_NOTES + "\nThe cycle terms do not help here.\n")

    # A resumed run logs some steps again: the table keeps the last line of each step.
    log = out / "both" / LOG_NAME
    lines = log.read_text().splitlines()
    log.write_text("\n".join(lines + [json.dumps({**json.loads(lines[-1]), "loss": 123.0})]) + "\n")
    assert ablate.last_log_line(ablate.Run("both", [], [], out / "both"))["loss"] == 123.0


@pytest.mark.parametrize("argv, message", [
    (["loss.loss_type=t2l"], "loss.loss_type: set by the runs themselves"),
    (["model.hidden_sise=8"], "model.hidden_size"),
    (["training.lr=-1"], "ablation run 'l2t': config key 'training.lr'"),
])
def test_bad_input_is_refused_before_any_run(tmp_path, capsys, argv, message):
    assert ablate.main(["--out", str(tmp_path / "out"), *argv]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_the_matrix_over_another_recipe(tmp_path):
    """--runs: the seven runs of recipes/ablations over recipes/10_cpu_hour, its size and data kept."""
    recipe = ablate.ROOT / "recipes" / "10_cpu_hour" / "recipe.yaml"
    runs = ablate.plan_runs(recipe, ablate.RECIPE.with_name(ablate.RUNS_FILE), [], 500, tmp_path)
    assert [r.name for r in runs] == RUNS
    cfgs = [load_config(recipe, r.config) for r in runs]
    assert {(c.model.hidden_size, c.model.n_blocks, c.training.num_train_steps, c.loss.latent_t_mode)
            for c in cfgs} == {(256, 4, 500, "full")}
    assert [c.loss.loss_type for c in cfgs] == ["l2t", "t2l", "unconditional", "random"] + ["cycle_vae"] * 3


def test_a_report_must_be_markdown(tmp_path, capsys):
    assert ablate.main(["--out", str(tmp_path / "out"), "--report", str(tmp_path / "results.txt")]) == 2
    assert "name a Markdown file" in capsys.readouterr().err


def test_a_missing_runs_file_is_named(tmp_path, capsys):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(ablate.RECIPE.read_text())
    assert ablate.main(["--recipe", str(recipe), "--out", str(tmp_path / "out")]) == 2
    assert "runs.yaml does not exist" in capsys.readouterr().err
    assert ablate.main(["--runs", str(tmp_path / "mine.yaml"), "--out", str(tmp_path / "out")]) == 2
    assert "mine.yaml does not exist" in capsys.readouterr().err
