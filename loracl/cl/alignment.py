"""Classifier alignment (SLCA, Zhang et al. ICCV 2023; `InfLoRA_CA` in the official InfLoRA code; BASELINES.md 1).

A step of the classifier, not of a method: heads trained one task at a time on that task's classes are not
calibrated against each other, which on `cifar100-mini` costs more than forgetting does (docs/inflora.md).
After every task, with the model as it is then:

    1. mean_c, cov_c + 1e-4 I of the final-norm features of every new class's training images (test transforms,
       fp32 forward, float64 sums, summed over processes); old classes keep the statistics of when they were
       learned
    2. from the second task on, every linear head chunk re-trained, backbone untouched, on features drawn from
       N(mean_c * (0.9 + 0.1 (task_of_c + 1) / (t + 1)), cov_c): samples_per_class per seen class and epoch,
       shuffled, cross-entropy over all seen classes, SGD with momentum and weight decay, lr cosine-annealed
       per epoch; optionally on logits divided by the mean over tasks of each task block's L2 norm and by a
       temperature (the official code on every dataset but CIFAR-100)

The draws come from a generator seeded by (run seed, task), so a resumed run aligns exactly as an uninterrupted
one; the statistics are plain tensors in `state_dict()`, each covariance as its packed lower triangle: the
Cholesky factor reads nothing else, and a checkpoint holds half the bytes (ViT-B/16 after 100 classes: 225 MiB
instead of 450). The same class statistics serve NCM (methods/ncm.py, `cl/statistics.py`).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..config import AlignConfig
from ..errors import ConfigError
from ..models.heads import LinearHead
from .statistics import class_feature_statistics

COV_RIDGE = 1e-4  # added to every class covariance (official code), so that its Cholesky factor exists


def pack_lower(covs: torch.Tensor) -> torch.Tensor:
    """C x d x d -> C x d(d+1)/2: the lower triangles, row by row."""
    i, j = torch.tril_indices(covs.shape[-1], covs.shape[-1])
    return covs[:, i, j]


def unpack_lower(packed: torch.Tensor, d: int) -> torch.Tensor:
    """The symmetric C x d x d matrices whose lower triangles `pack_lower` gave."""
    i, j = torch.tril_indices(d, d)
    out = packed.new_zeros(len(packed), d, d)
    out[:, i, j] = packed
    out[:, j, i] = packed
    return out


def shrink_factors(task_of: torch.Tensor, t: int) -> torch.Tensor:
    """SLCA's mean shrink: older classes are drawn closer to the origin (their features have drifted most)."""
    return 0.9 + 0.1 * (task_of.double() + 1) / (t + 1)


def sample_features(means: torch.Tensor, chols: torch.Tensor, per_class: int, generator: torch.Generator,
                    factors: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """`per_class` draws from N(mean_c * factor_c, L_c L_c^T) for every class c (rows grouped by class) and the
    class row of each draw. The normal draws come from the CPU `generator` (same numbers on every device)."""
    C, d = means.shape
    z = torch.randn(C, per_class, d, generator=generator, dtype=torch.float64).to(means.device)
    mu = means if factors is None else means * factors.to(means).unsqueeze(1)
    x = mu.unsqueeze(1) + z @ chols.transpose(1, 2)
    return x.reshape(C * per_class, d), torch.arange(C, device=means.device).repeat_interleave(per_class)


def sample_diagonal(means: torch.Tensor, variances: torch.Tensor, per_row: int, generator: torch.Generator,
                    ridge: float = COV_RIDGE) -> tuple[torch.Tensor, torch.Tensor]:
    """`per_row` draws from N(mean_r, diag(var_r) + ridge I) for every stored row r (HiDe-Prompt's clusters; rows
    with zero variance, single-image clusters, are skipped as in its code) and the row of each draw."""
    keep = torch.nonzero(variances.mean(1) != 0).flatten()
    z = torch.randn(len(keep), per_row, means.shape[1], generator=generator, dtype=torch.float64).to(means.device)
    x = means[keep].unsqueeze(1) + z * (variances[keep] + ridge).sqrt().unsqueeze(1)
    return x.reshape(-1, means.shape[1]), keep.to(means.device).repeat_interleave(per_row)


def retrain_on_draws(params, draw, logits_of, generator: torch.Generator, *, epochs: int, lr: float,
                     momentum: float, weight_decay: float, batch_size: int, steps: int | None = None) -> list[float]:
    """The alignment step on stored statistics: SGD (momentum, weight decay) on `params`, lr cosine-annealed per
    epoch; each epoch `draw()` gives fresh features and their target columns, shuffled by `generator`, and
    `steps` mini-batches of `batch_size` (None: all of them) step cross-entropy on `logits_of(features)`.
    Returns the mean loss of each epoch."""
    opt = torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
    losses = []
    with torch.enable_grad():
        for epoch in range(epochs):
            for g in opt.param_groups:  # cosine annealing over the epochs, stepped per epoch as the official codes
                g["lr"] = lr * 0.5 * (1 + math.cos(math.pi * epoch / epochs))
            x, y = draw()
            order = torch.randperm(len(y), generator=generator).to(x.device)
            total, n = torch.zeros((), device=x.device), 0
            for s in list(range(0, len(y), batch_size))[:steps]:
                idx = order[s:s + batch_size]
                loss = F.cross_entropy(logits_of(x[idx].float()), y[idx])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                total += loss.detach() * len(idx)
                n += len(idx)
            losses.append(float(total) / max(n, 1))
    opt.zero_grad(set_to_none=True)
    return losses


def normalised_logits(logits: torch.Tensor, blocks: list[int], temperature: float) -> torch.Tensor:
    """Logits divided by the mean over tasks of each task block's L2 norm (per sample), then by the temperature."""
    norms = torch.stack([b.norm(dim=-1) + 1e-7 for b in logits.split(blocks, dim=-1)], -1)
    return logits / norms.mean(-1, keepdim=True) / temperature


class ClassifierAlignment:
    """Stored class Gaussians and the head re-training after each task (the run loop calls `end_task` after the
    method's, before evaluation, when `align.enabled`)."""

    def __init__(self, cfg: AlignConfig, run, model):
        if not isinstance(model.head, LinearHead):
            raise ConfigError("align.enabled needs per-class linear heads (head.kind linear or cosine); the CLIP "
                              "text head has no class weights to re-train")
        self.cfg, self.run, self.model = cfg, run, model
        d = model.backbone.feature_dim
        self.ids = torch.zeros(0, dtype=torch.long)
        self.task_of = torch.zeros(0, dtype=torch.long)
        self.means = torch.zeros(0, d, dtype=torch.float64)
        self.covs = torch.zeros(0, d, d, dtype=torch.float64)

    def end_task(self, task) -> None:
        known = set(self.ids.tolist())
        new = [c for c in task.class_ids if c not in known]  # a domain-incremental task brings none
        if new:
            s = class_feature_statistics(self.run, self.model, task.train, new, "align-stats")
            eye = torch.eye(s.covs.shape[-1], dtype=torch.float64, device=s.covs.device)
            self.ids = torch.cat([self.ids, torch.tensor(new, dtype=torch.long)])
            self.task_of = torch.cat([self.task_of, torch.full((len(new),), task.index, dtype=torch.long)])
            self.means = torch.cat([self.means, s.means.cpu()])
            # the lower triangle mirrored (the sums round the two triangles differently): what a checkpoint
            # restores, so a resumed run holds the same matrices as an uninterrupted one
            covs = (s.covs + COV_RIDGE * eye).cpu()
            self.covs = torch.cat([self.covs, unpack_lower(pack_lower(covs), covs.shape[-1])])
        if len(set(self.task_of.tolist())) > 1 and self.cfg.epochs > 0:
            with self.run.cost.timed("align"):
                self.align(task.index)

    def align(self, t: int) -> None:
        c, head, dev = self.cfg, self.model.head, self.model.device
        params = list(head.parameters())
        flags = [p.requires_grad for p in params]
        for p in params:
            p.requires_grad_(True)
        means = self.means.to(dev)
        chols = torch.linalg.cholesky(self.covs.to(dev))
        factors = shrink_factors(self.task_of, t) if c.shrink else None
        cols = head.column_of[self.ids.to(head.column_of.device)].to(dev)  # stored class -> head column
        blocks = [len(ids) for ids in head.chunk_ids]
        gen = torch.Generator().manual_seed(self.run.seed("align", t))

        def draw():
            x, k = sample_features(means, chols, c.samples_per_class, gen, factors)
            return x, cols[k]

        def logits_of(x):
            logits = head.all_logits(x)
            return normalised_logits(logits, blocks, c.temperature) if c.logit_norm else logits

        losses = retrain_on_draws(params, draw, logits_of, gen, epochs=c.epochs, lr=c.lr, momentum=c.momentum,
                                  weight_decay=c.weight_decay, batch_size=c.batch_size)
        for p, f in zip(params, flags):
            p.requires_grad_(f)
        self.run.log(f"  align after task {t}: {len(self.ids)} classes, {c.epochs} epochs, "
                     f"loss {losses[0]:.3f} -> {losses[-1]:.3f}")

    def state_dict(self) -> dict:
        return {"ids": self.ids, "task_of": self.task_of, "means": self.means, "covs_lower": pack_lower(self.covs)}

    def load_state_dict(self, state: dict) -> None:
        self.ids, self.task_of = state["ids"].long().cpu(), state["task_of"].long().cpu()
        self.means = state["means"].double().cpu()
        if "covs" in state:  # checkpoints written before the packed form
            covs = state["covs"].double().cpu()
            self.covs = unpack_lower(pack_lower(covs), covs.shape[-1])
        else:
            self.covs = unpack_lower(state["covs_lower"].double().cpu(), self.means.shape[-1])
