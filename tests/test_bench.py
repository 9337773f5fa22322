"""The benchmark's per-variant measurement (lgdlm_ds.tools.bench.measure) at a tiny size: ops per
step, model FLOPs, and the one-stream floor."""
import pytest
from torch.utils.data import default_collate

from lgdlm_ds.data import SyntheticDataset
from lgdlm_ds.flops import StepFlops
from lgdlm_ds.tools.bench import Sizes, bench_config, main, measure

SIZES = Sizes(blocks=2, hidden=32, seq=16, vocab=300, batch=2, latent_dim=8, steps=1)


def test_a_variant_reports_ops_model_flops_and_the_one_stream_floor():
    cycle, floor = measure("cycle", SIZES), measure("cycle_1stream", SIZES)
    assert bench_config(SIZES, "cycle_1stream").model.num_residual_streams == 1
    assert bench_config(SIZES, "cycle").model.num_residual_streams == 2
    # The hyper-connections add ops (and a little arithmetic) to the one-stream step.
    assert floor["ops"] < cycle["ops"] and floor["model_flops"] < cycle["model_flops"]
    for variant, row in (("cycle", cycle), ("cycle_1stream", floor)):
        cfg = bench_config(SIZES, variant)
        real = default_collate([SyntheticDataset(cfg, "train")[i] for i in range(SIZES.batch)])["attention_mask"]
        assert row["tokens_per_step"] == real.sum() < real.numel()  # real tokens of a padded batch
        assert row["model_flops"] == float(StepFlops(cfg)(real, 1))  # the step benchmarked is step 1
        assert row["step_time_s"] > 0 and row["flops"] > 0


def test_a_bad_peak_is_refused_before_any_work(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--peak-tflops", "-1"])
    assert exit_info.value.code == 2
    assert "--peak-tflops: expects a finite number of TFLOP/s >= 0" in capsys.readouterr().err
