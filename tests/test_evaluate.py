"""``lgdlm_ds.evaluate`` on models trained by the real engine (conftest.py's runs): the command's
line, determinism, the average over two launched ranks (``python tests/test_evaluate.py OUT``
under the DeepSpeed launcher), a learning test, and the text bound with and without the latent."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch.distributed
from torch.utils.data import default_collate

from lgdlm_ds import evaluate as evaluate_cli
from lgdlm_ds.batching import eval_batches
from lgdlm_ds.data import build_dataset
from lgdlm_ds.evaluate import evaluate, load_batches
from lgdlm_ds.loading import load
from core_utils import ROOT, run_cli, tiny_batch, tiny_config, tiny_step
from engine_utils import LEARN_STEPS, SYNTHETIC, launch, train_run

CONTRACT = ("l2t_token_accuracy", "l2t_text_loss", "t2l_latent_cosine", "t2l_retrieval_accuracy",
            "cycle_text_token_accuracy", "text_loss_without_latent", "num_samples", "step")
T2L_METRICS = ("latent_cosine", "retrieval_accuracy", "latent_mse", "retrieval_accuracy_at_8")
# The model's DDIM sample and x0 prediction, then the baselines, each with every T2L metric.
T2L_KEYS = tuple(f"{p}_{m}" for p in ("t2l", "t2l_x0", "baseline_mean_latent_t2l", "baseline_ridge_tfidf_t2l")
                 for m in T2L_METRICS)
L2T_BASELINES = ("baseline_unigram_l2t_text_loss", "baseline_unigram_l2t_token_accuracy",
                 "baseline_nearest_neighbour_l2t_token_accuracy")


def test_evaluate_command_prints_the_contract_line(packed_run):
    run = packed_run.run_dir
    proc = subprocess.run([sys.executable, "-m", "lgdlm_ds.evaluate", str(run), "--batches", "2",
                           "--t2l-steps", "2", "--decode-steps", "2"], cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert set(CONTRACT + T2L_KEYS + L2T_BASELINES) <= set(result)
    assert result["step"] == 3 and result["num_samples"] == 8 and result["t2l_retrieval_chance"] == 0.25
    assert "t2l_retrieval_accuracy_at_64" not in result  # 8 samples: the pool of 64 does not fit
    # Pools of all 8 samples: the mean latent ranks the same target first for every text, so 1 of 8.
    assert result["baseline_mean_latent_t2l_retrieval_accuracy_at_8"] == pytest.approx(1 / 8)
    assert result["baseline_train_samples"] > 8 and result["baseline_fit_seconds"] >= 0
    for key, value in result.items():
        if isinstance(value, float):
            assert math.isfinite(value), key
    for key in ("l2t_token_accuracy", "t2l_retrieval_accuracy", "cycle_text_token_accuracy",
                "l2t_decode_token_accuracy", *L2T_BASELINES[1:], *(k for k in T2L_KEYS if "retrieval" in k)):
        assert 0.0 <= result[key] <= 1.0
    assert -1.0 <= result["t2l_latent_cosine"] <= 1.0 and result["l2t_text_loss"] > 0
    # Two DDIM steps: the x0 prediction is another latent than the sample's.
    assert result["t2l_x0_latent_mse"] != result["t2l_latent_mse"]


def test_evaluate_is_deterministic_and_works_on_the_engine(packed_run):
    cfg = packed_run.cfg
    batches = load_batches(cfg, "validation", 4, 1)
    kwargs = dict(seed=3, t2l_steps=2, decode_steps=2)
    first = evaluate(packed_run.engine, cfg, batches, **kwargs)
    assert evaluate(packed_run.engine.module, cfg, batches, **kwargs) == first
    assert packed_run.engine.module.training  # the model's mode is restored
    loaded = load(packed_run.run_dir)
    assert evaluate(loaded.model, cfg, batches, **kwargs) == pytest.approx(first, rel=1e-5, abs=1e-6)
    assert evaluate(loaded.model, cfg, batches, **{**kwargs, "seed": 4}) != first  # the seed is used
    one_step = evaluate(loaded.model, cfg, batches, seed=3, t2l_steps=1)
    for key in ("latent_cosine", "retrieval_accuracy", "latent_mse", "retrieval_accuracy_at_4"):
        assert one_step[f"t2l_x0_{key}"] == one_step[f"t2l_{key}"]  # one step: the sample is the x0 prediction


TWO_RANK_RUN = SYNTHETIC + ["data.num_samples=16", "data.val_fraction=0.5", "loss.loss_type=cycle_vae",
                             "training.micro_batch_size=2", "training.num_train_steps=1"]

EVAL_SETTINGS = dict(seed=0, t2l_steps=2, decode_steps=2, elbo_samples=1, guidance=1.0)


def _two_rank_job(out: Path) -> None:
    """One launched rank: train a step under ZeRO-3, then evaluate this rank's two validation batches."""
    trainer = train_run(out, 3, TWO_RANK_RUN)
    val = build_dataset(trainer.cfg, "validation")
    index = eval_batches(len(val), trainer.world, trainer.rank, 2, 2)
    metrics = evaluate(trainer.engine, trainer.cfg, [default_collate([val[i] for i in idx]) for idx in index],
                       **EVAL_SETTINGS)
    (out / f"rank{trainer.rank}.json").write_text(json.dumps({"index": index, "metrics": metrics}))
    # Both ranks end the process group together: left to interpreter exit, one rank's communication
    # threads were once torn down while the other's were still in use ("terminate called", SIGABRT).
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


def test_evaluate_averages_over_ranks(tmp_path):
    """Two ranks under ZeRO-3, each with its own batches: both return the metrics of all samples.
    The deterministic ones (no T2L or no-latent noise, which is drawn per rank) equal a single
    process's on the same samples with the weights exported from the 2-rank checkpoint."""
    proc = launch(2, __file__, str(tmp_path))
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-6000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0]["metrics"] == ranks[1]["metrics"]
    assert ranks[0]["metrics"]["num_samples"] == 8 and ranks[0]["index"] != ranks[1]["index"]

    loaded = load(tmp_path / "run")
    val = build_dataset(loaded.cfg, "validation")
    batches = [default_collate([val[i] for i in idx]) for r in ranks for idx in r["index"]]
    single = evaluate(loaded.model, loaded.cfg, batches, **EVAL_SETTINGS)
    for key in ("l2t_token_accuracy", "l2t_text_loss", "l2t_decode_token_accuracy", "num_samples"):
        assert single[key] == pytest.approx(ranks[0]["metrics"][key], rel=1e-5), key
    assert all(math.isfinite(ranks[0]["metrics"][k]) for k in ("text_nelbo", "text_nelbo_without_latent"))


def test_the_text_bound_of_a_model_that_ignores_its_inputs():
    """Uniform logits (a zero text head): CE is log V at every masked token whatever the latent,
    so the bound with and without the latent is the same number and the latent is worth 0 nats;
    the bound itself is log V x sum(#masked / t) / #real, whose mean over the draws is log V."""
    cfg = tiny_config("loss.loss_type=unconditional")
    model = tiny_step(cfg).model
    torch.nn.init.zeros_(model.text_head.weight)
    batches = [tiny_batch(cfg, n=8)] * 4
    out = evaluate(model, cfg, batches, elbo_samples=8, t2l_steps=1)
    assert out["elbo_samples"] == 8 and out["latent_nats_per_token"] == 0.0
    assert out["text_nelbo"] == out["text_nelbo_without_latent"]
    # 256 stratified draws: the estimate of log V (5.7) is within 20% (the 1/t weight of the
    # smallest strata makes its spread heavy-tailed; it came out 2.3% low when this was written).
    assert out["text_nelbo"] == pytest.approx(math.log(cfg.model.vocab_size), rel=0.2)


def test_a_model_trained_longer_on_a_tiny_subset_learns_l2t(learned_run):
    """16 synthetic sentences, 80 steps of l2t at lr 1e-2, seed 0: on those sentences the untrained
    model is at chance (1/126 per token) and the trained one reads at least half the tokens from
    the latent alone (0.78 when this was written), which carries > 1 nat per token."""
    run = learned_run.run_dir
    rc, (untrained,), _ = run_cli(evaluate_cli.main, run, "--split", "train", "--untrained", "--no-baselines")
    rc2, (trained,), _ = run_cli(evaluate_cli.main, run, "--split", "train")
    assert rc == rc2 == 0
    assert not any(k.startswith("baseline_") for k in untrained)
    # On the training split the nearest neighbour of a true latent is its own sentence.
    assert trained["baseline_nearest_neighbour_l2t_token_accuracy"] == 1.0
    assert untrained["step"] == 0 and trained["step"] == LEARN_STEPS and trained["num_samples"] == 16
    assert untrained["l2t_token_accuracy"] < 0.05
    assert trained["l2t_token_accuracy"] > 0.5
    assert trained["latent_information"] > 1.0
    assert trained["l2t_text_loss"] < untrained["l2t_text_loss"] - 2.0
    # The bound on partly masked text (which l2t never trained) still prices the latent.
    rc, (bound,), err = run_cli(evaluate_cli.main, run, "--split", "train", "--elbo-samples", "2")
    assert rc == 0, err
    assert bound["latent_nats_per_token"] > 0.5 and bound["text_nelbo"] > 0


if __name__ == "__main__":
    _two_rank_job(Path(sys.argv[-1]))
