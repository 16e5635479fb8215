"""WiSE-FT as ZSCL's code runs it continually (Wortsman et al., CVPR 2022; Thunderbeee/ZSCL
`mtil/scripts/WiSE_finetune.sh`: `--wise_merge --wise_ft_model n --wise_ft_alpha 0.8`; BASELINES.md 5).

    every task: both encoders fine-tuned with CE (label smoothing 0.2), CLIP's temperature fixed; then
                theta <- 0.8 theta_fine-tuned + 0.2 theta_ref, every weight, and the next task starts from it
    theta_ref:  `reference: start` (the official `n`): the model at the task's start (task 0: zero-shot CLIP);
                `reference: zeroshot`: the pretrained CLIP, every task
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from ..cl.distill import interpolate_
from ..config import MethodConfig
from . import register
from .base import Method


class WiSEFTConfig(MethodConfig):
    alpha: float = Field(0.8, ge=0, le=1, description="weight of the fine-tuned weights")
    reference: Literal["start", "zeroshot"] = "start"
    label_smoothing: float = Field(0.2, ge=0, lt=1, description="of the cross-entropy (ZSCL's --ls)")


def snapshot(module) -> dict:
    return {n: p.detach().clone() for n, p in module.named_parameters()}


@register
class WiSEFT(Method):
    """WiSE-FT, continual: fine-tune each task, then interpolate with the task's starting (or zero-shot) weights."""

    name = "wise-ft"
    Config = WiSEFTConfig

    def setup(self):
        self.zeroshot = snapshot(self.model.backbone) if self.cfg.reference == "zeroshot" else None

    def begin_task(self, task):
        self.add_task_classes(task)
        self.model.set_trainable("full+head")
        self.start = self.zeroshot or snapshot(self.model.backbone)  # the model before the task (also on resume)

    def loss(self, net, batch, task):
        ids = self.run.classes.train(task)
        return self.cross_entropy(net(batch.x, ids), batch.y, ids, label_smoothing=self.cfg.label_smoothing)

    def end_task(self, task):
        interpolate_(self.model.backbone, self.start, self.cfg.alpha)
        self.start = None
