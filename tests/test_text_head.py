"""The vocabulary head: chunked cross-entropy, categorical pseudo-tokens and Gumbel-softmax soft tokens
(also through the real engine under ZeRO-3)."""
import contextlib
import io

import pytest
import torch

from lgdlm_ds.text_head import SoftTokens, TextHead, gumbel_noise
from precision import assert_fp32_agree


def test_chunked_cross_entropy_matches_full_logits(monkeypatch):
    monkeypatch.setattr("lgdlm_ds.text_head.CHUNK_ELEMENTS", 50 * 7)  # 7 rows per chunk: chunks straddle passes
    torch.manual_seed(0)
    head = TextHead(16, 50).double()
    hidden = torch.randn(40, 16, dtype=torch.float64, requires_grad=True)
    targets = torch.randint(0, 50, (40,))
    weights = torch.rand(40, dtype=torch.float64)
    sizes = (11, 0, 29)  # three passes, one of them empty
    scale = torch.tensor([0.7, 1.3, -0.4], dtype=torch.float64)  # how a loss might combine the pass sums
    sums, ce, argmax, _ = head(hidden, targets, weights=weights, pass_sizes=sizes)
    got = torch.autograd.grad((sums * scale).sum(), [hidden, head.weight, head.bias])
    logits = head(hidden)
    ref_ce = torch.nn.functional.cross_entropy(logits, targets, reduction="none")
    ref_sums = torch.stack([(ref_ce * weights)[a:b].sum() for a, b in ((0, 11), (11, 11), (11, 40))])
    want = torch.autograd.grad((ref_sums * scale).sum(), [hidden, head.weight, head.bias])
    torch.testing.assert_close(ce, ref_ce.detach(), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(sums, ref_sums, rtol=1e-12, atol=1e-12)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-12)
    assert torch.equal(argmax, logits.argmax(-1))
    with pytest.raises(ValueError, match="pass sizes adding up to N"):
        head(hidden, targets, pass_sizes=(3, 4))


def test_categorical_pseudo_tokens_follow_the_softmax():
    torch.manual_seed(0)
    head = TextHead(4, 5)
    hidden = torch.randn(1, 4).expand(20000, 4).contiguous()
    with torch.no_grad():
        _, _, _, sampled = head(hidden, torch.zeros(20000, dtype=torch.long), categorical=True)
        probs = torch.softmax(head(hidden[:1])[0], -1)
    freq = torch.bincount(sampled, minlength=5).float() / 20000
    assert (freq - probs).abs().max() < 0.015  # 20000 draws: std of a frequency <= 0.0036


def _soft_reference(hidden, head, embedding, soft: SoftTokens, chunk: int):
    """Soft tokens by plain autograd over full [N, V] logits, with the Gumbel noise the chunked
    function draws (chunk by chunk from the same generator)."""
    n, vocab = hidden.shape[0], embedding.shape[0]
    gen = torch.Generator().manual_seed(soft.seed)
    noise = torch.cat([gumbel_noise(gen, min(chunk, n - i), vocab, hidden.dtype, "cpu") for i in range(0, n, chunk)])
    z = head(hidden) + noise
    y = torch.softmax(z / soft.temperature, -1)
    if soft.hard:  # straight-through as torch's gumbel_softmax(hard=True)
        y = torch.nn.functional.one_hot(z.argmax(-1), vocab).to(y.dtype) - y.detach() + y
    return y @ embedding, z.argmax(-1)


def _soft_grads(emb, params, weights):
    return dict(zip(("hidden", "weight", "bias", "embedding"), torch.autograd.grad((emb * weights).sum(), params)))



@pytest.mark.parametrize("hard", [False, True])
def test_soft_tokens_chunked_equal_unchunked(hard, monkeypatch):
    """Chunked forward + recomputing backward against plain autograd over full logits: equal in fp64
    (up to summation order), and in fp32 both within fp32 rounding of the fp64 reference."""
    n, vocab, chunk = 40, 50, 7  # six chunks, the last one short
    monkeypatch.setattr("lgdlm_ds.text_head.CHUNK_ELEMENTS", vocab * chunk)
    soft = SoftTokens(temperature=0.7, hard=hard, seed=123)
    torch.manual_seed(0)
    head64, emb64 = TextHead(16, vocab).double(), torch.nn.Embedding(vocab, 12).double()
    hidden64 = torch.randn(n, 16, dtype=torch.float64)
    upstream = torch.randn(n, 12, dtype=torch.float64)  # d loss / d embeddings
    results = {}
    for dtype in (torch.float64, torch.float32):
        head, emb = TextHead(16, vocab).to(dtype), torch.nn.Embedding(vocab, 12).to(dtype)
        head.load_state_dict(head64.state_dict())
        emb.load_state_dict(emb64.state_dict())
        hidden = hidden64.to(dtype).requires_grad_()
        params = [hidden, head.weight, head.bias, emb.weight]
        tokens, got = head(hidden, torch.zeros(n, dtype=torch.long), soft=soft, embedding=emb.weight)[3:]
        ref, ref_tokens = _soft_reference(hidden, head, emb.weight, soft, chunk)
        assert torch.equal(tokens, ref_tokens)
        if hard:  # the forward value is exactly the sampled token's embedding
            assert torch.equal(got, emb.weight[tokens])
        w = upstream.to(dtype)
        results[dtype] = [{"embeddings": out.detach(), **_soft_grads(out, params, w)} for out in (got, ref)]
    chunked64, plain64 = results[torch.float64]
    for name in chunked64:
        torch.testing.assert_close(chunked64[name], plain64[name], rtol=1e-10, atol=1e-12)
    chunked32, plain32 = results[torch.float32]
    assert_fp32_agree(chunked32, plain32, plain64)


def test_soft_tokens_train_under_zero3_as_under_zero0(tmp_path):
    """cycle_vae with gumbel_st through the real engine: the head reads the token embedding (an
    external parameter under ZeRO-3), and ZeRO-3 trains what ZeRO-0 does, within fp32 rounding of
    the same arithmetic, with a prefetch trace that stays valid (log_trace_cache_warnings)."""
    from lgdlm_ds.config import load_config
    from lgdlm_ds.ds_config import load_ds_config
    from lgdlm_ds.metrics import read_log
    from lgdlm_ds.trainer import Trainer
    from engine_utils import RUN, SYNTHETIC, ds_json, world_of_one
    logs, warnings = {}, {}
    with world_of_one():
        for stage in (0, 3):
            cfg = load_config(None, RUN + SYNTHETIC + [
                "data.num_samples=32", "loss.loss_type=cycle_vae", "loss.latent_t_mode=random",
                "loss.cycle_latent_sampling=gumbel_st", "loss.cycle_text_ramp_steps=0", "loss.cycle_latent_ramp_steps=0",
                "training.micro_batch_size=4", "training.num_train_steps=3", "training.lr=3e-3",
                f"training.ds_config={ds_json(tmp_path, stage, trace_warnings=stage == 3)}",
                f"logging.run_dir={tmp_path / f'zero{stage}'}"])
            captured = io.StringIO()
            with contextlib.redirect_stdout(captured):
                Trainer(cfg, load_ds_config(cfg)).train()
            logs[stage] = read_log(tmp_path / f"zero{stage}")
            warnings[stage] = [line for line in captured.getvalue().splitlines() if "Invalidate trace cache" in line]
    assert not warnings[3]
    for zero0, zero3 in zip(logs[0], logs[3], strict=True):
        assert zero0["gumbel_temperature"] == 1.0 and zero0["cycle_latent_loss"] > 0
        for key in ("loss", "cycle_latent_loss", "grad_norm"):
            # three fp32 steps apart: the same arithmetic, summed in another order by ZeRO-3
            assert zero3[key] == pytest.approx(zero0[key], rel=1e-5), key
