"""Baselines for lgdlm_ds.evaluate: what simple predictors fit on the training split score on the
model's own metrics. A metric means little alone: an untrained model can score below the mean
latent, so each model metric is printed beside these.

``Baselines.fit`` reads the first ``max_samples`` samples of the training split once (token ids,
attention masks, latents in the model's space) and fits:

- **mean latent** (T2L): the training split's mean latent, the same for every text. Its retrieval
  is chance (1 / pool size) and its cosine shows how much the latents share one direction.
- **ridge over TF-IDF** (T2L): a bag of token ids weighted by TF-IDF (``TfIdf``) mapped linearly
  to the latent: ridge regression with an unpenalised intercept, in closed form (``ridge``), its
  penalty chosen from ``LAMBDAS`` by k-fold cross-validation on the training split
  (``choose_lambda``: mean squared error in the model's latent space).
- **unigram** (L2T): the frequency of each token among the training split's real tokens (add-one
  smoothed over the vocabulary), every token predicted without context or latent: cross-entropy
  and argmax accuracy.
- **nearest neighbour** (L2T): the training sentence whose latent is nearest to the true one
  (cosine in the encoder's space), read position by position against the true tokens.

Everything is fp64 on the CPU. Cost, for n = max_samples training samples with F distinct tokens
and latent size D: the n x n kernel of the TF-IDF vectors, one eigendecomposition per fold
(about (n (k-1)/k)^3) and one Cholesky solve; on the embedded corpus (2,532 training sentences)
a few seconds on a CPU core. Evaluation then costs one (batch x n) similarity per batch.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import default_collate

from .config import Config
from .data import DataError, build_dataset

# Ridge penalties tried by cross-validation: TF-IDF rows have unit norm, so the kernel's scale is 1.
LAMBDAS = tuple(10.0 ** (e / 2) for e in range(-6, 5))
FOLDS = 5
MAX_SAMPLES = 4096  # training samples the baselines read by default: the ridge's cost grows as n^3


@dataclass
class TfIdf:
    """TF-IDF vectors of token-id bags over the tokens seen in a training split: term frequency =
    count in the sentence's real tokens, idf(v) = ln((1 + n) / (1 + df(v))) + 1 (n sentences,
    df(v) of them contain v), each row scaled to unit norm. Tokens never seen in training have no
    column and are left out."""
    column: Tensor  # [vocab_size] column of each token id, -1 for unseen ones
    idf: Tensor     # [F]

    @classmethod
    def fit(cls, ids: Tensor, real: Tensor, vocab_size: int) -> "TfIdf":
        rows = torch.arange(ids.shape[0])[:, None].expand_as(ids)
        pairs = torch.unique(rows[real] * vocab_size + ids[real])  # each (sentence, token) once
        df = torch.bincount(pairs % vocab_size, minlength=vocab_size)
        vocab = df.nonzero().squeeze(1)
        column = torch.full((vocab_size,), -1, dtype=torch.long)
        column[vocab] = torch.arange(len(vocab))
        idf = torch.log((1.0 + ids.shape[0]) / (1.0 + df[vocab].double())) + 1.0
        return cls(column, idf)

    def __call__(self, ids: Tensor, real: Tensor) -> Tensor:
        """Sparse [N, F] fp64 rows for the token ids ``ids`` [N, L] at their ``real`` positions."""
        rows = torch.arange(ids.shape[0])[:, None].expand_as(ids)
        cols = self.column[ids]
        keep = real & (cols >= 0)
        shape = (ids.shape[0], len(self.idf))
        x = torch.sparse_coo_tensor(torch.stack([rows[keep], cols[keep]]), self.idf[cols[keep]], shape,
                                    check_invariants=True).coalesce()  # duplicates summed: count x idf
        r, values = x.indices()[0], x.values()
        norm = torch.zeros(ids.shape[0], dtype=torch.float64).index_add_(0, r, values.square()).sqrt()
        return torch.sparse_coo_tensor(x.indices(), values / norm[r], shape, is_coalesced=True,
                                       check_invariants=True)


def _centered(k: Tensor, k_train: Tensor) -> Tensor:
    """Kernel rows ``k`` [m, n] against n training points, with every point's features centred on
    the training mean (what an unpenalised intercept does); ``k_train``: the training kernel."""
    return k - k.mean(1, keepdim=True) - k_train.mean(0)[None] + k_train.mean()


def ridge(x: Tensor, y: Tensor, lam: float) -> tuple[Tensor, Tensor]:
    """Ridge regression with an unpenalised intercept: (W [F, D], b [D]) minimising
    |y - x W - b|^2 + lam |W|^2, for ``x`` [n, F] (dense or sparse) and ``y`` [n, D], fp64.
    Solved in the dual, W = Xc^T (Xc Xc^T + lam I)^-1 Yc with Xc, Yc centred, which equals the
    primal (Xc^T Xc + lam I)^-1 Xc^T Yc and costs n^3 instead of F^3 (F, the tokens seen, is the
    larger for sentences)."""
    n = x.shape[0]
    k = _kernel(x, x)
    kc = _centered(k, k)
    y_mean = y.mean(0)
    alpha = torch.cholesky_solve(y - y_mean, torch.linalg.cholesky(kc + lam * torch.eye(n, dtype=kc.dtype)))
    x_mean = (x.t() @ torch.ones(n, 1, dtype=x.dtype)).squeeze(1) / n
    w = x.t() @ alpha - x_mean[:, None] * alpha.sum(0)[None]
    return w, y_mean - x_mean @ w


def _kernel(a: Tensor, b: Tensor, chunk: int = 512) -> Tensor:
    """a b^T, dense [m, n]; a sparse ``b`` is densified ``chunk`` rows at a time (n x F dense would
    not fit for a large split)."""
    if not b.is_sparse:
        return a @ b.t()
    return torch.cat([a @ b.index_select(0, torch.arange(i, min(i + chunk, b.shape[0]))).to_dense().t()
                      for i in range(0, b.shape[0], chunk)], dim=1)


def choose_lambda(x: Tensor, y: Tensor, folds: int = FOLDS,
                  lambdas: tuple[float, ...] = LAMBDAS) -> tuple[float, list[float]]:
    """The penalty of ``lambdas`` with the least mean squared error of ridge over ``folds``
    contiguous folds of (x, y), and that error for every penalty. One eigendecomposition of each
    fold's centred kernel gives the held-out predictions of every penalty at once."""
    n = x.shape[0]
    k = _kernel(x, x)
    errors = torch.zeros(len(lambdas), dtype=torch.float64)
    lam = torch.tensor(lambdas, dtype=torch.float64)
    for held in torch.tensor_split(torch.arange(n), folds):
        train = torch.ones(n, dtype=torch.bool)
        train[held] = False
        k_train = k[train][:, train]
        s, u = torch.linalg.eigh(_centered(k_train, k_train))
        y_mean = y[train].mean(0)
        a = _centered(k[held][:, train], k_train) @ u  # [held, train]
        b = u.T @ (y[train] - y_mean)                  # [train, D]
        for i in range(len(lambdas)):
            pred = (a / (s.clamp(min=0) + lam[i])) @ b + y_mean
            errors[i] += (pred - y[held]).square().sum()
    errors /= n * y.shape[1]
    return lambdas[int(errors.argmin())], errors.tolist()


def unigram_log_probs(ids: Tensor, real: Tensor, vocab_size: int) -> Tensor:
    """log p(v) [vocab_size] of the real tokens' frequencies, add-one smoothed: (count + 1) / (total + V),
    so a token the training split never had still has a finite cross-entropy."""
    counts = torch.bincount(ids[real], minlength=vocab_size).double()
    return torch.log((counts + 1.0) / (counts.sum() + vocab_size))


class Baselines:
    """The fitted baselines of the module doc; ``t2l``, ``unigram`` and ``nearest_neighbour`` evaluate
    a batch. ``to_data`` maps the model's latent space to the encoder's (LatentSpace.to_data)."""
    T2L = ("mean_latent", "ridge_tfidf")  # the names of t2l()'s predictors

    @classmethod
    def from_split(cls, cfg: Config, split: str, to_data, max_samples: int = MAX_SAMPLES) -> "Baselines":
        """Fit on the first ``max_samples`` samples of a split of the run's data, read once."""
        ds = build_dataset(cfg, split)
        if not len(ds):
            raise DataError(f"the {split} split of {cfg.data.path or cfg.data.kind} is empty: the baselines are fit "
                            "on it; evaluate with --no-baselines.")
        batch = default_collate([ds[i] for i in range(min(len(ds), max_samples))])
        return cls(batch["input_ids"], batch["attention_mask"], batch["latent"], cfg.model.vocab_size, to_data)

    def __init__(self, ids: Tensor, real: Tensor, latents: Tensor, vocab_size: int, to_data, *,
                 folds: int = FOLDS):
        n = ids.shape[0]
        if n < folds:
            raise DataError(f"the baselines need at least {folds} training samples (their ridge penalty is chosen "
                            f"by {folds}-fold cross-validation), got {n}; evaluate with --no-baselines.")
        ids, real, latents = ids.cpu().long(), real.cpu().bool(), latents.cpu().double()
        self.num_samples = n
        self.mean_latent = latents.mean(0)
        self.tfidf = TfIdf.fit(ids, real, vocab_size)
        x = self.tfidf(ids, real)
        self.ridge_lambda, self.ridge_cv_errors = choose_lambda(x, latents, folds)
        self.ridge_w, self.ridge_b = ridge(x, latents, self.ridge_lambda)
        self.log_probs = unigram_log_probs(ids, real, vocab_size)
        self.train_ids, self.train_real = ids, real
        self.train_directions = F.normalize(to_data(latents), dim=-1)
        self.to_data = to_data

    def t2l(self, ids: Tensor, real: Tensor) -> dict[str, Tensor]:
        """The T2L baselines' latents [B, D] (model space, fp32 on ids' device) by name."""
        x = self.tfidf(ids.cpu(), real.cpu())
        ridge_pred = x @ self.ridge_w + self.ridge_b
        mean = self.mean_latent.expand(ids.shape[0], -1)
        return {name: z.float().to(ids.device) for name, z in zip(self.T2L, (mean, ridge_pred))}

    def unigram(self, ids: Tensor, real: Tensor) -> tuple[Tensor, Tensor]:
        """(correct tokens, summed cross-entropy) of the unigram model over the real tokens."""
        targets = ids[real].cpu()
        return (targets == self.log_probs.argmax()).sum(), -self.log_probs[targets].sum()

    def nearest_neighbour(self, ids: Tensor, real: Tensor, latents: Tensor) -> Tensor:
        """Correct tokens of the training sentences whose latents are nearest to ``latents`` (model
        space), compared position by position with ``ids`` at its real positions."""
        return ((self.train_ids[self.nearest(latents)] == ids.cpu()) & real.cpu()).sum()

    def nearest(self, latents: Tensor) -> Tensor:
        """Index of the training sample whose latent is nearest (cosine) to each of ``latents`` (model space)."""
        directions = F.normalize(self.to_data(latents.cpu().double()), dim=-1)
        return (directions @ self.train_directions.T).argmax(1)


def retrieval_at(similarity: Tensor, pool: int) -> float:
    """Retrieval accuracy over pools of ``pool`` samples: for each query i (row), the probability
    that its own target (column i) is more similar than every other target of a pool made of i and
    ``pool`` - 1 others drawn at random from the n, averaged over queries. Exact, not sampled: with
    c_i targets at least as similar as i's own (ties count against), the pool must avoid all c_i,
    which happens with probability C(n-1-c_i, pool-1) / C(n-1, pool-1). A predictor that ignores
    its input scores 1 / pool; pool = n is retrieval among all n."""
    n = similarity.shape[0]
    if not 1 <= pool <= n:
        raise ValueError(f"retrieval pool {pool} must be between 1 and the {n} samples.")
    own = similarity.diagonal()
    beaten = (similarity >= own[:, None]).sum(1).double() - 1.0
    free = n - 1 - beaten  # others a pool may draw without losing

    def log_choose(a: Tensor, b: int) -> Tensor:
        return torch.lgamma(a + 1) - math.lgamma(b + 1) - torch.lgamma(a - b + 1)

    ok = free >= pool - 1
    p = torch.where(ok, torch.exp(log_choose(free.clamp(min=pool - 1), pool - 1)
                                  - log_choose(torch.tensor(n - 1.0, dtype=torch.float64), pool - 1)), 0.0)
    return float(p.mean())
