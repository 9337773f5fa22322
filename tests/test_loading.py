"""Loading trained weights (conftest.py's runs): the latent space, every kind of path the weights
are read from, and clear errors before any work. Warm starts (model.init_from): the older
checkpoint.pt, shapes and fresh keys, mmdit 0.2.x residual streams, resumed runs; files whose
pickle would run code."""
import dataclasses
import importlib
import importlib.util
import json
import os
import pickle
import re
import shutil
import subprocess
import sys
import types

import pytest
import torch

from lgdlm_ds import evaluate as evaluate_cli
from lgdlm_ds import export as export_cli
from lgdlm_ds.data import PackedDataset
from lgdlm_ds.config import ConfigError, load_config
from lgdlm_ds.loading import LatentSpace, LoadError, load, load_exported, read_weights
from lgdlm_ds.model import build_model, upstream_state_dict
from lgdlm_ds.warm_start import apply_init_from
from core_utils import ROOT, run_cli, tiny_batch, tiny_config


def test_standardised_latents_convert_both_ways(packed_run, packed_data):
    space = load(packed_run.run_dir).latent_space
    raw = PackedDataset(packed_data, "validation")[0]["latent"]
    standardised = PackedDataset(packed_data, "validation", standardize_latents=True)[0]["latent"]
    torch.testing.assert_close(space.to_model(raw), standardised)
    torch.testing.assert_close(space.to_data(standardised), raw, rtol=1e-5, atol=1e-6)
    assert LatentSpace.from_dict(space.to_dict()).to_dict() == space.to_dict()


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
    rc, _, err = run_cli(evaluate_cli.main, bare)
    assert rc == 2 and "holds no complete checkpoint" in err
    with pytest.raises(LoadError, match="not written by lgdlm_ds.export"):
        load_exported(run)


# ---------------------------------------------------------------- warm start and untrusted files


def _source_model(cfg, seed: int = 1):
    """A model with every weight perturbed (the zero-initialised adaLN gates would hide most of them)."""
    torch.manual_seed(seed)
    model = build_model(cfg.model, warm_start=False)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model.eval()


def _outputs(model, batch):
    t = torch.linspace(0.1, 0.9, len(batch["input_ids"]))
    with torch.no_grad():
        return model.eval()(batch["input_ids"], batch["latent"], t, t.flip(0), batch["attention_mask"])


SCHEDULE_BUFFERS = ("text_noise_schedule.log_prior", "text_noise_schedule.log_gamma", "text_noise_schedule.log_B")


def _older_checkpoint(path, source, tmp_path, monkeypatch, state_dict=None, keep_code=False):
    """``path`` in the older trainer's checkpoint.pt layout, its ``state`` a dataclass of a module
    that is gone (from sys.modules and from disk) when the file is read, or, with ``keep_code``,
    still installed."""
    code = tmp_path / "older_code"
    code.mkdir(exist_ok=True)
    (code / "older_lgdlm_trainer.py").write_text(
        "import dataclasses\n@dataclasses.dataclass\nclass TrainingState:\n    step: int = 1000\n    epoch: int = 2\n")
    monkeypatch.syspath_prepend(str(code))
    import older_lgdlm_trainer
    model_state = state_dict if state_dict is not None else upstream_state_dict(source)
    model_state.update({name: torch.zeros(4) for name in SCHEDULE_BUFFERS})
    optimizer = torch.optim.AdamW(source.parameters())
    torch.save({"model_state_dict": model_state, "optimizer_state_dict": optimizer.state_dict(),
                "state": older_lgdlm_trainer.TrainingState(), "config": None}, path)
    if keep_code:
        return path
    shutil.rmtree(code)
    monkeypatch.delitem(sys.modules, "older_lgdlm_trainer")
    importlib.invalidate_caches()
    assert importlib.util.find_spec("older_lgdlm_trainer") is None
    return path


def test_older_checkpoint_warm_starts_the_model_it_came_from(tmp_path, monkeypatch, capsys):
    """build_model(cfg.model) with model.init_from = the older checkpoint.pt computes what the source
    model computed; the pickled training state, of a class that is gone, is read past, not imported."""
    cfg = tiny_config()
    source = _source_model(cfg)
    path = _older_checkpoint(tmp_path / "checkpoint.pt", source, tmp_path, monkeypatch)
    with pytest.raises(pickle.UnpicklingError):
        torch.load(path, weights_only=True)
    with pytest.raises(ModuleNotFoundError, match="older_lgdlm_trainer"):
        torch.load(path, weights_only=False)

    warm = tiny_config(f"model.init_from={path}")
    torch.manual_seed(2)
    model = build_model(warm.model)
    batch = tiny_batch(cfg)
    for got, expected in zip(_outputs(model, batch), _outputs(source, batch)):
        assert torch.equal(got, expected)

    log = capsys.readouterr().err
    assert f"init_from: {len(source.state_dict())} weights loaded from {path}" in log
    assert "3 left out: text_noise_schedule.log_prior" in log
    assert "'state': an object of older_lgdlm_trainer.TrainingState, a class not available here" in log
    report = apply_init_from(build_model(cfg.model), warm.model)
    assert report.kind == "checkpoint.pt of the older trainer's layout (model_state_dict)"
    assert report.loaded == list(source.state_dict()) and not (report.missing or report.mismatched or report.fresh)
    assert report.unexpected == report.dropped == list(SCHEDULE_BUFFERS)
    assert [i.split(":")[0] for i in report.ignored] == ["'optimizer_state_dict'", "'state'", "'config'"]
    assert json.loads(report.to_json())["loaded"] == report.loaded


def test_a_misshapen_source_is_refused_naming_keys_and_fix_and_fresh_keys_let_them_start_fresh(tmp_path):
    cfg = tiny_config()
    source = _source_model(cfg)
    torch.save(source.state_dict(), tmp_path / "plain.pt")
    wider = tiny_config("model.latent_dim=6", f"model.init_from={tmp_path / 'plain.pt'}")
    model = build_model(wider.model, warm_start=False)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(LoadError) as refused:
        apply_init_from(model, wider.model)
    message = str(refused.value)
    assert "3 wrong shape: latent_encoder.projection.0.weight (64, 8) (model (64, 6))" in message
    assert "latent_head.3.weight (8, 64) (model (6, 64))" in message and "model.init_fresh_keys" in message
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())  # nothing loaded
    with pytest.raises(LoadError, match=r"3 wrong shape"):
        build_model(wider.model)

    fresh = tiny_config("model.latent_dim=6", f"model.init_from={tmp_path / 'plain.pt'}",
                        "model.init_fresh_keys=[latent_encoder.projection.0.weight, 'latent_head.3.*', "
                        "'latnet_head.*']")
    report = apply_init_from(model, fresh.model)
    assert report.fresh == ["latent_encoder.projection.0.weight", "latent_head.3.weight", "latent_head.3.bias"]
    assert "model.init_fresh_keys pattern 'latnet_head.*' names no weight" in report.summary()  # a typo shows
    for name, value in model.state_dict().items():
        assert torch.equal(value, before[name] if name in report.fresh else source.state_dict()[name]), name


def _hyper_connections_layout(model) -> dict[str, torch.Tensor]:
    """The model's state dict as mmdit 0.2.x wrote it: every residual stream a HyperConnections."""
    from hyper_connections.hyper_connections import HyperConnections
    from lgdlm_ds.weights_report import RESIDUAL_STREAM
    state = {k: v for k, v in upstream_state_dict(model).items() if not RESIDUAL_STREAM.match(k[len("model."):])}
    for name, module in model.named_modules():
        if RESIDUAL_STREAM.fullmatch(name + "."):
            older = HyperConnections(model.cfg.num_residual_streams, dim=model.cfg.hidden_size)
            state.update({f"model.{name}.{k}": v for k, v in older.state_dict().items()})
    return state


def test_a_residual_stream_layout_of_mmdit_0_2_is_named(tmp_path, monkeypatch):
    """HyperConnections tensors cannot drive ManifoldConstrainedHyperConnections: the error says
    which tensors and how to let them start fresh; with that, everything else loads."""
    cfg = tiny_config()
    source = _source_model(cfg)
    older_state = _hyper_connections_layout(source)
    residual = lambda state: sum(v.numel() for k, v in state.items() if "_residual_fns." in k)  # noqa: E731
    # One parameter fewer per residual-stream module (96 at the older shape).
    assert residual(upstream_state_dict(source)) - residual(older_state) == 2 * 2 * cfg.model.n_blocks
    path = _older_checkpoint(tmp_path / "checkpoint.pt", source, tmp_path, monkeypatch, older_state)
    with pytest.raises(LoadError) as refused:
        build_model(tiny_config(f"model.init_from={path}").model)
    message = str(refused.value)
    assert ("the residual streams are HyperConnections (mmdit 0.2.x) in the source and "
            "ManifoldConstrainedHyperConnections (mmdit 0.3.0) here") in message
    assert "mmdit.blocks.{0,1}.attn_residual_fns.{0,1}.dynamic_alpha_scale" in message
    assert "model.init_fresh_keys: ['mmdit.blocks.*_residual_fns.*']" in message

    fresh = tiny_config(f"model.init_from={path}", "model.init_fresh_keys=['mmdit.blocks.*_residual_fns.*']")
    model = build_model(fresh.model, warm_start=False)
    initial = {k: v.clone() for k, v in model.state_dict().items()}
    report = apply_init_from(model, fresh.model)
    assert report.residual_layout == {"source": "HyperConnections (mmdit 0.2.x)",
                                      "model": "ManifoldConstrainedHyperConnections (mmdit 0.3.0)"}
    assert len(report.fresh) == 8 * 2 * 2 * cfg.model.n_blocks  # every tensor of every stream module
    for name, value in model.state_dict().items():
        assert torch.equal(value, initial[name] if name in report.fresh else source.state_dict()[name]), name


@pytest.mark.parametrize("call", ["os.system", "subprocess.call", "builtins.eval"])
def test_a_pickle_that_would_run_code_is_refused(call, tmp_path):
    marker = tmp_path / "MARKER"
    command = {"os.system": (os.system, (f"touch {marker}",)),
               "subprocess.call": (subprocess.call, (["touch", str(marker)],)),
               "builtins.eval": (eval, (f"open({str(marker)!r}, 'w')",))}[call]
    hostile = type("Hostile", (), {"__reduce__": lambda self: command})
    source = _source_model(tiny_config())
    torch.save({"model_state_dict": upstream_state_dict(source), "state": hostile()}, tmp_path / "checkpoint.pt")
    named = {"os.system": "posix.system", "subprocess.call": "subprocess.call", "builtins.eval": "builtins.eval"}[call]
    for read in (lambda: read_weights(tmp_path / "checkpoint.pt", tiny_config()),
                 lambda: build_model(tiny_config(f"model.init_from={tmp_path / 'checkpoint.pt'}").model)):
        with pytest.raises(LoadError, match=rf"names {re.escape(named)}, which unpickling would call"):
            read()
    assert not marker.exists()


def test_a_deepspeed_checkpoint_with_a_hostile_shard_is_refused(zero3_run, tmp_path):
    """zero_to_fp32 reads the shards with torch.load itself; it too goes through the restricted unpickler."""
    marker = tmp_path / "MARKER"
    folder = tmp_path / "checkpoints" / "global_step2"
    shutil.copytree(zero3_run.run_dir / "checkpoints" / "global_step2", folder)
    hostile = type("Hostile", (), {"__reduce__": lambda self: (os.system, (f"touch {marker}",))})
    torch.save({"optimizer_state_dict": hostile()}, folder / "zero_pp_rank_1_mp_rank_00_optim_states.pt")
    with pytest.raises(LoadError, match=r"global_step2 was refused: the file names posix\.system"):
        read_weights(folder, zero3_run.cfg)
    assert not marker.exists()


@pytest.mark.parametrize("stage", [0, 1])
def test_bf16_checkpoints_give_their_fp32_masters(stage, tmp_path, world_of_one):
    """bf16 ZeRO-0 keeps the masters in its optimizer state, bf16 ZeRO-1 in BF16_Optimizer partitions
    (zero_to_fp32 reads neither): each master rounds to the module's bf16 weight, and is finer."""
    from engine_utils import RUN, SYNTHETIC
    from lgdlm_ds.ds_config import load_ds_config
    from lgdlm_ds.safe_pickle import load as restricted_load
    from lgdlm_ds.trainer import Trainer
    ds = json.loads((ROOT / "ds_configs" / ("zero0.json" if stage == 0 else "zero2_bf16.json")).read_text())
    ds["zero_optimization"]["stage"], ds["bf16"]["enabled"] = stage, True
    (tmp_path / "ds.json").write_text(json.dumps(ds))
    cfg = load_config(None, RUN + SYNTHETIC + [
        "data.num_samples=8", "loss.loss_type=l2t", "training.num_train_steps=1", "training.micro_batch_size=4",
        f"training.ds_config={tmp_path / 'ds.json'}", f"logging.run_dir={tmp_path / 'run'}"])
    Trainer(cfg, load_ds_config(cfg)).train()
    masters = read_weights(tmp_path / "run", cfg)
    module_file = tmp_path / "run" / "checkpoints" / "global_step1" / "mp_rank_00_model_states.pt"
    module = restricted_load(module_file).obj["module"]
    assert module.keys() == {"model." + k for k in masters}
    assert all(masters[k].dtype == torch.float32 and torch.equal(masters[k].bfloat16(), module["model." + k])
               for k in masters)
    assert any(not torch.equal(v, v.bfloat16().float()) for v in masters.values())


def test_a_resumed_run_does_not_apply_init_from_again(tmp_path, world_of_one, capfd):
    """A fresh run starts from model.init_from (the report in the run directory); its resumption
    continues from its own checkpoint without reading model.init_from, which may be gone by then."""
    from engine_utils import RUN, SYNTHETIC, ds_json
    from lgdlm_ds.ds_config import load_ds_config
    from lgdlm_ds.trainer import Trainer, preflight
    run = tmp_path / "run"
    cfg = load_config(None, RUN + SYNTHETIC + [
        "data.num_samples=16", "loss.loss_type=l2t", "training.num_train_steps=4", "training.micro_batch_size=4",
        "logging.save_every=2", f"model.init_from={tmp_path / 'source.pt'}",
        f"training.ds_config={ds_json(tmp_path, 0)}", f"logging.run_dir={run}"])
    source = _source_model(cfg)
    torch.save(source.state_dict(), tmp_path / "source.pt")

    fresh = Trainer(cfg, load_ds_config(cfg))
    assert all(torch.equal(v, source.state_dict()[k]) for k, v in fresh.engine.module.model.state_dict().items())
    report = json.loads((run / "init_report.json").read_text())
    assert report["kind"] == "state dict file" and len(report["loaded"]) == len(source.state_dict())
    assert "init_from: fresh start: " in capfd.readouterr().err
    fresh.train(until_step=2)
    at_step_2 = read_weights(run, cfg)
    (tmp_path / "source.pt").unlink()
    elsewhere = dataclasses.replace(cfg, logging=dataclasses.replace(cfg.logging, run_dir=str(tmp_path / "other")))
    with pytest.raises(ConfigError, match=r"'model.init_from': '.*source.pt' does not exist"):
        preflight(elsewhere)  # a fresh run needs it, before DeepSpeed starts
    preflight(cfg)  # a resumed one does not

    resumed = Trainer(cfg, load_ds_config(cfg))
    assert f"init_from: not applied: resuming from {run / 'checkpoints' / 'global_step2'}" in capfd.readouterr().err
    assert resumed.progress.step == 2
    assert all(torch.equal(v, at_step_2[k]) for k, v in resumed.engine.module.model.state_dict().items())
    assert resumed.train()["step"] == 4

    # A run's DeepSpeed checkpoint is itself a source.
    warm = build_model(dataclasses.replace(cfg.model, init_from=str(run)))
    assert all(torch.equal(v, read_weights(run, cfg)[k]) for k, v in warm.state_dict().items())


def test_older_checkpoint_reads_while_the_older_code_is_installed(tmp_path, monkeypatch):
    """The older trainer's state class exists here: its dataclass is read past as a placeholder, never
    built by the real class, and the weights load; calling an existing name stays refused (above)."""
    cfg = tiny_config()
    source = _source_model(cfg)
    path = _older_checkpoint(tmp_path / "checkpoint.pt", source, tmp_path, monkeypatch, keep_code=True)
    import older_lgdlm_trainer
    monkeypatch.setattr(older_lgdlm_trainer.TrainingState, "__setstate__",
                        lambda self, state: pytest.fail("the real class was used"), raising=False)
    state = read_weights(path, cfg)
    assert all(torch.equal(state[k], v) for k, v in source.state_dict().items())
