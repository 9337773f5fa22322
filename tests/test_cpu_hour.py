"""recipes/10_cpu_hour: the short version of its README's commands (a few steps of the recipe on the
embedded corpus, in this process, then evaluate and sample from held-out latents), and every number
its README quotes equal to the measured evaluation.json and samples.json beside it."""
from __future__ import annotations

import json
import re

from lgdlm_ds import evaluate as evaluate_cli
from lgdlm_ds import sample as sample_cli
from lgdlm_ds import train as train_cli
from core_utils import ROOT, run_cli

FOLDER = ROOT / "recipes" / "10_cpu_hour"
RECIPE = FOLDER / "recipe.yaml"
# README table columns after the run's own value: the baselines by evaluate's predictor name.
BASELINE_COLUMNS = ("mean_latent", "ridge_tfidf", "unigram", "nearest_neighbour")


def test_the_short_version_trains_evaluates_and_samples(tmp_path, world_of_one):
    run = tmp_path / "cpu_hour"
    assert train_cli.main([str(RECIPE), "training.num_train_steps=4", "training.micro_batch_size=8",
                           "training.warmup_steps=2", "training.eval_every=4", "training.eval_batches=1",
                           "logging.save_every=4", "logging.log_every=2", "logging.progress_bar=false",
                           f"logging.run_dir={run}"]) == 0
    rc, lines, err = run_cli(evaluate_cli.main, run, "--batches", "2")
    assert rc == 0, err
    ev = lines[-1]
    assert ev["step"] == 4 and ev["t2l_latent_cosine"] == ev["t2l_x0_latent_cosine"]  # T2L at t = 1: one step
    for key in ("t2l_x0_latent_cosine", "t2l_x0_retrieval_accuracy", "latent_information", "l2t_text_loss",
                "baseline_ridge_tfidf_t2l_latent_cosine", "baseline_unigram_l2t_text_loss",
                "baseline_nearest_neighbour_l2t_token_accuracy"):
        assert isinstance(ev[key], float) and ev[key] == ev[key], key
    rc, rows, err = run_cli(sample_cli.main, run, "l2t", "--split", "validation", "--num", "2")
    assert rc == 0, err
    assert [r["split"] for r in rows] == ["validation"] * 2 and all(r["nearest_neighbour"] for r in rows)


def test_the_readme_quotes_the_measured_numbers():
    """Every row of the README's results table that names an evaluate key holds that key's value and
    its baselines' (three decimals) from evaluation.json; the sample table, samples.json's rows."""
    readme = (FOLDER / "README.md").read_text()
    ev = json.loads((FOLDER / "evaluation.json").read_text())
    rows = [line.split("|")[1:-1] for line in readme.splitlines() if re.match(r"\| .*`[a-z0-9_]+` \|", line)]
    assert len(rows) >= 6
    for cells in rows:
        key = re.search(r"`([a-z0-9_]+)`", cells[0]).group(1)
        assert cells[1].strip() == f"{ev[key]:.3f}", key
        for name, cell in zip(BASELINE_COLUMNS, cells[2:]):
            if cell.strip() != "—":
                assert cell.strip() == f"{ev[f'baseline_{name}_' + key.replace('t2l_x0_', 't2l_')]:.3f}", (key, name)
    samples = json.loads((FOLDER / "samples.json").read_text())["samples"]
    for row in samples:
        assert f"| {row['source']} | {row['text']} | {row['cosine_to_source']:.3f} | {row['nearest_neighbour']} | " \
               f"{row['nearest_neighbour_cosine']:.3f} |" in readme
