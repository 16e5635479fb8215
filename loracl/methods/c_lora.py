"""C-LoRA: continual self-regularised LoRA (Smith et al., 2023; BASELINES.md section 6).

Per task a new LoRA branch on every adapted projection, merged into the weight when the task ends (no task
identity at test time, no growth of the model). While task t trains, the new update is kept off the entries
that earlier tasks changed:

    L = L_task + lambda * sum_sites || (sum_{k<t} delta_k)  (elementwise)  delta_t ||_F^2,   delta = scale * up @ down

The sum of the earlier updates of each weight is kept as one dense matrix (what the merges added to it), so
the penalty costs the same at every task. Settings are InfLoRA's for its C-LoRA rows: rank 64, lambda 0.5, lr
1e-3 (from the preset), on the attention projections. There is no official ViT code; the public port that
reads the task id from the labels at test time is not followed (that is a bug, not the method).
"""

from __future__ import annotations

import torch
from pydantic import Field

from ..models.lora import task_tag
from . import register
from .base import Capabilities, LoRAOptions
from .baselines import LoRAMethod


class CLoRAConfig(LoRAOptions):
    rank: int = Field(64, ge=1)
    targets: list[str] = Field(default_factory=lambda: ["q", "k", "v", "out"],
                               description="the attention projections")
    lam: float = Field(0.5, ge=0, description="weight of the self-regularisation (InfLoRA's C-LoRA: 0.5)")


def overlap_penalty(previous: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """|| previous (elementwise) delta ||_F^2: large where the new update reuses entries earlier tasks changed."""
    return (previous * delta).pow(2).sum()


@register
class CLoRA(LoRAMethod):
    """C-LoRA: a LoRA per task, merged; its update penalised where earlier tasks' summed updates are large."""

    name = "c-lora"
    Config = CLoRAConfig
    caps = Capabilities(lora=True, all_params_every_step=True)

    def setup(self):
        super().setup()
        self.previous: list[torch.Tensor] = []  # per site, sum of the merged updates; empty before task 1 ends

    def loss(self, net, batch, task):
        loss = super().loss(net, batch, task)
        if not (self.previous and self.cfg.lam):
            return loss
        tag = task_tag(task.index)
        with torch.autocast(self.model.device.type, enabled=False):  # the products in fp32
            reg = sum(overlap_penalty(p, s.branches[tag].delta_weight().float())
                      for p, s in zip(self.previous, self.model.adapter.sites))
        return loss + self.cfg.lam * reg

    @torch.no_grad()
    def end_task(self, task):
        sites = self.model.adapter.sites
        deltas = [s.branches[task_tag(task.index)].delta_weight().float() for s in sites]
        self.previous = deltas if not self.previous else [p + d for p, d in zip(self.previous, deltas)]
        super().end_task(task)  # merge the task's branch into the weights

    def state_dict(self):
        return {"previous": [p.cpu() for p in self.previous]}

    def load_state_dict(self, state):
        dev = self.model.device
        self.previous = [p.to(dev, torch.float32) for p in state["previous"]]
