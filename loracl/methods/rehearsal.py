"""What experience replay and A-GEM share: an episodic memory, one growing head over all seen classes, and
training by full fine-tuning (as the task-arithmetic paper runs these baselines) or by a LoRA branch per task
merged at the task's end (the LoRA counterpart, comparable with LoRA methods).
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import torch
from pydantic import Field

from ..memory import EpisodicMemory
from .base import Batch, LoRAOptions, Method


class RehearsalOptions(LoRAOptions):
    finetune: Literal["full", "lora"] = Field("full", description="full: every backbone weight; lora: a branch per task")
    rank: int = Field(16, ge=1)
    alpha: float | None = 16.0


class RehearsalMethod(Method):
    Config = RehearsalOptions
    uses_all_trained_params = True

    def setup(self):
        if self.cfg.finetune == "lora":
            c = self.cfg
            self.model.inject_lora(c.targets, c.blocks, c.encoders)
        self.memory = EpisodicMemory(self.run.scenario.tasks)

    def begin_task(self, task):
        self.add_task_classes(task)
        # replayed samples belong to earlier tasks, so the loss is over every class seen (train.loss_scope
        # does not apply): the single growing head of these baselines
        self.seen = self.run.class_tensor(self.run.scenario.seen_classes(task.index))
        if self.cfg.finetune == "lora":
            c = self.cfg
            for s in self.model.adapter.sites:
                s.add_fresh_branch(c.rank, c.scale)
            self.model.set_trainable("lora+head")
        else:
            self.model.set_trainable("full+head")

    def end_task(self, task):
        if self.cfg.finetune == "lora":
            self.model.adapter.merge_all()

    def memory_batch(self, rows: np.ndarray, keep: slice = slice(None)) -> Batch:
        """The memory rows (`rows[keep]`) as a training batch, with training transforms. With the tensor
        pipeline they come from the decoded copies on the device and are augmented there, as positions of the
        batch `rows` with one seed drawn alike in every process; otherwise PIL, one seed per sample."""
        mine = range(len(rows))[keep]
        if not len(mine):  # fewer memory rows than processes: this one holds none
            s = self.model.backbone.data_config()["size"]
            empty = torch.zeros(0, 3, s, s, dtype=torch.uint8)
            return Batch(self.run.prepare(empty, True), torch.zeros(0, dtype=torch.long, device=self.run.device),
                         torch.as_tensor(rows[keep]))
        u8 = self.memory.gather(rows[keep], self.run.decoded_rows)
        if u8 is not None:
            gen = torch.Generator().manual_seed(int(torch.randint(2 ** 62, (1,))))
            x = self.run.augment(u8, True, gen, mine.start, len(rows))
            y = torch.as_tensor(self.memory.pool.targets[rows[keep]], dtype=torch.long, device=self.run.device)
            return Batch(x, y, torch.as_tensor(rows[keep]))
        x, y = self.memory.load(rows, self.run.train_transform, keep=keep)
        return Batch(self.run.prepare(x, True), y.to(self.run.device), torch.as_tensor(rows[keep]))

    def seen_loss(self, batch: Batch) -> torch.Tensor:
        return self.cross_entropy(batch, self.seen)

    def state_dict(self):
        return {"memory": self.memory.state_dict()}

    def load_state_dict(self, state):
        self.memory.load_state_dict(state["memory"])
