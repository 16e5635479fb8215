"""Reference points without LoRA, for MTIL (ZSCL's and KeepLoRA's tables).

- `zeroshot`: the pretrained CLIP as it is, evaluated after every task: its rows are all the same.
- `seq-ft`: continual full fine-tuning of every encoder weight (both CLIP encoders), task after task; CLIP's
  temperature stays the pretrained constant (it is not a weight of either encoder).
"""

from __future__ import annotations

from . import register
from .base import Capabilities, Method


@register
class ZeroShot(Method):
    """Zero-shot CLIP: no training (the pretrained model on every task)."""

    name = "zeroshot"
    caps = Capabilities(text_head=True)

    def begin_task(self, task):
        self.add_task_classes(task)
        self.model.set_trainable("none")


@register
class SeqFT(Method):
    """Continual full fine-tuning: every backbone weight (both CLIP encoders) trained on each task in turn."""

    name = "seq-ft"

    def begin_task(self, task):
        self.add_task_classes(task)
        self.model.set_trainable("full+head")
