"""Experience replay (Chaudhry et al. 2019, "On tiny episodic memories in continual learning").

Every training batch of the current task is extended with samples drawn from a fixed-size episodic memory,
and one step is taken on the union, with cross-entropy over every class seen. With `replay_share` s, a batch
of n new samples gets round(n s / (1 - s)) memory samples, so memory samples are the fraction s of the
mixed batch (s = 0.5: as many as new ones, the usual ER and Avalanche's replay default).

Memory (`memory_size`, 200 by default, as in the task-arithmetic paper): `class-balanced` (updated at the end
of each task: an equal share per seen class) or `reservoir` (updated after every step over the stream).
Training: full fine-tuning, as the paper runs its baselines, or `finetune: lora`.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import torch
from pydantic import Field

from .. import dist
from ..engine import Batch
from . import register
from .rehearsal import RehearsalMethod, RehearsalOptions


class ERConfig(RehearsalOptions):
    memory_size: int = Field(200, ge=0)
    policy: Literal["class-balanced", "reservoir"] = "class-balanced"
    replay_share: float = Field(0.5, ge=0, lt=1, description="fraction of each mixed batch drawn from the memory")


@register
class ExperienceReplay(RehearsalMethod):
    """Experience replay: memory samples mixed into every batch (full fine-tuning or LoRA)."""

    name = "er"
    Config = ERConfig

    def replay_count(self, n_new: int, capped: bool = True) -> int:
        s = self.cfg.replay_share
        m = int(round(n_new * s / (1 - s)))
        return min(m, len(self.memory)) if capped else m

    def mixed_batch(self, batch: Batch) -> tuple[Batch, int]:
        """The batch with its memory samples appended (their `rows` are -1); returns it and their number."""
        # under torchrun: the replay set of the global batch, drawn alike in every process (one RNG stream),
        # of which each process takes its contiguous share, as it does of the new samples
        m = self.replay_count(sum(dist.all_gather_objects(len(batch.y))))
        if m == 0:
            return batch, 0
        mem = self.run.memory_batch(self.memory, self.memory.sample(m), keep=dist.share(m))
        rows = torch.cat([torch.as_tensor(batch.rows), torch.full((len(mem.y),), -1, dtype=torch.long)])
        return Batch(torch.cat([batch.x, mem.x]), torch.cat([batch.y, mem.y]), rows), len(mem.y)

    def loss(self, net, batch, task):
        self._new_rows = np.asarray(batch.rows, dtype=np.int64)
        mixed, _ = self.mixed_batch(batch)
        return self.seen_loss(net, mixed)

    def after_backward(self, task):
        if self.cfg.policy != "reservoir":
            return
        before = len(self.memory)
        new = np.concatenate(dist.all_gather_objects(self._new_rows))
        self.memory.add_reservoir(self.memory.pool_rows(task.index, new), self.cfg.memory_size)
        # while the memory is smaller than a replay batch, the step's size changes: count the next one anew
        want = self.replay_count(self.run.batch_size, capped=False)
        if min(before, want) != min(len(self.memory), want):
            self.run.cost.recount("train")

    def end_task(self, task):
        super().end_task(task)
        if self.cfg.policy == "class-balanced":
            self.memory.add_class_balanced(task, seed=self.run.seed("memory", task.index),
                                           capacity=self.cfg.memory_size)
