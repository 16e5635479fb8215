"""O-LoRA: orthogonal subspace learning (Wang et al., EMNLP 2023 Findings; BASELINES.md section 3).

Per task a new LoRA branch on every adapted projection (q and v by default, rank 8, alpha 32); earlier tasks'
branches stay live, frozen, and are summed in every forward (no task id, no merge: the official code keeps
them and parameters grow with tasks). The new down-projection is pushed away from the old ones' row space:

    L = L_task + lambda1 * sum_layers sum_jk |(A_old A_new^T)_jk| + lambda2 * sum_new ||theta||_2

A_old (r_sum x d_in) stacks the earlier down-projections of the same weight, A_new (r x d_in) is the new one
(the official code puts the penalty on the down factor `lora_A`; the paper writes it on the other factor with
squares). The official scripts' LoRA dropout (0.1) is not carried over: loracl's branches have none.
"""

from __future__ import annotations

import torch
from pydantic import Field

from ..cl.subspace import cross_gram_l1
from ..models.lora import task_tag
from . import register
from .base import Capabilities, LoRAOptions
from .baselines import LoRAMethod


class OLoRAConfig(LoRAOptions):
    rank: int = Field(8, ge=1)
    alpha: float | None = Field(32.0, description="scale = alpha / rank (official scripts: 32 / 8 = 4)")
    lambda1: float = Field(0.5, ge=0, description="weight of the L1 penalty on A_old A_new^T")
    lambda2: float = Field(0.0, ge=0, description="weight of the L2 norms of the new branch's factors")


@register
class OLoRA(LoRAMethod):
    """O-LoRA (EMNLP 2023): a LoRA per task, earlier ones frozen and summed, new down rows kept orthogonal (L1)."""

    name = "o-lora"
    Config = OLoRAConfig
    caps = Capabilities(lora=True, all_params_every_step=True)

    def begin_task(self, task):
        super().begin_task(task)  # a fresh branch per site (PEFT's init, shared with seq-lora), lora+head train
        self.restore(task)

    def restore(self, task):
        """Per site: the earlier tasks' down-projections stacked (constants) and the task's branch."""
        tag = task_tag(task.index)
        self.pairs = []
        for s in self.model.adapter.sites:
            old = [br.down.detach() for t, br in s.branches.items() if t != tag]
            self.pairs.append((torch.cat(old) if old else None, s.branches[tag]))

    def loss(self, net, batch, task):
        loss = super().loss(net, batch, task)
        return loss + self.penalty() if self.cfg.lambda1 or self.cfg.lambda2 else loss

    def penalty(self) -> torch.Tensor:
        c, dev = self.cfg, self.model.device
        with torch.autocast(dev.type, enabled=False):  # tiny products: keep them in fp32
            total = torch.zeros((), device=dev)
            for old, new in self.pairs:
                if c.lambda1 and old is not None:
                    total = total + c.lambda1 * cross_gram_l1(old, new.down)
                if c.lambda2:
                    total = total + c.lambda2 * (new.down.norm() + new.up.norm())
        return total

    def end_task(self, task):
        self.model.adapter.freeze(task_tag(task.index))  # the task's branch joins the frozen, summed ones
