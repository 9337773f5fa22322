"""README.md's table of the recipes says what the code says: one row per recipes/**/recipe.yaml,
and its parameter count, ZeRO stage, micro-batch and memory per GPU are what
``python -m lgdlm_ds.memory RECIPE --gpus G --gpu-mem M`` prints for that recipe (the row of the
recipe's ZeRO stage). The largest micro-batch, which the command also prints, is not in the table:
finding it is the slow part of the prediction, so it is left out here."""
from __future__ import annotations

import re

import pytest

from lgdlm_ds.config import load_config
from lgdlm_ds.ds_config import load_ds_config
from lgdlm_ds.tools import memory
from core_utils import ROOT

RECIPES = sorted(p.parent.name for p in (ROOT / "recipes").glob("*/recipe.yaml"))
# | [folder](recipes/folder/README.md) | purpose | parameters | ZeRO, precision | micro-batch | G × M GiB | s + a = t |
ROW = re.compile(r"^\| \[(?P<folder>[\w.-]+)\]\(recipes/(?P=folder)/README\.md\) \|[^|]+\| (?P<params>[\d.]+[MB]) \| "
                 r"(?P<stage>\d), (?P<precision>bf16|fp32) \| (?P<micro>\d+) \| (?P<gpus>\d+) × (?P<mem>\d+) GiB \| "
                 r"(?P<states>[\d.]+) \+ (?P<activations>[\d.]+) = (?P<total>[\d.]+) \|$")


def _rows() -> dict[str, dict]:
    return {m["folder"]: m.groupdict() for line in (ROOT / "README.md").read_text().splitlines()
            if (m := ROW.match(line))}


def test_every_recipe_has_one_row():
    assert sorted(_rows()) == RECIPES


@pytest.mark.parametrize("folder", RECIPES)
def test_the_row_is_what_the_memory_command_prints(folder, monkeypatch):
    row = _rows()[folder]
    monkeypatch.setattr(memory, "_largest_micro_batch", lambda *args: 0)
    cfg = load_config(ROOT / "recipes" / folder / "recipe.yaml")
    r = memory.report(cfg, int(row["gpus"]), float(row["mem"]))
    ds = load_ds_config(cfg)
    stage = r["stages"][f"zero{ds['zero_optimization']['stage']}"]
    total = r["total_params"]
    assert row["params"] == (f"{total / 1e9:.2f}B" if total >= 1e9 else f"{total / 1e6:.1f}M")
    assert (row["precision"], int(row["micro"])) == ({"bfloat16": "bf16", "float32": "fp32"}[r["compute_dtype"]],
                                                     r["micro_batch_size"])
    assert int(row["stage"]) == ds["zero_optimization"]["stage"]
    assert (row["states"], row["activations"], row["total"]) == tuple(
        f"{stage[k]:.1f}" for k in ("model_states_gib", "activations_gib", "total_gib"))
