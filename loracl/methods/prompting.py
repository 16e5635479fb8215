"""What L2P, DualPrompt and CODA-Prompt share (the protocol of CODA-Prompt's code, re-used by InfLoRA's):

- a frozen backbone; the method's prompt module is owned by the model as 'prompts' (created at full size in
  `setup`, so a resumed run finds it before the state dict loads) and computes the features;
- one linear head chunk per task trained with cross-entropy over the task's classes (train.loss_scope);
- the loss is that cross-entropy plus the module's auxiliary loss of the same forward (key matching);
- each task trains its head chunk and the prompt parameters the module marks as the task's.
"""

from __future__ import annotations

from ..models.prompts import PromptModule
from .base import Capabilities, Method


class PromptMethod(Method):
    # the prompts and the query condition the backbone's forward: no plain timm / open_clip model holds them
    caps = Capabilities(all_params_every_step=True, export=False)

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
        # the task's prompts (the module's `trainable()`) and, with per-task linear heads, the task's own chunk
        # (as the official classifier); CLIP's text head has nothing to train
        self.model.set_trainable("head+owned", head=task.class_ids if hasattr(self.model.head, "chunk_of") else None)

    def loss(self, net, batch, task):
        loss = super().loss(net, batch, task)
        aux = self.prompts.aux_loss  # computed in the forward above
        return loss if aux is None else loss + aux

    def end_task(self, task):
        self.prompts.end()
