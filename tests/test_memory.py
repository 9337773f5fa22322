"""The memory prediction (lgdlm_ds.memory) against the peaks the benchmark measures, and the command."""
import json
import subprocess
import sys

import pytest
import torch
from torch.utils.data import default_collate

from lgdlm_ds.data import SyntheticDataset
from lgdlm_ds.model import build_model
from lgdlm_ds.tools.bench import Sizes, bench_config, make_step, run_step
from lgdlm_ds.tools.memory import predict_other_bytes
from lgdlm_ds.tools.memtrack import LiveBytes
from core_utils import SMOKE


SIZES = Sizes(blocks=3, hidden=64, seq=32, vocab=2000, batch=4, latent_dim=16)


@pytest.mark.parametrize("variant", ["single", "cycle", "cycle_ac", "cycle_stagewise", "cycle_stagewise_ac"])
def test_prediction_matches_the_measured_peak(variant):
    """The benchmark's comparison at small sizes: the prediction from meta-device counts against
    the exact peak of a real step (gradients preallocated, as in training)."""
    cfg = bench_config(SIZES, variant)
    torch.manual_seed(0)
    module = make_step(variant, build_model(cfg.model), cfg)
    ds = SyntheticDataset(cfg, "train")
    batch = default_collate([ds[i] for i in range(SIZES.batch)])
    # The prediction is for batches as long as model.max_seq_len; a batch is trimmed to its longest row.
    batch["attention_mask"][0] = True
    run_step(module, batch, 1, seed=1)
    with LiveBytes() as live:
        run_step(module, batch, 1, seed=1)
    fill = batch["attention_mask"].float().mean().item()
    predicted = predict_other_bytes(cfg, SIZES.batch, fill)
    assert abs(predicted - live.peak) <= 0.15 * live.peak, (predicted, live.peak)


def test_memory_cli_answers_and_refuses_bad_input():
    args = [sys.executable, "-m", "lgdlm_ds.memory", str(SMOKE), "data.kind=synthetic", "data.path=", "data.corpus=",
            "data.standardize_latents=false", "model.n_blocks=2"]
    out = subprocess.run(args + ["--gpus", "2", "--gpu-mem", "0.3"], capture_output=True, text=True, check=True).stdout
    report = json.loads(out.strip().splitlines()[-1])
    assert set(report["stages"]) == {"zero0", "zero2", "zero3", "zero3_offload"}
    zero0 = report["stages"]["zero0"]
    assert zero0["fits"] and zero0["max_micro_batch"] >= report["micro_batch_size"]
    tiny = subprocess.run(args + ["--gpus", "2", "--gpu-mem", "0.01"], capture_output=True, text=True, check=True)
    assert not json.loads(tiny.stdout.strip().splitlines()[-1])["stages"]["zero0"]["fits"]
    bad = subprocess.run(args + ["--gpus", "0", "--gpu-mem", "80"], capture_output=True, text=True)
    assert bad.returncode != 0 and "--gpus and --nodes must be >= 1" in bad.stderr
    bad_key = subprocess.run(args + ["model.hiden_size=3", "--gpus", "1", "--gpu-mem", "80"], capture_output=True,
                             text=True)
    assert bad_key.returncode != 0 and "Did you mean 'model.hidden_size'" in bad_key.stderr
