"""The vocabulary head: chunked cross-entropy and categorical pseudo-tokens."""
import pytest
import torch

from lgdlm_ds.text_head import TextHead


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
