"""Validation during training: the training objective on the validation split, every
``training.eval_every`` steps and at the last step of a ``train()`` call; its means over batches and
ranks join that step's log line as ``eval_*``. (What a trained model can do, accuracies and
retrieval, is lgdlm_ds.evaluate's.)

Each evaluation runs the same first ``training.eval_batches`` batches per rank
(batching.eval_batches), with noise seeded by (seed, batch, rank), so evaluations along a run are
comparable.
"""
from __future__ import annotations

import torch
from torch.utils.data import Dataset, default_collate

from .batching import eval_batches, to_device
from .config import Config
from .metrics import mean_over_ranks
from .plan import ObjectivePlan
from .seeding import derive_seed


class Validator:
    """``dataset`` is the validation split, None when ``training.eval_every`` is 0 (never due)."""

    def __init__(self, cfg: Config, dataset: Dataset | None, dist):
        tr = cfg.training
        self.every, self.seed, self.dataset, self.dist = tr.eval_every, tr.seed, dataset, dist
        self.rank = dist.get_rank()
        # The training micro-steps' stages: one model call per engine forward in the stage-wise
        # mode, as in training, keeps ZeRO-3's prefetch trace valid across an evaluation.
        self.stages = ObjectivePlan.from_config(cfg).micro_step_stages
        self.index = [] if dataset is None else eval_batches(len(dataset), dist.get_world_size(), self.rank,
                                                              tr.micro_batch_size, tr.eval_batches)

    def due(self, step: int, end: int) -> bool:
        return bool(self.every) and (step % self.every == 0 or step == end)

    @torch.no_grad()
    def run(self, engine, k: int) -> dict[str, float]:
        """The objective of (0-based) step k; collective."""
        engine.eval()
        sums: dict[str, torch.Tensor] = {}
        for e, idx in enumerate(self.index):
            batch = to_device(default_collate([self.dataset[i] for i in idx]), engine.device)
            torch.manual_seed(derive_seed(self.seed, "eval", e, self.rank))
            for stage in self.stages:  # stage metrics are disjoint but the loss and nonfinite_terms, which add
                loss, metrics = engine(batch, k) if stage is None else engine(batch, k, stage=stage)
                for name, v in {"loss": loss.float(), **metrics}.items():
                    sums[name] = sums[name] + v if name in sums else v
        engine.train()
        means, _ = mean_over_ranks(self.dist, sums, {n: len(self.index) for n in sums},
                                   torch.zeros((), device=engine.device))
        return {f"eval_{n}": v for n, v in means.items()}
