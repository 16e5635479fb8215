"""Reference points every continual-learning table needs.

- `seq-lora`: one LoRA trained on each task in turn and merged into the weights after it: the lower bound.
- `joint`: one LoRA trained on the union of all tasks at once (not continual): the upper bound;
  `joint-full` the same with full fine-tuning of the backbone.
- `linear-probe`: the frozen pretrained backbone with an incremental head.
"""

from __future__ import annotations

from . import register
from .base import LoRAOptions, Method


class LoRAMethod(Method):
    """Shared by LoRA baselines: inject once, a fresh zero-output branch per task, merge at task end."""

    needs_lora = True
    Config = LoRAOptions

    def setup(self):
        c = self.cfg
        self.model.inject_lora(c.targets, c.blocks, c.encoders)

    def new_branches(self):
        for s in self.model.adapter.sites:
            s.add_fresh_branch(self.cfg.rank, self.cfg.scale)

    def begin_task(self, task):
        self.add_task_classes(task)
        self.new_branches()
        self.model.set_trainable("lora+head")

    def end_task(self, task):
        self.model.adapter.merge_all()


@register
class SeqLoRA(LoRAMethod):
    """Sequential LoRA fine-tuning: each task's branch merged before the next (lower bound)."""

    name = "seq-lora"
    uses_all_trained_params = True


@register
class JointLoRA(LoRAMethod):
    """LoRA trained on all tasks at once (offline upper bound)."""

    name = "joint"
    joint = True


@register
class LinearProbe(Method):
    """Frozen pretrained backbone, incremental linear head."""

    name = "linear-probe"

    def begin_task(self, task):
        self.add_task_classes(task)
        self.model.set_trainable("head")


@register
class JointFull(Method):
    """Every backbone weight and the head trained on all tasks at once (offline upper bound, full fine-tuning)."""

    name = "joint-full"
    joint = True

    def begin_task(self, task):
        self.add_task_classes(task)
        self.model.set_trainable("full+head")
