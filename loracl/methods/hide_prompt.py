"""HiDe-Prompt (Wang et al., NeurIPS 2023), as the official thu-ml/HiDe-Prompt code runs it.

Two models over one frozen ViT, both trained on every task (the official code runs stage 1 over all tasks, then
stage 2; each only needs the tasks so far, so here both run per task):

- task-identity inference (TII): a head on the frozen pretrained features q(x) (final-norm CLS, no prompt): a
  residual MLP (d -> 2d -> d, GELU, + q, LayerNorm; `original_model_mlp_structure [2]`) and a linear layer over
  every class of the scenario, trained with cross-entropy over the task's classes; the task of a test image is
  the task of its argmax class among the classes seen so far;
- within-task prediction: one prefix e-prompt per task (blocks 0-4, `length` key and `length` value tokens),
  initialised from the previous task's; in training the task's own prompt, mixed with the earlier ones,
  (1 - m) P_t + m mean(P_<t) (no gradient through the earlier ones), which after the task becomes P_t. Loss:
  cross-entropy over the task's classes + reg * contrastive(stored centroids, batch features);
  at test the prompt of the TII-predicted task.

After each task, per class of the task, both feature sets (q(x) and the features under the task's prompt, test
transforms) are summarised by k-means (`n_centroids`) into clusters with mean and per-dimension variance
(cl/statistics.py); from the second task on the TII head and the classifier are re-trained on features drawn
from N(mean, diag(var) + 1e-4 I) of every cluster of every seen class (task-adaptive prediction; the shared
alignment step of cl/alignment.py): `ca_batch` draws per cluster (x5 for the classifier), as many mini-batches
per epoch as there are old classes, SGD momentum 0.9, weight decay 5e-4, lr cosine over `ca_epochs`.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn as nn
import torch.nn.functional as F
from pydantic import Field

from ..cl.alignment import retrain_on_draws, sample_diagonal
from ..cl.statistics import multi_centroid_statistics
from ..config import MethodConfig
from ..errors import ConfigError
from ..models.attention import prefix_dim, prefix_slots, prefixed
from ..models.prompts import PromptModule, split_prefix
from . import register
from .base import Capabilities
from .prompting import PromptMethod


class HiDePromptConfig(MethodConfig):
    length: int = Field(5, ge=1, description="e-prompt length: this many key and as many value tokens (CIFAR 5, "
                                             "ImageNet-R 20)")
    blocks: list[int] = Field(default_factory=lambda: [0, 1, 2, 3, 4], description="blocks with the e-prompts")
    reg: float = Field(0.1, ge=0, description="weight of the contrastive term (CIFAR 0.1, ImageNet-R 0.5)")
    temperature: float = Field(0.8, gt=0, description="of the contrastive term")
    prompt_momentum: float = Field(0.01, ge=0, le=1)
    tii_hidden: int = Field(2, ge=1, description="TII MLP width, in multiples of the feature width")
    n_centroids: int = Field(10, ge=1, description="k-means clusters per class")
    ca_epochs: int = Field(30, ge=0, description="task-adaptive prediction epochs (crct_epochs); 0: none")
    ca_lr: float = Field(0.005, gt=0)
    ca_batch: int | None = Field(None, ge=1, description="draws per cluster (TII; x5 for the classifier) and "
                                                           "mini-batch size; None: the run's batch size")


def contrastive(feats: torch.Tensor, anchors: torch.Tensor, temperature: float) -> torch.Tensor:
    """The official `orth_loss`: M = [anchors; feats], cross-entropy of M M^T / temperature against the identity."""
    M = torch.cat([anchors.to(feats), feats])
    return F.cross_entropy(M @ M.t() / temperature, torch.arange(len(M), device=M.device))


class TIIHead(nn.Module):
    """The official `MlpMapping(hidden=[h])` and linear head of the original model (dropout 0)."""

    def __init__(self, d: int, hidden: int, n_classes: int):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(d, hidden * d), nn.GELU(), nn.Linear(hidden * d, d))
        self.norm = nn.LayerNorm(d)
        self.fc = nn.Linear(d, n_classes)

    def forward(self, q: torch.Tensor) -> torch.Tensor:
        return self.fc(self.norm(self.mlp(q) + q))


class HiDePrompts(PromptModule):
    def __init__(self, cfg: HiDePromptConfig, tasks, dims: dict[int, int], d: int):
        super().__init__(cfg.blocks)
        self.momentum = cfg.prompt_momentum
        n = len(tasks)
        # [block][task], uniform in [-1, 1) as the official init; first `length` rows keys, the rest values
        self.e = nn.ModuleList([nn.ParameterList([nn.Parameter(torch.rand(2 * cfg.length, dims[b]) * 2 - 1)
                                                  for _ in range(n)]) for b in self.blocks])
        ids = [c for t in tasks for c in t.class_ids]
        if len(set(ids)) != len(ids):
            raise ConfigError("hide-prompt: a class in two tasks; HiDe-Prompt is class-incremental")
        self.tii = TIIHead(d, cfg.tii_hidden, len(ids))
        col = torch.full((max(ids) + 1,), -1, dtype=torch.long)
        col[torch.tensor(ids)] = torch.arange(len(ids))
        self.register_buffer("col_of", col, persistent=False)  # class id -> TII column
        self.register_buffer("task_of_col", torch.tensor([i for i, t in enumerate(tasks) for _ in t.class_ids]),
                             persistent=False)
        self.force: int | None = None  # the task whose prompt every image gets outside training (statistics)
        self.last_query = self.tii_logits = None

    def begin(self, task):
        super().begin(task)
        if task > 0:  # shared_prompt_pool: the new prompt starts as the previous task's
            with torch.no_grad():
                for e in self.e:
                    e[task].copy_(e[task - 1])

    def mixed(self, e: nn.ParameterList, t: int) -> torch.Tensor:
        """The task's prompt with the prompt momentum: (1 - m) P_t + m mean(P_<t), the earlier ones detached."""
        if t == 0 or self.momentum == 0:
            return e[t]
        return (1 - self.momentum) * e[t] + self.momentum * torch.stack(list(e[:t])).mean(0).detach()

    @torch.no_grad()
    def end(self):
        super().end()
        for e in self.e:
            e[self.task].copy_(self.mixed(e, self.task))

    def predict_task(self, tii_logits: torch.Tensor) -> torch.Tensor:
        """The task of the argmax class among the classes of the tasks begun so far."""
        seen = self.task_of_col <= self.task
        return self.task_of_col[tii_logits.masked_fill(~seen, float("-inf")).argmax(-1)]

    def prefixes(self, q):
        self.tii_logits = self.tii(q)
        if self.learning:  # the task's own prompt, with the momentum
            return {b: split_prefix(self.mixed(e, self.task).expand(len(q), -1, -1))
                    for b, e in zip(self.blocks, self.e)}, None
        if self.force is not None:
            k = torch.full((len(q),), self.force, dtype=torch.long, device=q.device)
        else:
            k = self.predict_task(self.tii_logits.detach())
        return {b: split_prefix(torch.stack(list(e[: self.task + 1]))[k]) for b, e in zip(self.blocks, self.e)}, None

    def features(self, backbone, x):
        self.aux_loss = None
        if self.task < 0:
            return backbone.features(x)
        self.last_query = self.query(backbone, x)
        prefixes, _ = self.prefixes(self.last_query)
        with prefixed(prefix_slots(backbone, self.blocks), prefixes):
            return backbone.features(x)

    def trainable(self):
        return [e[self.task] for e in self.e] + list(self.tii.parameters())

    @contextlib.contextmanager
    def unmemoised(self):
        """Queries computed, never looked up (the method's own passes count the same FLOPs after a resume)."""
        memo, self.memo = self.memo, None
        try:
            yield
        finally:
            self.memo = memo


@register
class HiDePrompt(PromptMethod):
    """HiDe-Prompt (NeurIPS 2023): per-task prefix e-prompts chosen by a task-identity head on frozen features,
    contrastive term on stored centroids, heads re-aligned on multi-centroid statistics."""

    name = "hide-prompt"
    Config = HiDePromptConfig
    caps = Capabilities(scenarios=("class-incremental",), all_params_every_step=True, export=False)

    def make_prompts(self):
        slots = prefix_slots(self.model.backbone, self.cfg.blocks)
        return HiDePrompts(self.cfg, self.run.scenario.tasks, {b: prefix_dim(a) for b, a in slots.items()},
                           self.model.backbone.feature_dim)

    def setup(self):
        super().setup()
        d = self.model.backbone.feature_dim
        # per stored cluster: mean, variance, class; "tii" of q(x), "cls" of the prompted features
        self.stats = {k: (torch.zeros(0, d, dtype=torch.float64), torch.zeros(0, d, dtype=torch.float64),
                          torch.zeros(0, dtype=torch.long)) for k in ("tii", "cls")}
        self._anchors = None

    def loss(self, net, batch, task):
        ids = self.run.classes.train(task)
        logits, feats = net(batch.x, ids, return_features=True)
        loss = self.cross_entropy(logits, batch.y, ids)
        if self.cfg.reg > 0:
            loss = loss + self.cfg.reg * contrastive(feats.float(), self.anchors(), self.cfg.temperature)
        own = self.run.classes.tensor(task.class_ids).to(self.prompts.col_of.device)  # TII: the task's classes only
        tii = self.prompts.tii_logits[:, self.prompts.col_of[own]]
        return loss + self.cross_entropy(tii, batch.y, own)

    def anchors(self) -> torch.Tensor:
        if self._anchors is None:
            self._anchors = self.stats["cls"][0].float().to(self.model.device)
        return self._anchors

    def end_task(self, task):
        super().end_task(task)  # the prompt momentum: P_t <- (1 - m) P_t + m mean(P_<t)
        self.store_statistics(task)
        if task.index > 0 and self.cfg.ca_epochs > 0:
            with self.run.cost.timed("align"):
                self.align(task.index)
        self.run.record("tii_accuracy", task.index, self.tii_accuracy(task.index))

    @torch.no_grad()
    def store_statistics(self, task):
        """Multi-centroid statistics of the task's classes: of q(x) (TII) and of the features under the task's
        own prompt (classifier), test transforms, eval mode."""
        p, out = self.prompts, {"tii": [], "cls": [], "y": []}
        was = self.model.training
        self.model.eval()
        p.force = task.index

        def fn(b):
            with torch.autocast(self.model.device.type, enabled=False):
                out["cls"].append(self.model.features(b.x).double().cpu())
            out["tii"].append(p.last_query.double().cpu())
            out["y"].append(b.y.cpu())

        try:
            with p.unmemoised():
                self.run.forward_pass(task.train, fn, desc="hide-stats", view="test")
        finally:
            p.force = None
            self.model.train(was)
        y = torch.cat(out["y"])
        for k in ("tii", "cls"):
            gen = torch.Generator().manual_seed(self.run.seed("hide-kmeans", k, task.index))
            new = multi_centroid_statistics(torch.cat(out[k]), y, task.class_ids, self.cfg.n_centroids, gen)
            self.stats[k] = tuple(torch.cat([a, b]) for a, b in zip(self.stats[k], new))
        self._anchors = None

    def align(self, t: int):
        """Task-adaptive prediction of the TII head and of the classifier on draws from the stored clusters."""
        p, head, dev, c = self.prompts, self.model.head, self.model.device, self.cfg
        bs = c.ca_batch or self.run.batch_size
        old = sum(len(task.class_ids) for task in self.run.scenario.tasks[:t])  # the official crct_num
        seen = p.task_of_col <= t
        for k, params, per, cols, logits_of in (
                ("tii", list(p.tii.parameters()), bs, p.col_of,
                 lambda x: p.tii(x).masked_fill(~seen, float("-inf"))),
                ("cls", list(head.parameters()), 5 * bs, head.column_of, head.all_logits)):
            means, variances, owner = (s.to(dev) for s in self.stats[k])
            gen = torch.Generator().manual_seed(self.run.seed("hide-align", k, t))
            targets = cols[owner.to(cols.device)].to(dev)

            def draw(means=means, variances=variances, per=per, targets=targets, gen=gen):
                x, row = sample_diagonal(means, variances, per, gen)
                return x, targets[row]

            flags = [q.requires_grad for q in params]
            for q in params:
                q.requires_grad_(True)
            losses = retrain_on_draws(params, draw, logits_of, gen, epochs=c.ca_epochs, lr=c.ca_lr, momentum=0.9,
                                      weight_decay=5e-4, batch_size=per, steps=old)
            for q, f in zip(params, flags):
                q.requires_grad_(f)
            self.run.log(f"  hide-prompt {k} alignment after task {t}: loss {losses[0]:.3f} -> {losses[-1]:.3f}")

    @torch.no_grad()
    def tii_accuracy(self, t: int) -> float:
        """How often the TII head names the right task on the test images of the tasks so far (a measurement)."""
        p, hits, n = self.prompts, [0], [0]
        was = self.model.training
        self.model.eval()
        for j, task in enumerate(self.run.scenario.tasks[: t + 1]):
            def fn(b, j=j):
                k = p.predict_task(p.tii(p.query(self.model.backbone, b.x)))
                hits[0] += int((k == j).sum())
                n[0] += len(b.y)
            with p.unmemoised():
                self.run.forward_pass(task.test, fn, desc="hide-tii", view="test")
        self.model.train(was)
        return hits[0] / max(n[0], 1)

    def state_dict(self):
        return {f"{k}_{f}": v for k, s in self.stats.items() for f, v in zip(("means", "vars", "class"), s)}

    def load_state_dict(self, state):
        self.stats = {k: (state[f"{k}_means"].double(), state[f"{k}_vars"].double(), state[f"{k}_class"].long())
                      for k in ("tii", "cls")}
        self._anchors = None
