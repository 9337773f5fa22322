"""``lgdlm_ds.export`` from ZeRO-0/2/3 runs (conftest.py's): the exported model equals the engine's,
in both layouts; what the export records; checkpoints that do not fit the config are refused."""
import json

import pytest
import torch
import yaml

from lgdlm_ds import export as export_cli
from lgdlm_ds import sample as sample_cli
from lgdlm_ds.config import load_config
from lgdlm_ds.evaluate import load_batches
from lgdlm_ds.loading import load, load_exported
from lgdlm_ds.model import build_model, load_upstream_state_dict
from core_utils import run_cli
from engine_utils import SENTENCES


def _outputs(model, batch) -> tuple[torch.Tensor, torch.Tensor]:
    """Text logits and latent prediction on a batch at fixed random times."""
    g = torch.Generator().manual_seed(0)
    B = batch["input_ids"].shape[0]
    with torch.no_grad():
        logits, latent = model(batch["input_ids"], batch["latent"], torch.rand(B, generator=g),
                               torch.rand(B, generator=g), batch["attention_mask"])
    return logits.float(), latent.float()


@pytest.mark.parametrize("run_name", ["packed_run", "zero3_run", "learned_run"])
def test_export_reloads_the_engines_model(run_name, request, tmp_path):
    """ZeRO-2, ZeRO-3 and ZeRO-0: the exported directory alone rebuilds a model whose outputs
    equal those of the engine's model, in both layouts."""
    trainer = request.getfixturevalue(run_name)
    rc, (summary,), err = run_cli(export_cli.main, trainer.run_dir, "--out", tmp_path / "export", "--upstream-layout")
    assert rc == 0, err
    assert summary["step"] == trainer.progress.step and {"model.safetensors", "checkpoint.pt"} <= set(summary["files"])
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
    rc, _, err = run_cli(export_cli.main, packed_run.run_dir, "--out", tmp_path, "--tag", "global_step3")
    assert rc == 0, err
    info = json.loads((tmp_path / "export.json").read_text())
    assert (info["step"], info["mask_token_id"], info["pad_token_id"], info["vocab_size"]) == (3, 103, 0, 30522)
    assert len(info["latent_space"]["mean"]) == 384  # standardised: the mean/std travel with the model
    assert load_config(tmp_path / "config.yaml").model == packed_run.cfg.model
    # An exported directory evaluates and samples like the run it came from.
    loaded = load(tmp_path)
    assert loaded.step == 3 and loaded.latent_space.to_dict() == load(packed_run.run_dir).latent_space.to_dict()
    rc, rows, err = run_cli(sample_cli.main, tmp_path, "t2l", "--sentences", SENTENCES[0])
    assert rc == 0 and len(rows[0]["latent"]) == 384, err


@pytest.mark.parametrize("run_name", ["packed_run", "learned_run"])
@pytest.mark.parametrize("key, value, problem, names", [
    ("qk_norm", True, "missing", "q_rmsnorms"),      # the configured model has weights the checkpoint lacks
    ("n_blocks", 1, "unexpected", "mmdit.blocks.1"),  # the checkpoint has weights the model lacks
])
def test_export_refuses_a_checkpoint_that_does_not_match(run_name, key, value, problem, names, request, tmp_path,
                                                          run_dir):
    """zero_to_fp32 (ZeRO-2) and the module file (ZeRO-0) would load non-strictly; export names the keys."""
    trainer = request.getfixturevalue(run_name)
    config = yaml.safe_load((trainer.run_dir / "config.yaml").read_text())
    config["model"][key] = value
    (run_dir / "config.yaml").write_text(yaml.safe_dump(config))
    (run_dir / "checkpoints").symlink_to(trainer.run_dir / "checkpoints")
    rc, _, err = run_cli(export_cli.main, run_dir, "--out", tmp_path / "out")
    assert rc == 2 and problem in err and names in err and "config.yaml" in err, err
    assert not (tmp_path / "out" / "export.json").exists()
