"""Fixtures shared by several test files: ``run_dir`` (an empty run directory), ``world_of_one``
(this process as rank 0 of 1 during a test, to start DeepSpeed in-process), and, built once per
session, a packed dataset of real sentences (the data and preparation tests) and three short
training runs (the evaluate, sample, export, loading and plot tests).

- ``prepared``: the first 20 stories of the Lee news corpus (about 180 sentences), prepared at
  sequence length 48 with all-MiniLM-L6-v2 latents, 40 samples per shard;
- ``packed_run``: ZeRO-2, cycle_vae on real sentences (four Lee news stories, standardised latents),
  3 steps, one evaluation during training;
- ``zero3_run``: ZeRO-3, cycle_vae on synthetic data, 2 steps;
- ``learned_run``: ZeRO-0, l2t on 16 synthetic samples for 80 steps (the learning test).
All runs are fp32, so the engine's weights and the exported ones must agree exactly.

Tests marked ``slow`` are deselected unless a ``-m`` expression is given (``-m slow`` runs them).

The fixtures import what they build from (torch, DeepSpeed, the tokenizer and encoder stack) when
they first run: every test run reads this file, also of tests that need none of it.
"""
from __future__ import annotations

from pathlib import Path

import pytest

from lgdlm_ds.corpus import LEE_BACKGROUND, corpus_path


def _lee_stories(path: Path, n: int) -> Path:
    """The first ``n`` stories of the Lee corpus, one per line as in the original."""
    with open(corpus_path(LEE_BACKGROUND), encoding="utf-8") as f:
        path.write_text("".join(f.readline() for _ in range(n)), encoding="utf-8")
    return path


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: a long run, deselected unless selected with -m (README, Testing)")


def pytest_collection_modifyitems(config, items):
    """Tests marked slow run only when a -m expression is given (``-m slow``)."""
    if config.option.markexpr:
        return
    slow = [item for item in items if "slow" in item.keywords]
    if slow:
        config.hook.pytest_deselected(items=slow)
        items[:] = [item for item in items if "slow" not in item.keywords]


@pytest.fixture
def run_dir(tmp_path) -> Path:
    run = tmp_path / "run"
    run.mkdir()
    return run


@pytest.fixture
def world_of_one():
    """This process as rank 0 of 1 during the test, so it can start DeepSpeed in-process."""
    import engine_utils
    with engine_utils.world_of_one():
        yield


# ---------------------------------------------------------------- the packed dataset


@pytest.fixture(scope="session")
def corpus(tmp_path_factory) -> Path:
    """The first 20 stories of the Lee corpus (about 180 sentences)."""
    return _lee_stories(tmp_path_factory.mktemp("corpus") / "lee20.txt", 20)


@pytest.fixture(scope="session")
def prepare_settings(corpus):
    from core_utils import SEQ_LEN
    from lgdlm_ds import prepare as prep
    return prep.Settings(corpus=str(corpus), seq_len=SEQ_LEN, val_fraction=0.1, shard_size=40, batch_size=32)


@pytest.fixture(scope="session")
def prepared(tmp_path_factory, prepare_settings) -> tuple[Path, dict]:
    from lgdlm_ds import prepare as prep
    out = tmp_path_factory.mktemp("packed")
    return out, prep.prepare(out, prepare_settings, device="cpu")


# ---------------------------------------------------------------- short training runs


@pytest.fixture(scope="session")
def packed_data(tmp_path_factory) -> Path:
    """Four Lee stories (about 30 sentences) prepared at sequence length 48."""
    from lgdlm_ds import prepare as prep
    tmp = tmp_path_factory.mktemp("packed")
    corpus = _lee_stories(tmp / "lee4.txt", 4)
    prep.prepare(tmp / "data", prep.Settings(corpus=str(corpus), seq_len=48, val_fraction=0.3, batch_size=32),
                 device="cpu")
    return tmp / "data"


@pytest.fixture(scope="session")
def packed_run(tmp_path_factory, packed_data):
    from engine_utils import train_run
    return train_run(tmp_path_factory.mktemp("zero2"), 2, [
        "data.kind=packed", f"data.path={packed_data}", "data.val_fraction=0.3", "data.standardize_latents=true",
        "model.vocab_size=30522", "model.max_seq_len=48", "model.latent_dim=384",
        "loss.loss_type=cycle_vae", "loss.latent_t_mode=random", "loss.cycle_text_ramp_steps=2",
        "loss.cycle_latent_ramp_steps=2", "training.micro_batch_size=4", "training.num_train_steps=3",
        "training.lr=3e-3", "training.eval_every=3", "training.eval_batches=1"])


@pytest.fixture(scope="session")
def zero3_run(tmp_path_factory):
    from engine_utils import SYNTHETIC, train_run
    return train_run(tmp_path_factory.mktemp("zero3"), 3, SYNTHETIC + [
        "data.num_samples=32", "data.val_fraction=0.25", "loss.loss_type=cycle_vae", "loss.latent_t_mode=random",
        "training.micro_batch_size=4", "training.num_train_steps=2", "training.lr=3e-3"])


@pytest.fixture(scope="session")
def learned_run(tmp_path_factory):
    from engine_utils import LEARN_STEPS, SYNTHETIC, train_run
    return train_run(tmp_path_factory.mktemp("zero0"), 0, SYNTHETIC + [
        "data.num_samples=16", "data.val_fraction=0.25", "loss.loss_type=l2t", "training.micro_batch_size=8",
        f"training.num_train_steps={LEARN_STEPS}", "training.lr=1e-2", "training.seed=0", "logging.log_every=20"])
