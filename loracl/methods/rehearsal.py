"""What experience replay and A-GEM share: an episodic memory, one growing head over all seen classes, and
training by full fine-tuning (as the task-arithmetic paper runs these baselines) or by a LoRA branch per task
merged at the task's end (the LoRA counterpart, comparable with LoRA methods).
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field

from ..cl.memory import EpisodicMemory
from ..engine import Batch
from ..models.lora import task_tag
from .base import Capabilities, LoRAOptions, Method


class RehearsalOptions(LoRAOptions):
    finetune: Literal["full", "lora"] = Field("full", description="full: every backbone weight; lora: a branch per task")
    rank: int = Field(16, ge=1)
    alpha: float | None = 16.0


class RehearsalMethod(Method):
    Config = RehearsalOptions
    caps = Capabilities(all_params_every_step=True)

    def setup(self):
        if self.cfg.finetune == "lora":
            self.model.inject_lora(self.cfg)
        self.memory = EpisodicMemory(self.run.scenario.tasks)

    def begin_task(self, task):
        self.add_task_classes(task)
        # replayed samples belong to earlier tasks, so the loss is over every class seen (train.loss_scope
        # does not apply): the single growing head of these baselines
        self.seen = self.run.classes.tensor(self.run.scenario.seen_classes(task.index))
        if self.cfg.finetune == "lora":
            self.model.adapter.add_fresh(self.cfg.rank, self.cfg.scale, task_tag(task.index))
            self.model.set_trainable("lora+head")
        else:
            self.model.set_trainable("full+head")

    def end_task(self, task):
        if self.cfg.finetune == "lora":
            self.model.adapter.merge_all()

    def seen_loss(self, net, batch: Batch) -> torch.Tensor:
        return self.cross_entropy(net(batch.x, self.seen), batch.y, self.seen)

    def state_dict(self):
        return {"memory": self.memory.state_dict()}

    def load_state_dict(self, state):
        self.memory.load_state_dict(state["memory"])
