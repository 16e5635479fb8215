"""Reference points every continual-learning table needs.

- `seq-lora`: one LoRA trained on each task in turn and merged into the weights after it: the lower bound.
- `joint`: one LoRA trained on the union of all tasks at once (not continual): the upper bound;
  `joint-full` the same with full fine-tuning of the backbone.
- `linear-probe`: the frozen pretrained backbone with an incremental head.
"""

from __future__ import annotations

from ..models.lora import task_tag
from . import register
from .base import Capabilities, LoRAOptions, Method


class LoRAMethod(Method):
    """Shared by LoRA baselines: inject once, a fresh zero-output branch per task, merge at task end."""

    caps = Capabilities(lora=True)
    Config = LoRAOptions

    def setup(self):
        self.model.inject_lora(self.cfg)

    def begin_task(self, task):
        self.add_task_classes(task)
        self.model.adapter.add_fresh(self.cfg.rank, self.cfg.scale, task_tag(task.index))
        self.model.set_trainable("lora+head")

    def end_task(self, task):
        self.model.adapter.merge_all()


@register
class SeqLoRA(LoRAMethod):
    """Sequential LoRA fine-tuning: each task's branch merged before the next (lower bound)."""

    name = "seq-lora"
    caps = Capabilities(lora=True, all_params_every_step=True)


@register
class JointLoRA(LoRAMethod):
    """LoRA trained on all tasks at once (offline upper bound)."""

    name = "joint"
    caps = Capabilities(lora=True, joint=True)


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
    caps = Capabilities(joint=True)

    def begin_task(self, task):
        self.add_task_classes(task)
        self.model.set_trainable("full+head")
