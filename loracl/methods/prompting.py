"""What L2P, DualPrompt and CODA-Prompt share (the protocol of CODA-Prompt's code, re-used by InfLoRA's):

- a frozen backbone; the method's prompt module is owned by the model as 'prompts' (created at full size in
  `setup`, so a resumed run finds it before the state dict loads) and computes the features;
- one linear head chunk per task trained with cross-entropy over the task's classes (train.loss_scope);
- the loss is that cross-entropy plus the module's auxiliary loss of the same forward (key matching);
- each task trains its head chunk and the prompt parameters the module marks as the task's.
"""

from __future__ import annotations

import torch

from ..models.prompts import PromptModule
from .base import Method


class PromptMethod(Method):
    uses_all_trained_params = True

    def make_prompts(self) -> PromptModule:
        raise NotImplementedError

    @property
    def prompts(self) -> PromptModule:
        return self.model.prompts

    def setup(self):
        self.model.own("prompts", self.make_prompts())

    def begin_task(self, task):
        self.add_task_classes(task)
        self.prompts.begin(task.index)
        self.set_trainable(task)

    def param_groups(self, task):
        self.set_trainable(task)
        return {"prompts": self.prompts.trainable(), "head": self.task_head_parameters(task)}

    def loss(self, batch, task):
        classes = self.run.train_classes(task)
        loss = self.logits_loss(self.net(batch.x, classes), batch.y, classes)
        aux = self.prompts.aux_loss  # computed in the forward above
        return loss if aux is None else loss + aux

    def end_task(self, task):
        self.prompts.end()

    def set_trainable(self, task):
        self.model.set_trainable("none")
        for p in self.prompts.trainable() + self.task_head_parameters(task):
            p.requires_grad_(True)

    def task_head_parameters(self, task) -> list[torch.nn.Parameter]:
        head = self.model.head
        if hasattr(head, "chunk_of"):  # LinearHead: the task's own chunk, as the official classifier
            return list(head.chunk_of(task.class_ids).parameters())
        return list(head.parameters())  # CLIP's text head: nothing to train
