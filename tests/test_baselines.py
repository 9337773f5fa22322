"""lgdlm_ds.baselines: the ridge closed form and its cross-validation against direct solves in
fp64, TF-IDF and the unigram model on hand examples, the nearest-neighbour decoder where it must
be exact, and pool retrieval against enumerating every pool."""
from __future__ import annotations

import itertools
import math

import pytest
import torch

from lgdlm_ds.baselines import Baselines, TfIdf, choose_lambda, retrieval_at, ridge, unigram_log_probs

EPS64 = torch.finfo(torch.float64).eps


def _direct_ridge(x: torch.Tensor, y: torch.Tensor, lam: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The primal normal equations on centred data: W = (Xc^T Xc + lam I)^-1 Xc^T Yc, b = y_mean - x_mean W."""
    xm, ym = x.mean(0), y.mean(0)
    a = (x - xm).T @ (x - xm) + lam * torch.eye(x.shape[1], dtype=x.dtype)
    w = torch.linalg.solve(a, (x - xm).T @ (y - ym))
    return w, ym - xm @ w, torch.linalg.cond(a).item()


@pytest.mark.parametrize("sparse", [False, True])
def test_ridge_equals_the_direct_solve(sparse):
    g = torch.Generator().manual_seed(0)
    x = torch.rand(20, 6, generator=g, dtype=torch.float64) * (torch.rand(20, 6, generator=g) < 0.5)
    y = torch.randn(20, 3, generator=g, dtype=torch.float64)
    lam = 0.1
    w, b = ridge(x.to_sparse() if sparse else x, y, lam)
    w_ref, b_ref, cond = _direct_ridge(x, y, lam)
    # Both solve systems of condition <= cond in fp64: each is within ~cond * eps of the exact answer.
    tol = 10 * cond * EPS64 * max(w_ref.abs().max().item(), 1.0)
    assert (w - w_ref).abs().max() <= tol and (b - b_ref).abs().max() <= tol
    # The fit is a least-squares optimum: the gradient of |y - xW - b|^2 + lam |W|^2 vanishes.
    r = y - x @ w - b
    assert (x.T @ r - lam * w).abs().max() <= tol * 10 and r.sum(0).abs().max() <= tol * 10


def test_cross_validation_equals_refitting_every_fold():
    g = torch.Generator().manual_seed(1)
    x = torch.rand(23, 5, generator=g, dtype=torch.float64)
    y = x @ torch.randn(5, 2, generator=g, dtype=torch.float64) + 0.3 * torch.randn(23, 2, generator=g,
                                                                                      dtype=torch.float64)
    lambdas = (1e-3, 1e-1, 1.0, 10.0)
    chosen, errors = choose_lambda(x, y, folds=4, lambdas=lambdas)
    expected = []
    for lam in lambdas:
        sq = 0.0
        for held in torch.tensor_split(torch.arange(23), 4):
            train = torch.ones(23, dtype=torch.bool)
            train[held] = False
            w, b, _ = _direct_ridge(x[train], y[train], lam)
            sq += (x[held] @ w + b - y[held]).square().sum().item()
        expected.append(sq / y.numel())
    assert errors == pytest.approx(expected, rel=1e-9)
    assert chosen == lambdas[expected.index(min(expected))]


def test_tfidf_of_a_hand_example():
    # Two sentences over a vocabulary of 10 (0 is padding): token 1 and 2 in both, 5 twice in the first.
    ids = torch.tensor([[1, 5, 5, 2, 0], [1, 6, 2, 0, 0]])
    real = ids != 0
    tf = TfIdf.fit(ids, real, 10)
    idf_once = math.log(3 / 2) + 1  # ln((1 + n) / (1 + df)) + 1 with n = 2, df = 1
    assert tf.column[[1, 2, 5, 6]].tolist() == [0, 1, 2, 3] and tf.column[[0, 3, 7]].tolist() == [-1] * 3
    assert tf.idf.tolist() == pytest.approx([1.0, 1.0, idf_once, idf_once])
    rows = torch.tensor([[1.0, 1.0, 2 * idf_once, 0.0], [1.0, 1.0, 0.0, idf_once]], dtype=torch.float64)
    expected = rows / rows.norm(dim=1, keepdim=True)
    assert tf(ids, real).to_dense().flatten().tolist() == pytest.approx(expected.flatten().tolist())
    # Tokens never seen in training (7) are left out; padding positions are not counted.
    unseen = torch.tensor([[1, 7, 7, 0, 5]])
    assert tf(unseen, unseen != 0).to_dense()[0].tolist() == pytest.approx(
        (torch.tensor([1.0, 0.0, idf_once, 0.0]) / math.hypot(1.0, idf_once)).tolist())


def test_unigram_cross_entropy_of_a_hand_example():
    ids = torch.tensor([[3, 3, 4, 0]])
    log_p = unigram_log_probs(ids, ids != 0, 5)  # counts 3: 2, 4: 1 of 3, add-one over 5 tokens
    assert log_p.exp().tolist() == pytest.approx([1 / 8, 1 / 8, 1 / 8, 3 / 8, 2 / 8])
    bl = Baselines(torch.tensor([[3, 3, 4, 0]] * 5), torch.tensor([[1, 1, 1, 0]] * 5), torch.randn(5, 2), 5,
                   lambda z: z)
    correct, ce = bl.unigram(torch.tensor([[3, 4, 1, 0]]), torch.tensor([[True, True, True, False]]))
    # counts now 10 and 5 of 15, over 20: p(3) = 11/20, p(4) = 6/20, p(1) = 1/20; only 3 is the argmax
    assert correct.item() == 1
    assert ce.item() == pytest.approx(-math.log(11 / 20) - math.log(6 / 20) - math.log(1 / 20))


def test_the_nearest_neighbour_decoder_reads_the_training_sentence():
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(1, 50, (12, 7), generator=g)
    real = torch.arange(7)[None] < torch.randint(2, 8, (12, 1), generator=g)
    latents = torch.randn(12, 16, generator=g)
    std = torch.rand(16, generator=g) + 0.5
    bl = Baselines(ids, real, latents, 50, lambda z: z * std + 1.0)
    # Its own latent is nearest to itself: every real token is read back.
    assert bl.nearest_neighbour(ids, real, latents).item() == real.sum().item()
    # A latent near sample 5's reads sample 5's sentence, position by position over the query's real tokens.
    query = latents[5:6] + 1e-3 * torch.randn(1, 16, generator=g)
    mask = torch.ones(1, 7, dtype=torch.bool)
    target = ids[5:6].clone()
    target[0, :3] = 0  # three positions disagree
    assert bl.nearest_neighbour(target, mask, query).item() == 4


def test_pool_retrieval():
    g = torch.Generator().manual_seed(3)
    n = 7
    sim = torch.randn(n, n, generator=g)
    for pool in (1, 3, n):
        # Every pool of `pool` samples holding i, equally likely: is i's own target the most similar?
        hits = [all(sim[i, i] > sim[i, j] for j in others)
                for i in range(n) for others in itertools.combinations([j for j in range(n) if j != i], pool - 1)]
        assert retrieval_at(sim, pool) == pytest.approx(sum(hits) / len(hits), abs=1e-12)
    perfect = torch.eye(n)
    assert retrieval_at(perfect, 3) == 1.0 and retrieval_at(perfect, n) == 1.0
    # A predictor that ignores its input: each row ranks the targets the same way; exactly chance.
    same = torch.arange(n, dtype=torch.float32).expand(n, n)
    assert retrieval_at(same, 3) == pytest.approx(1 / 3, abs=1e-12) and retrieval_at(same, n) == pytest.approx(1 / n)
    # Ties count against: two equally similar targets retrieve nothing among all.
    assert retrieval_at(torch.ones(2, 2), 2) == 0.0
    with pytest.raises(ValueError, match="pool 8"):
        retrieval_at(sim, 8)
