"""Every recipes/**/recipe.yaml loads and validates, builds its model on the meta device (no memory
for weights), names a DeepSpeed JSON that passes the checks, and sits in a folder with a README.md:
a new recipe is tested by being there. A warm start (``model.init_from``) names a checkpoint the
user holds: it is emptied here and everything else is checked."""
from __future__ import annotations

import pytest
import yaml

from lgdlm_ds.config import load_config
from lgdlm_ds.ds_config import load_ds_config
from lgdlm_ds.model import build_model, parameter_counts
from core_utils import ROOT, SMOKE

RECIPES = sorted((ROOT / "recipes").glob("**/recipe.yaml"))


def _folder(path) -> str:
    return str(path.relative_to(ROOT / "recipes"))


def test_the_recipes_are_found():
    assert SMOKE in RECIPES


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: _folder(p.parent))
def test_recipe_loads_builds_and_its_deepspeed_json_passes(recipe):
    warm_start = (yaml.safe_load(recipe.read_text()).get("model") or {}).get("init_from")
    cfg = load_config(recipe, ["model.init_from="] if warm_start else [])
    model = build_model(cfg.model, device="meta")
    assert all(p.is_meta for p in model.parameters()) and parameter_counts(model)["total_params"] > 0
    ds = load_ds_config(cfg)
    assert ds["train_micro_batch_size_per_gpu"] == cfg.training.micro_batch_size


@pytest.mark.parametrize("folder", sorted({r.parent for r in RECIPES}), ids=_folder)
def test_recipe_folder_has_a_readme(folder):
    assert (folder / "README.md").is_file(), \
        f"recipes/{_folder(folder)} has no README.md: say what the recipe trains, how to run it and what to look at"
