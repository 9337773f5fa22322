"""The DeepSpeed JSON: the shipped ones pass and get the recipe's batch; JSONs that own what the
recipe owns, or rely on version-dependent defaults, are refused."""
import json

import pytest

from lgdlm_ds.config import ConfigError, load_config
from lgdlm_ds.ds_config import load_ds_config
from core_utils import ROOT, SMOKE


def _with_json(tmp_path, ds: dict, *overrides):
    path = tmp_path / "ds.json"
    path.write_text(json.dumps(ds))
    return load_config(SMOKE, [f"training.ds_config={path}", *overrides])


def test_shipped_jsons_pass_and_get_the_batch_injected():
    for name in ("zero0", "zero2_bf16", "zero3_bf16", "zero3_offload_bf16"):
        cfg = load_config(SMOKE, [f"training.ds_config=ds_configs/{name}.json", "training.micro_batch_size=3",
                                  "training.gradient_accumulation_steps=5"])
        ds = load_ds_config(cfg)
        assert (ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"]) == (3, 5)
        assert "train_batch_size" not in ds
        assert ds["bf16"]["check_grad_overflow"] is True


def test_stagewise_cycle_vae_doubles_deepspeeds_accumulation():
    cfg = load_config(SMOKE, ["loss.cycle_stagewise=true", "training.gradient_accumulation_steps=3"])
    assert load_ds_config(cfg)["gradient_accumulation_steps"] == 6


@pytest.mark.parametrize("change, message", [
    ({"train_batch_size": 32}, "remove 'train_batch_size'"),
    ({"gradient_accumulation_steps": 2}, "training.gradient_accumulation_steps"),
    ({"optimizer": {"type": "AdamW"}}, "remove 'optimizer'"),
    ({"zero_optimization": {"stage": 2, "reduce_bucket_size": "auto"}}, "zero_optimization.reduce_bucket_size"),
    ({"bf16": {"enabled": True}}, "check_grad_overflow"),
    ({"fp16": {"enabled": True}}, "fp16 is not supported"),
])
def test_bad_jsons_are_refused(tmp_path, change, message):
    ds = json.loads((ROOT / "ds_configs/zero0.json").read_text()) | change
    with pytest.raises(ConfigError, match=message):
        load_ds_config(_with_json(tmp_path, ds))


def test_version_dependent_defaults_must_be_written_out(tmp_path):
    ds = json.loads((ROOT / "ds_configs/zero0.json").read_text())
    del ds["gradient_clipping"]
    with pytest.raises(ConfigError, match="set gradient_clipping explicitly"):
        load_ds_config(_with_json(tmp_path, ds))
