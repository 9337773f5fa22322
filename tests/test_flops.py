"""Model FLOPs (lgdlm_ds.flops) against torch's FlopCounterMode on a tiny real model, every loss
mode; the peak table, and the log's ``tflops`` and ``mfu``.

Forward, one residual stream: the analytic count equals the counted products exactly (integers),
after one known difference: the text head's chunked cross-entropy forms its gradient products in
forward (text_head.py), two more of the head's size. Backward is exactly twice the model forward
after these, each derived from the code it names:
- FlopCounterMode counts a flash-attention backward as five products (it recomputes the scores),
  model FLOPs as four: half the attention forward more;
- the chunked cross-entropy combines its per-pass weight gradients in backward: 2 P V (H + 1)
  per head call with P text passes;
- a layer whose input carries no gradient (the timestep MLPs' and the latent encoder's first
  layers, on data) computes no input gradient;
- a model call with only one head (an l2t or t2l step; cycle_vae's second call while a cycle term
  waits for its warm-up) leaves the other modality's last-block output unread: its attention
  output projection, feed-forward and feed-forward modulation get no backward.
FlopCounterMode has no formula for the CPU's flash-attention kernel (it would count no attention);
flops.flop_counter gives it the formulas of the GPU kernels. With two residual streams the fused
hyper-connections (hyper_mix.py) differ by a bounded amount: their depth connection's forward is
elementwise (2 s H per token, not counted) and the closed-form Sinkhorn's [8] x [8, 3] products
(48 FLOPs each way per token) are not model arithmetic.
"""
import json

import pytest
import torch
from torch import nn

from lgdlm_ds.config import load_config
from lgdlm_ds.diffusion import mask_probability
from lgdlm_ds.flops import FF_MULT, MEAN_MASKED, PEAK_TFLOPS, ModelFlops, StepFlops, flop_counter, peak_tflops
from lgdlm_ds.metrics import LOG_NAME, MetricsLogger
from core_utils import SMOKE, tiny_batch, tiny_config, tiny_step
from engine_utils import OneRank


class Counted:
    """FlopCounterMode's forward and backward counts of one training step, and what the step's
    modules saw: per model call its rows and the heads that ran ({"rows", "text", "latent"}),
    text-head calls (rows, text passes), and products skipped for lack of an input gradient."""

    def __init__(self, step_module, batch, at_step: int):
        model = step_module.model
        self.calls, self.head_calls, self.no_input_grad = [], [], 0
        hooks = [model.conditioning.register_forward_pre_hook(self._call),
                 model.text_head.register_forward_pre_hook(self._head, with_kwargs=True),
                 model.latent_head.register_forward_pre_hook(lambda *_: self.calls[-1].update(latent=True))]
        hooks += [m.register_forward_pre_hook(self._linear) for m in model.modules() if type(m) is nn.Linear]
        torch.manual_seed(1)
        try:
            with flop_counter() as fw:
                loss, _ = step_module(batch, at_step)
            with flop_counter() as bw:
                loss.backward()
        finally:
            for h in hooks:
                h.remove()
        self.forward, self.backward = fw.get_total_flops(), bw.get_total_flops()
        self.attention = fw.get_flop_counts()["Global"][torch.ops.aten._scaled_dot_product_flash_attention_for_cpu]

    def _call(self, module, args):
        self.calls.append({"rows": args[0].shape[0], "text": False, "latent": False})

    def _head(self, module, args, kwargs):
        self.calls[-1]["text"] = True
        sizes = args[4] if len(args) > 4 else kwargs.get("pass_sizes")
        self.head_calls.append((args[0].shape[0], len(sizes) if sizes is not None else 1))

    def _linear(self, module, args):
        if not args[0].requires_grad:
            self.no_input_grad += 2 * args[0].numel() * module.out_features

    @property
    def head_rows(self) -> int:
        return sum(rows for rows, _ in self.head_calls)


def _model_forward(cfg, batch, at_step: int, counted: Counted) -> float:
    """StepFlops' forward, with an unconditional pass's expected masked tokens replaced by the
    number the step drew."""
    flops = StepFlops(cfg)
    forward = float(flops.forward(batch["attention_mask"], at_step))
    if flops.plan.mode_at(at_step) == "unconditional":
        real = float(batch["attention_mask"].sum())
        forward += flops.model.per_text_target * (counted.head_rows - MEAN_MASKED * real)
    return forward


def _unread_branch(cfg, batch, calls: list[dict]) -> int:
    """Forward FLOPs of the last block's branches whose output no head reads: in a call with one
    head, the other modality's (its latent token, or its text positions)."""
    m = cfg.model
    H, C, A = m.hidden_size, m.cond_dim, m.attn_heads * m.attn_dim_head
    positions = int(batch["attention_mask"].any(0).sum())
    flops = 0
    for call in calls:
        if call["text"] != call["latent"]:
            tokens = call["rows"] * (1 if call["text"] else positions)
            flops += tokens * (2 * A * H + 2 * 2 * H * FF_MULT * H) + call["rows"] * 2 * C * 2 * H
    return flops


CASES = [("l2t", 0), ("t2l", 0), ("unconditional", 0), ("cycle_vae", 0), ("cycle_vae", 10**6),
         ("random", 0), ("random", 1), ("random", 2), ("sequential", 0), ("sequential", 1)]


@pytest.mark.parametrize("mode,at_step", CASES)
def test_model_flops_match_the_counted_products_of_every_loss_mode(mode, at_step):
    cfg = tiny_config(f"loss.loss_type={mode}", "model.num_residual_streams=1", "loss.cycle_text_warmup_steps=5")
    batch = tiny_batch(cfg)
    batch["attention_mask"][:] = True  # no padding: every position is a real token
    counted = Counted(tiny_step(cfg), batch, at_step)
    model = ModelFlops.from_config(cfg.model)
    forward = _model_forward(cfg, batch, at_step, counted)
    head_grads_in_forward = 2 * model.per_text_target * counted.head_rows
    assert counted.forward == forward + head_grads_in_forward

    V, H = cfg.model.vocab_size, cfg.model.hidden_size
    combine = sum(2 * passes * V * (H + 1) for _, passes in counted.head_calls)
    expected_backward = (2 * forward - head_grads_in_forward + counted.attention / 2 + combine
                         - counted.no_input_grad - 2 * _unread_branch(cfg, batch, counted.calls))
    assert counted.backward == expected_backward
    assert float(StepFlops(cfg)(batch["attention_mask"], at_step)) == 3 * float(
        StepFlops(cfg).forward(batch["attention_mask"], at_step))


@pytest.mark.parametrize("hard", [False, True])
def test_soft_tokens_are_counted_once(hard):
    """gumbel_st: the head forms the soft tokens apart from its cross-entropy (text_head.py): it
    recomputes their logits in forward and in backward and takes the gradient of h and W through
    them again, four more products of the head's size at every real token than the model's."""
    cfg = tiny_config("loss.cycle_latent_sampling=gumbel_st", f"loss.gumbel_hard={str(hard).lower()}",
                      "model.num_residual_streams=1")
    batch = tiny_batch(cfg)
    batch["attention_mask"][:] = True
    counted = Counted(tiny_step(cfg), batch, 0)
    real, V, H = batch["attention_mask"], cfg.model.vocab_size, cfg.model.hidden_size
    per_text_target = ModelFlops.from_config(cfg.model).per_text_target
    combine = sum(2 * passes * V * (H + 1) for _, passes in counted.head_calls)
    expected = (float(StepFlops(cfg)(real, 0)) + counted.attention / 2 + combine - counted.no_input_grad
                - 2 * _unread_branch(cfg, batch, counted.calls) + 4 * per_text_target * float(real.sum()))
    assert counted.forward + counted.backward == expected


def test_cycle_terms_count_only_when_they_run():
    """Before its warm-up ends cycle_text does not run: three passes, not four. A run whose cycle
    terms run every other step counts only the base passes in between (their one-row stand-ins are
    not the objective's arithmetic)."""
    cfg = tiny_config("loss.cycle_text_warmup_steps=5")
    real = tiny_batch(cfg)["attention_mask"]
    flops = StepFlops(cfg)
    m, lengths = flops.model, real.sum(1)
    l2t = float(m.trunk(lengths) + m.per_text_target * lengths.sum())
    t2l = float(m.trunk(lengths) + m.per_latent_target * len(lengths))
    assert float(flops.forward(real, 5) - flops.forward(real, 4)) == l2t
    alternating = StepFlops(tiny_config("loss.cycle_every=2"))
    assert float(alternating.forward(real, 1)) == l2t + t2l and float(alternating.forward(real, 2)) == 2 * (l2t + t2l)


def test_padding_is_computed_but_not_counted():
    """A padded batch: the passes compute every trimmed position (the count), model FLOPs only the
    real tokens; the difference is the trunk over the padding, in each of cycle_vae's four passes."""
    cfg = tiny_config("model.num_residual_streams=1")
    batch = tiny_batch(cfg)
    real = batch["attention_mask"]
    assert 0 < real.sum() < real.any(0).sum() * real.shape[0], "the batch has padding within its longest row"
    counted = Counted(tiny_step(cfg), batch, 0)
    flops = StepFlops(cfg)
    lengths = real.sum(1)
    padding = float(flops.model.trunk(torch.full_like(lengths, int(real.any(0).sum()))) - flops.model.trunk(lengths))
    head_grads_in_forward = 2 * flops.model.per_text_target * counted.head_rows
    assert counted.head_rows == 2 * real.sum()  # the text head runs at real tokens only
    assert counted.forward == float(flops.forward(real, 0)) + 4 * padding + head_grads_in_forward


def test_hyper_connections_differ_from_the_count_by_their_bound():
    cfg = tiny_config()  # two residual streams, fused
    s, H, n = cfg.model.num_residual_streams, cfg.model.hidden_size, cfg.model.n_blocks
    batch = tiny_batch(cfg)
    batch["attention_mask"][:] = True
    counted = Counted(tiny_step(cfg), batch, 0)
    forward = _model_forward(cfg, batch, 0, counted)
    tokens = batch["attention_mask"].numel() + batch["input_ids"].shape[0]  # text and latent tokens of a pass
    hyper_tokens = 4 * 2 * n * tokens  # four passes, two hyper-connections per block
    head_grads_in_forward = 2 * ModelFlops.from_config(cfg.model).per_text_target * counted.head_rows
    assert abs(counted.forward - forward - head_grads_in_forward) <= hyper_tokens * (2 * s * H + 48)
    V = cfg.model.vocab_size
    combine = sum(2 * passes * V * (H + 1) for _, passes in counted.head_calls)
    known = counted.attention / 2 + combine - counted.no_input_grad  # as with one stream; no unread branch here
    total = counted.forward + counted.backward
    assert abs(total - 3 * forward - known) <= hyper_tokens * (2 * s * H + 2 * 48)
    one_stream = ModelFlops.from_config(tiny_config("model.num_residual_streams=1").model)
    assert ModelFlops.from_config(cfg.model).per_token > one_stream.per_token  # they are counted


def test_mean_masked_is_the_mean_mask_probability():
    t = (torch.arange(10**6, dtype=torch.float64) + 0.5) / 10**6  # midpoints of U(0, 1)
    assert abs(mask_probability(t).double().mean().item() - MEAN_MASKED) < 1e-6


def test_peak_from_the_config_or_the_device_table(monkeypatch):
    cuda = torch.device("cuda", 0)
    assert peak_tflops(123.0, torch.device("cpu"), torch.float32) == 123.0
    assert peak_tflops(0.0, torch.device("cpu"), torch.bfloat16) is None
    for name, dtype, peak in (("NVIDIA H200", torch.bfloat16, 989.4), ("NVIDIA H100 PCIe", torch.bfloat16, 756.0),
                              ("NVIDIA H100 80GB HBM3", torch.float32, 66.9),
                              ("NVIDIA A100-SXM4-80GB", torch.bfloat16, 312.0), ("Tesla T4", torch.bfloat16, None)):
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None, name=name: name)
        assert peak_tflops(0.0, cuda, dtype) == peak, name
    assert all(set(peaks) == {"bf16", "fp32"} for _, peaks in PEAK_TFLOPS)


@pytest.mark.parametrize("peak", [None, 2e-6])
def test_log_lines_carry_tflops_and_mfu_where_a_peak_is_known(tmp_path, peak):
    cfg = load_config(SMOKE, ["logging.log_every=2", "logging.progress_bar=false", f"logging.run_dir={tmp_path}"])
    log = MetricsLogger(cfg, tmp_path, OneRank, torch.device("cpu"), global_batch=4, start_step=0, end=2,
                        peak_tflops=peak)
    for step in (1, 2):
        log.step(step=step, epoch=0, lr=0.1, metrics={"loss": torch.tensor(1.0)}, tokens=torch.tensor(10),
                 flops=torch.tensor(3e6, dtype=torch.float64), seconds=0.5, grad_norm=1.0, skipped_steps=0,
                 skip_reason=None, evaluation={})
    log.close()
    (line,) = [json.loads(x) for x in (tmp_path / LOG_NAME).read_text().splitlines()]
    # two steps' FLOPs over their second (the reduction over ranks is in fp32: rounding 6e-8)
    assert line["tflops"] == pytest.approx(6e6 / 1.0 / 1e12, rel=1e-6)
    assert line["tokens_per_sec"] == pytest.approx(20.0)
    if peak is None:
        assert "mfu" not in line
    else:
        assert line["mfu"] == pytest.approx(line["tflops"] / peak, rel=1e-6)
