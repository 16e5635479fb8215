"""LAE: learning, accumulation and ensemble with LoRA (Gao et al., ICCV 2023; BASELINES.md section 6; gqk/LAE).

One LoRA (rank 5 on the key and value projections of blocks 0-4) learns through every task on a frozen
backbone, with one growing head and cross-entropy over the task's own classes. From the second task on:

    calibration   the task's first `num_freeze_epochs` epochs train the head alone (the adapters frozen), so
                  the new classes' columns first fit the features the adapters already make
    accumulation  an offline copy of the adapters follows the online ones after every optimiser step,
                      theta_off <- d theta_off + (1 - d) theta_on,   d = 0.9999
                  (created from the online adapters when the second task begins; the first task has none)
    ensemble      p(y | x) = max(softmax f_on(x), softmax f_off(x)) element-wise, over the same head

The official code (`main.py`, `libml/model/pet/lora.py`) also learns a scalar multiplier (init 1) on each k and
v update; here the scale is the fixed 1 of `alpha: null`. `logits` returns the log of the ensemble's
probabilities (the same argmax, and `softmax(log p) = p`).
"""

from __future__ import annotations

from functools import reduce

import torch
from pydantic import Field

from ..cl.ema import ema_update_, lent
from . import register
from .base import Capabilities, LoRAOptions, Method

TAG = "lae"  # the one branch on every adapted projection, trained in every task, never merged


class LAEConfig(LoRAOptions):
    rank: int = Field(5, ge=1)
    targets: list[str] = Field(default_factory=lambda: ["k", "v"], description="the key and value projections")
    blocks: list[int] | None = Field(default_factory=lambda: [0, 1, 2, 3, 4], description="the first five blocks")
    ema_decay: float = Field(0.9999, ge=0, le=1, description="decay of the offline adapters' EMA (every step)")
    num_freeze_epochs: int = Field(3, ge=0, description="epochs of head calibration, adapters frozen, from the "
                                                        "second task on (official: 3 of 5 CIFAR-100, 30 of 50 "
                                                        "ImageNet-R)")


def ensemble(*logits: torch.Tensor) -> torch.Tensor:
    """The element-wise maximum of the experts' softmaxes (fp32)."""
    return reduce(torch.maximum, [z.float().softmax(-1) for z in logits])


@register
class LAE(Method):
    """LAE: one LoRA kept learning, head calibration with it frozen, an EMA copy, max-softmax ensemble."""

    name = "lae"
    Config = LAEConfig
    caps = Capabilities(lora=True, export=False)  # the predictor is two adapter sets, not one merged model

    def setup(self):
        self.model.inject_lora(self.cfg).add_fresh(self.cfg.rank, self.cfg.scale, TAG)
        self.offline: list[torch.Tensor] | None = None  # the EMA of the adapters' factors, in `adapters()` order
        self.stepped = False  # an optimiser step was taken since the offline copy last followed

    def adapters(self) -> list[torch.nn.Parameter]:
        """The online adapters' factors, site by site (down, up)."""
        return [p for br in self.model.adapter.branches(TAG) for p in (br.down, br.up)]

    # ---- per task ---------------------------------------------------------------------------------------
    def begin_task(self, task):
        self.add_task_classes(task)
        head = self.model.head  # one growing head; only the task's columns get gradient from its loss
        self.model.set_trainable("lora+head", head=task.class_ids if hasattr(head, "chunk_of") else None)
        if task.index > 0 and self.offline is None:
            self.offline = [p.detach().clone() for p in self.adapters()]

    def calibrating(self, task, epoch: int) -> bool:
        return task.index > 0 and epoch < self.cfg.num_freeze_epochs

    def begin_epoch(self, task, epoch):
        learn = not self.calibrating(task, epoch)
        params = self.adapters()
        if any(p.requires_grad != learn for p in params):
            for p in params:  # frozen as the official code does: no gradient, so the optimiser skips them
                p.requires_grad_(learn)
            self.run.cost.recount("train")  # a step without the adapters' backward costs less

    def loss(self, net, batch, task):
        self.follow()  # the previous step's update, now that it is applied
        self.stepped = self.offline is not None
        return super().loss(net, batch, task)

    def follow(self) -> None:
        """The offline adapters take in the online ones once per optimiser step (after the step)."""
        if self.stepped:
            ema_update_(self.offline, self.adapters(), self.cfg.ema_decay)
            self.stepped = False

    def end_task(self, task):
        self.follow()  # the task's last step
        self.model.apply_trainable()  # undo the calibration freeze of a task shorter than num_freeze_epochs

    # ---- prediction -------------------------------------------------------------------------------------
    def logits(self, x, class_ids):
        online = self.model(x, class_ids)
        if self.offline is None:
            return online
        with lent(self.adapters(), self.offline):
            offline = self.model(x, class_ids)
        return ensemble(online, offline).log()

    def state_dict(self):
        return {"offline": None if self.offline is None else [t.cpu() for t in self.offline],
                "stepped": self.stepped}

    def load_state_dict(self, state):
        off = state["offline"]
        self.offline = None if off is None else [t.to(self.model.device, torch.float32) for t in off]
        self.stepped = bool(state["stepped"])
