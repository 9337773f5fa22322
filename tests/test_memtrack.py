"""LiveBytes: the exact allocation count behind the memory prediction and the benchmark."""
import torch

from lgdlm_ds.tools.memtrack import LiveBytes


def test_live_bytes_counts_allocations_and_frees_not_views():
    weight = torch.nn.Parameter(torch.randn(500, 500))  # exists before: a model state
    with LiveBytes() as live:
        a = torch.randn(1000, 1000)  # 4 MB
        b = a * 2  # 4 MB more
        del b
        view = weight.t()  # a view of a parameter allocates nothing
        c = a @ a  # 4 MB while a is alive
        assert live.live == 8_000_000
    assert live.peak == 8_000_000 and view.shape == (500, 500) and c.shape == a.shape
