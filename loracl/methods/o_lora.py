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

from ..models.lora import Branch
from ..subspace import cross_gram_l1
from . import register
from .base import LoRAOptions
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
    uses_all_trained_params = True

    def begin_task(self, task):
        self.add_task_classes(task)
        self.new_branches()  # PEFT's init, shared with seq-lora: kaiming-uniform down, zero up
        self.model.set_trainable("lora+head")

    def param_groups(self, task):
        # after a mid-task resume the branches were rebuilt from the checkpoint: take them from the model now
        self.model.set_trainable("lora+head")
        self.pairs: list[tuple[torch.Tensor | None, Branch]] = []
        for s in self.model.adapter.sites:
            old = [br.down.detach() for br in s.branches[:-1]]
            self.pairs.append((torch.cat(old) if old else None, s.branches[-1]))
        return super().param_groups(task)

    def loss(self, batch, task):
        loss = super().loss(batch, task)
        return loss + self.penalty() if self.cfg.lambda1 or self.cfg.lambda2 else loss

    def penalty(self) -> torch.Tensor:
        c = self.cfg
        with torch.autocast(self.run.device.type, enabled=False):  # tiny products: keep them in fp32
            total = torch.zeros((), device=self.run.device)
            for old, new in self.pairs:
                if c.lambda1 and old is not None:
                    total = total + c.lambda1 * cross_gram_l1(old, new.down)
                if c.lambda2:
                    total = total + c.lambda2 * (new.down.norm() + new.up.norm())
        return total

    def end_task(self, task):
        for s in self.model.adapter.sites:  # the task's branch joins the frozen, summed ones
            br = s.branches[-1]
            br.train_down = br.train_up = False
            br.down.requires_grad_(False)
            br.up.requires_grad_(False)
