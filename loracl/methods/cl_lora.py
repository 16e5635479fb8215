"""CL-LoRA: task-shared and task-specific LoRA (He et al., CVPR 2025; BASELINES.md section 6; official code
JiangpengHe/CL-LoRA, read in /work/notes/cl-lora-facts.md).

LoRA on the query and value projections of every block, scale 1, each with a fixed-at-init random down-projection
with orthonormal rows (`orthonormal_down`) and a zero up-projection:

- the first half of the blocks (`shared_blocks`) carry one task-SHARED branch: its down stays fixed forever, its
  up trains through every task;
- the second half carry a fresh task-SPECIFIC branch per task (down and up train), times a trainable block
  weight w ~ U(0.5, 1.5) per projection; at the task's end it is frozen and stored.

Task t trains, per batch (from the second task on), two optimiser steps of the same SGD:
    1. KD step: 5 * soft-CE_T=2( proxy(f_shared(x)), proxy(f_shared_prev(x)) ), f_shared = the shared blocks alone
       then the final norm's CLS, `prev` = the shared ups at the end of task t-1; the shared ups' gradients
       reassigned row by row (`reassign_gradient_`); step. The proxy classifier gets this step's gradient too.
    2. main step: CE( proxy(f_t(x)) ) over the task's classes + 1e-4 * orthogonality(old block weights, w_t).
The proxy is a cosine classifier over the task's classes with a learnable scale (init 1), new per task.
At the task's end, prototypes = class means of f_t on the task's training images (test transforms), and a test
image's logit for class c of task k is cos(f_k(x), prototype_c): each class in its own task's feature space. The
shared half runs once per image, the specific half once per task seen (`logits`).

`kd_step: summed` (switch) puts the reassigned KD gradient into the main step instead of taking its own step.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn as nn
import torch.nn.functional as F
from pydantic import Field

from ..cl.shared_specific import distillation, orthogonality, orthonormal_down, prefix, reassign_gradient_, suffix
from ..cl.statistics import class_feature_statistics, ncm_logits
from ..models.branches import Branch, WeightedBranch
from ..models.lora import task_tag
from . import register
from .base import Capabilities, LoRAOptions, Method

SHARED, PREVIOUS = "shared", "previous"


class CLLoRAConfig(LoRAOptions):
    rank: int = Field(8, ge=1, description="official: 8 on CIFAR-100 (ffn_num), 10 on ImageNet-R")
    targets: list[str] = Field(default_factory=lambda: ["q", "v"], description="the official msa [1, 0, 1]")
    shared_blocks: int | None = Field(None, ge=0, description="first blocks with the shared branch (None: half)")
    kd_weight: float = Field(5.0, ge=0, description="weight of the shared blocks' distillation")
    temperature: float = Field(2.0, gt=0)
    orth_weight: float = Field(1e-4, ge=0, description="weight of the block weights' orthogonality")
    reassign: bool = Field(True, description="scale the KD gradient by the previous up's row norms")
    kd_step: Literal["separate", "summed"] = Field(
        "separate", description="separate: its own optimiser step before the main one (official); summed: the "
                                "reassigned KD gradient is added to the main step's")


class CosineProxy(nn.Module):
    """The task's training classifier: sigma * cos(features, w_j) over the current task's classes."""

    def __init__(self, dim: int, n: int):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(n, dim))
        self.sigma = nn.Parameter(torch.ones(()))

    @torch.no_grad()
    def reset(self, generator: torch.Generator) -> None:
        bound = 1.0 / math.sqrt(self.weight.shape[1])
        self.weight.copy_(torch.rand(self.weight.shape, generator=generator) * 2 * bound - bound)
        self.sigma.fill_(1.0)

    def forward(self, feats: torch.Tensor, n: int) -> torch.Tensor:
        return self.sigma * F.normalize(feats.float(), dim=1) @ F.normalize(self.weight[:n], dim=1).t()


@register
class CLLoRA(Method):
    """CL-LoRA (CVPR 2025): shared LoRA (fixed down, KD-guarded up) + per-task LoRA; per-task prototypes."""

    name = "cl-lora"
    Config = CLLoRAConfig
    caps = Capabilities(backbones=("timm",), scenarios=("class-incremental",), lora=True, export=False)

    def setup(self):
        c = self.cfg
        adapter = self.model.inject_lora(c)
        self.vit = self.model.backbone.model
        self.split = len(self.vit.blocks) // 2 if c.shared_blocks is None else c.shared_blocks
        g = torch.Generator().manual_seed(self.run.seed("cl-lora", "shared"))
        for s in self.shared_sites:
            s.add_lora(orthonormal_down(c.rank, s.d_in, g), torch.zeros(s.d_out, c.rank), tag=SHARED,
                       scale=c.scale, train_down=False, train_up=True)
        n = max(len(t.class_ids) for t in self.run.scenario.tasks)
        self.proxy = self.model.own("proxy", CosineProxy(self.model.backbone.feature_dim, n))
        d = self.model.backbone.feature_dim
        self.ids, self.owner = torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.long)
        self.protos = torch.zeros(0, d)

    @property
    def shared_sites(self):
        return [s for s in self.model.adapter.sites if s.block < self.split]

    @property
    def specific_sites(self):
        return [s for s in self.model.adapter.sites if s.block >= self.split]

    # ---- per task --------------------------------------------------------------------------------------
    def begin_task(self, task):
        self.add_task_classes(task)
        c, t = self.cfg, task.index
        g = torch.Generator().manual_seed(self.run.seed("cl-lora", "task", t))
        for s in self.specific_sites:
            w = 0.5 + float(torch.rand((), generator=g))
            s.add(WeightedBranch(orthonormal_down(c.rank, s.d_in, g), torch.zeros(s.d_out, c.rank), c.scale,
                                 weight=w), task_tag(t))
        if t > 0:  # the teacher: the shared branches as the previous task left them, frozen
            for s in self.shared_sites:
                if PREVIOUS in s.branches:
                    s.pop(PREVIOUS)
                br = s.branches[SHARED]
                s.add(Branch(br.down.detach(), br.up.detach(), br.scale, False, False), PREVIOUS)
        self.proxy.reset(g)
        self.model.set_trainable("lora+owned")
        self.restore(task)

    def restore(self, task):
        t = task.index
        self.model.adapter.select({SHARED, task_tag(t)})  # model.features: the current task's network
        self.old_weights = [self.block_weights(k).detach() for k in range(t)]

    def block_weights(self, k: int) -> torch.Tensor:
        """Task k's block weights, one per specific projection (the official (3, blocks) tensor without its
        unused key row)."""
        return torch.stack([s.branches[task_tag(k)].weight for s in self.specific_sites])

    def loss(self, net, batch, task):
        t, c = task.index, self.cfg
        ids = self.run.classes.tensor(task.class_ids)  # the task's own classes (official), whatever loss_scope
        if t > 0 and c.kd_weight:
            kd = c.kd_weight * self.shared_distillation(batch.x, len(ids))
            if c.kd_step == "separate":
                self.run.optimizer_step(kd, self.reassign)
            else:
                kd.backward()
                self.reassign()
        with self.model.adapter.selected({SHARED, task_tag(t)}):
            feats = suffix(self.vit, prefix(self.vit, batch.x, self.split), self.split)
        loss = self.cross_entropy(self.proxy(feats, len(ids)), batch.y, ids)
        if t > 0 and c.orth_weight:
            loss = loss + c.orth_weight * orthogonality(self.old_weights, self.block_weights(t))
        return loss

    def shared_distillation(self, x: torch.Tensor, n: int) -> torch.Tensor:
        """KD between the shared blocks with the current and with the previous shared ups (official
        `forward_general_cls`: shared blocks, final norm, CLS), both through the proxy."""
        with self.model.adapter.selected({SHARED}):
            student = suffix(self.vit, prefix(self.vit, x, self.split), self.split, self.split)
        with self.model.adapter.selected({PREVIOUS}), torch.no_grad():
            teacher = suffix(self.vit, prefix(self.vit, x, self.split), self.split, self.split)
        return distillation(self.proxy(student, n), self.proxy(teacher, n), self.cfg.temperature)

    def reassign(self) -> None:
        if self.cfg.reassign:
            for s in self.shared_sites:
                reassign_gradient_(s.branches[SHARED].up, s.branches[PREVIOUS].up)

    def end_task(self, task):
        tag = task_tag(task.index)
        self.model.adapter.freeze(tag)
        with self.model.adapter.selected({SHARED, tag}):
            st = class_feature_statistics(self.run, self.model, task.train, task.class_ids, "prototypes",
                                          covariance=False)
        self.ids = torch.cat([self.ids, torch.as_tensor(list(task.class_ids), dtype=torch.long)])
        self.owner = torch.cat([self.owner, torch.full((len(task.class_ids),), task.index, dtype=torch.long)])
        self.protos = torch.cat([self.protos, st.means.float().cpu()])

    # ---- evaluation --------------------------------------------------------------------------------------
    def logits(self, x, class_ids):
        """Class c of task k: cos(f_k(x), prototype_c); the shared prefix once, the specific suffix per task."""
        known = torch.isin(class_ids.cpu(), self.ids)
        out = torch.full((len(x), len(class_ids)), float("-inf"), device=x.device)
        if not known.any():
            return out
        dev = self.model.device
        rows = self.run.classes.columns(class_ids[known].cpu(), self.ids)
        owner, protos = self.owner[rows], self.protos[rows].to(dev)
        cols = known.nonzero().flatten()
        with self.model.adapter.selected({SHARED}):
            h = prefix(self.vit, x, self.split)
        for k in owner.unique().tolist():
            with self.model.adapter.selected({SHARED, task_tag(k)}):
                f = suffix(self.vit, h, self.split)
            mine = owner == k
            out[:, cols[mine].to(dev)] = ncm_logits(f, protos[mine.to(dev)])
        return out

    def state_dict(self):
        return {"ids": self.ids, "owner": self.owner, "protos": self.protos}

    def load_state_dict(self, state):
        self.ids, self.owner, self.protos = state["ids"].long(), state["owner"].long(), state["protos"].float()
