"""RanPAC: random projections and a closed-form class-prototype head on a frozen backbone (McDonnell et al.,
NeurIPS 2023; LAMDA-PILOT `models/ranpac.py`; BASELINES.md 6).

    task 0, optionally: first-session adaptation (the official code trains a parameter-efficient module and a
        head on the first task only; loracl's parameter-efficient module is LoRA), merged into the weights;
        the backbone is frozen from then on and that head is never used again
    after every task t:
        f = features of the task's training images (test transforms)
        h = ReLU(W_rand^T f)                      W_rand: d x M, N(0, 1), drawn once (M = 10,000)
        G += h h^T,  C += h y^T                   over every image so far
        lambda_t = the best of 10^-8 ... 10^8 on the last 20% of the task's images, fitted on the first 80%
        W = (G + lambda_t I)^-1 C
    test: h(x)^T W over the classes asked for

No forgetting beyond the adaptation by construction; `cl/ridge.py` holds the shared ridge math (RAIL uses it
too). The official code keeps the first 80% of a shuffled loader's order for the fit; here a permutation seeded
by (run seed, task). With a CLIP text head, classes without a column yet are scored zero-shot (MTIL Transfer).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from pydantic import Field

from .. import dist
from ..cl.ridge import RANPAC_RIDGES, RidgeStatistics, random_projection, select_ridge
from ..models.lora import task_tag
from . import register
from .base import Capabilities, LoRAOptions, Method


def task_features(method: Method, images, desc: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Features (fp32, eval mode, test transforms) and labels of every image of `images`, in row order, gathered
    over processes."""
    model, rows, feats, ys = method.model, [], [], []
    was_training = model.training
    model.eval()

    def fn(b):
        with torch.autocast(model.device.type, enabled=False):
            feats.append(model.features(b.x).float().cpu())
        ys.append(b.y.cpu())
        rows.append(b.rows.cpu())

    method.run.forward_pass(images, fn, desc=desc, view="test")
    model.train(was_training)
    parts = dist.all_gather_objects((torch.cat(rows), torch.cat(feats), torch.cat(ys)) if rows else None)
    r, f, y = (torch.cat(p) for p in zip(*[p for p in parts if p is not None]))
    order = torch.argsort(r)
    return f[order], y[order]


class RidgeHeadMethod(Method):
    """A frozen backbone (after an optional first-task adaptation) scored by a ridge head on random features."""

    init = "gaussian"
    normalize = False  # unit-norm features before the projection (RAIL)

    def setup(self):
        d = self.model.backbone.feature_dim
        self.proj = random_projection(d, self.cfg.M, self.run.seed("random-projection"), self.init)
        self.stats = RidgeStatistics(self.cfg.M, self.expand)
        self.weights = torch.zeros(self.cfg.M, 0, dtype=torch.float64)
        self.lams: list[float] = []
        self._device = None

    def expand(self, f: torch.Tensor) -> torch.Tensor:
        f = F.normalize(f.float(), dim=-1) if self.normalize else f.float()
        return torch.relu(f @ self.proj.to(f.device))

    def choose_lambda(self, f, y, task) -> float:
        raise NotImplementedError

    def end_task(self, task):
        f, y = task_features(self, task.train, f"{self.name}-features")
        phase = f"{self.name}-solve"  # timed; FLOPs of its matrix products (the counter has no formula for
        self.run.cost.recount(phase)  # the solve and the eigendecomposition)

        def solve():
            with torch.autocast("cpu", enabled=False):  # fp32 / fp64, whatever the run's precision
                self.stats.add(f, y)
                lam = self.choose_lambda(f, y, task)
                return lam, self.stats.solve(lam)

        with self.run.cost.timed(phase):
            lam, self.weights = self.run.cost.counted(phase, len(y), solve)
        self.lams.append(lam)
        self.run.record("lambda", task.index, lam)
        self._device = None

    def scores(self, feats: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(class ids with a column, h(x)^T W over them)."""
        if self._device is None:
            dev = self.model.device
            self._device = (self.stats.ids.to(dev), self.weights.float().to(dev), self.proj.to(dev))
        ids, w, proj = self._device
        with torch.autocast(feats.device.type, enabled=False):  # the head in fp32 under mixed precision
            f = F.normalize(feats.float(), dim=-1) if self.normalize else feats.float()
            return ids, torch.relu(f @ proj) @ w

    def state_dict(self):
        return {"ridge": self.stats.state_dict(), "weights": self.weights, "lambdas": list(self.lams)}

    def load_state_dict(self, state):
        self.stats.load_state_dict(state["ridge"])
        self.weights, self.lams = state["weights"].double(), list(state["lambdas"])
        self._device = None


class RanPACConfig(LoRAOptions):
    M: int = Field(10000, ge=1, description="random features (the projection's width)")
    adapt_first_task: bool = Field(True, description="first-session adaptation: LoRA trained on task 0, merged")
    ridges: list[float] = Field(default_factory=lambda: list(RANPAC_RIDGES), min_length=1,
                                description="candidate lambdas, chosen per task on held-out training images")
    fit_fraction: float = Field(0.8, gt=0, lt=1, description="share of a task's images the candidates are fitted on")


@register
class RanPAC(RidgeHeadMethod):
    """RanPAC: first-task LoRA adaptation, then a frozen backbone, random ReLU features and a ridge head."""

    name = "ranpac"
    Config = RanPACConfig
    caps = Capabilities(lora=True, export=False)  # its classifier is the ridge head, not a head of the model

    def setup(self):
        super().setup()
        self.model.inject_lora(self.cfg)  # only task 0 gets a branch, and only with adapt_first_task

    def begin_task(self, task):
        self.add_task_classes(task)
        if task.index == 0 and self.cfg.adapt_first_task:
            self.model.adapter.add_fresh(self.cfg.rank, self.cfg.scale, task_tag(0))
            self.model.set_trainable("lora+head")
        else:
            self.model.set_trainable("none")

    def end_task(self, task):
        if task.index == 0 and self.cfg.adapt_first_task:
            self.model.adapter.merge_all()
            self.model.set_trainable("none")
        super().end_task(task)

    def choose_lambda(self, f, y, task):
        perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(self.run.seed("ridge-split", task.index)))
        onehot = self.stats.targets(y)
        onehot = onehot[:, onehot.sum(0) > 0]  # the task's classes: other columns add nothing to any error
        return select_ridge(self.expand(f[perm]), onehot[perm], self.cfg.ridges, self.cfg.fit_fraction)[0]

    def logits(self, x, class_ids):
        """h(x)^T W; classes without a column score -inf, and when none of `class_ids` has one (a CLIP text head
        before the dataset's task) the model's head scores them zero-shot."""
        feats = self.model.features(x)
        ids, out = self.scores(feats)
        known = torch.isin(class_ids, ids)
        if not known.any():
            return self.model.head(feats, class_ids)
        cols = self.run.classes.columns(class_ids[known], ids)
        if known.all():
            return out[:, cols]
        full = out.new_full((len(out), len(class_ids)), float("-inf"))
        full[:, known] = out[:, cols]
        return full
