"""Comparing fp32 computations by their measured rounding noise against an fp64 reference, never
by a fixed tolerance: summation order, hence fp32 rounding, depends on the CPU's kernels."""
from __future__ import annotations

import contextlib
from unittest import mock

import torch

from lgdlm_ds.tools.compare import max_rel_diff

FP32_EPS = torch.finfo(torch.float32).eps


@contextlib.contextmanager
def fp64_throughout():
    """Within it, fp64 models compute in fp64 throughout and draw the random numbers of an fp32
    run. The hyper-connections cast to fp32 with ``.float()`` whatever the weights' dtype, which
    would put fp32 rounding into an fp64 reference: here ``.float()`` leaves fp64 tensors alone.
    ``rand_like`` and ``randn_like`` of an fp64 tensor draw in fp32 and widen, so one seed gives
    both precisions the same noise and the same sampled tokens."""
    to_float = torch.Tensor.float

    def keep_fp64(t, *args, **kwargs):
        return t if t.dtype == torch.float64 else to_float(t, *args, **kwargs)

    def fp32_draw(draw):
        def wrapped(x, **kwargs):
            if x.dtype != torch.float64 or "dtype" in kwargs:
                return draw(x, **kwargs)
            return draw(x, dtype=torch.float32, **kwargs).double()
        return wrapped

    with mock.patch.object(torch.Tensor, "float", keep_fp64), \
            mock.patch("torch.rand_like", fp32_draw(torch.rand_like)), \
            mock.patch("torch.randn_like", fp32_draw(torch.randn_like)):
        yield


def assert_fp32_agree(a: dict, b: dict, ref: dict, factor: float = 4.0) -> None:
    """``a`` and ``b`` (name -> tensor): one quantity from two fp32 computations that differ in
    summation order; ``ref``: it in fp64. A fixed tolerance holds on one CPU's kernels and not
    another's, so the rounding noise is measured instead: how far each fp32 result is from fp64
    (``max_rel_diff``, floored at eps: closer than one fp32 rounding is luck). The two noises must be of the
    same order (within ``factor``) and keep at least half of fp32's digits (under sqrt(eps), far
    below any real discrepancy), and a and b must agree within ``factor`` times the larger."""
    err_a, err_b = (max(max_rel_diff(x, ref), FP32_EPS) for x in (a, b))
    noise = max(err_a, err_b)
    assert noise < FP32_EPS ** 0.5, f"fp32 results are {err_a:.2e} and {err_b:.2e} from fp64: more than rounding"
    assert noise <= factor * min(err_a, err_b), f"rounding noises differ: {err_a:.2e} and {err_b:.2e} from fp64"
    diff = max_rel_diff(a, b)
    assert diff <= factor * noise, f"fp32 results differ by {diff:.2e}, over {factor}x their rounding noise {noise:.2e}"
