"""iCaRL on CLIP as ZSCL's code runs it for MTIL (Rebuffi et al., CVPR 2017; Thunderbeee/ZSCL
`mtil/src/models/icarl.py`, `mtil/src/dynamic_dataset.py`, `mtil/scripts/icarl.sh`; BASELINES.md 5).

    every task t: both encoders fine-tuned (CLIP's temperature fixed); reference model = a frozen copy of the
                  model at the task's start (`reference: previous`, iCaRL's distillation target) or zero-shot
                  CLIP (`reference: zeroshot`, what ZSCL's icarl.py falls back to without --ref-model)
    every step:   CE with label smoothing 0.2 over the task's class prompts on the batch
                  + image-side and text-side distillation (T = 2; cl/distill.py) on a batch of exemplars of the
                    earlier tasks, scored by both models against the reference model's embeddings of the
                    *current* task's class prompts (exemplars carry no label: no CE on them)
    end of task:  herding (cl/herding.py) on the task's training images, features of the model just trained;
                  the memory of `memory_size` images is shared equally among the tasks seen, each keeping the
                  prefix of its herding order

Differences from the official code, on purpose (docs: /work/notes/icarl.md): it takes the first task's first
`memory_size` images in dataset order and herds only later tasks (here: herding for every task); it gives a new
task K - K // t exemplars while the old ones keep K // t each (more than K in all from the third task on; here
K // t each, total K); it walks the memory in order, one slice a step (here: a uniform draw a step, as ER);
it stores preprocessed float images (here: row indices into the training pool, as every loracl memory).
`icarl.sh` as shipped passes neither --image_loss nor --text_loss (so no distillation: seq-ft) and 5 iterations,
a debugging leftover; the distillation flags follow ZSCL's lwf.sh / ZSCL.sh, as its table's iCaRL row needs.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import torch
from pydantic import Field

from .. import dist
from ..cl.distill import clip_distillation, frozen_copy
from ..cl.herding import herding_order, keep_herded
from ..cl.memory import EpisodicMemory
from ..models.heads import prompt_embeddings
from . import register
from .base import Capabilities, DistillOptions, Method


class ICaRLConfig(DistillOptions):
    memory_size: int = Field(10000, ge=0, description="exemplar images kept over all tasks (ZSCL's --memory_size)")
    exemplar_batch: int | None = Field(None, ge=1, description="exemplars per step (None: the batch size)")
    reference: Literal["previous", "zeroshot"] = Field("previous", description="the distillation's teacher")


@register
class ICaRL(Method):
    """iCaRL (ZSCL's recipe): full fine-tuning of CLIP, distilled on herded exemplars of earlier tasks."""

    name = "icarl"
    Config = ICaRLConfig
    caps = Capabilities(backbones=("open_clip",), text_head=True)

    def setup(self):
        self.memory = EpisodicMemory(self.run.scenario.tasks)
        self.zeroshot = frozen_copy(self.model.backbone) if self.cfg.reference == "zeroshot" else None

    def begin_task(self, task):
        self.add_task_classes(task)
        self.model.set_trainable("full+head")
        # the model as it starts the task (also on resume), or zero-shot CLIP
        self.reference = self.zeroshot if self.zeroshot is not None else frozen_copy(self.model.backbone)
        with torch.no_grad():
            self.texts = prompt_embeddings(self.reference, [self.model.head.prompts[i] for i in task.class_ids])

    def loss(self, net, batch, task):
        ids, n = self.run.classes.train(task), len(batch.y)
        m = min(self.cfg.exemplar_batch or self.run.batch_size, len(self.memory))
        if m == 0 or not (self.cfg.image_loss or self.cfg.text_loss):  # the first task: fine-tuning alone
            return self.cross_entropy(net(batch.x, ids), batch.y, ids, label_smoothing=self.cfg.label_smoothing)
        old = self.run.memory_batch(self.memory, self.memory.sample(m), keep=dist.share(m))
        logits, feats = net(torch.cat([batch.x, old.x]), ids, return_features=True)
        loss = self.cross_entropy(logits[:n], batch.y, ids, label_smoothing=self.cfg.label_smoothing)
        with torch.no_grad():
            ref_feats = self.reference.features(old.x)
        scale = self.model.backbone.logit_scale.exp()
        return loss + clip_distillation(feats[n:], ref_feats, self.texts.to(feats.device), scale,
                                        self.cfg.temperature, self.cfg.image_loss, self.cfg.text_loss)

    def end_task(self, task):
        self.reference = self.texts = None
        if self.cfg.memory_size == 0:
            return
        keep_herded(self.memory, task.index, self.memory.pool_rows(task.index, self.herd(task)),
                    self.cfg.memory_size)
        self.record_memory(task)

    def herd(self, task) -> np.ndarray:
        """Training rows of `task` in herding order (as many as the memory holds), on the trained model's
        image features (test view, as the official code's test preprocessing)."""
        rows, feats = [], []

        def fn(b):
            rows.append(np.asarray(b.rows, dtype=np.int64))
            feats.append(self.model.features(b.x).float().cpu())

        was_training = self.model.training
        self.model.eval()
        self.run.forward_pass(task.train, fn, desc="icarl-herding", view="test")
        self.model.train(was_training)
        parts = dist.all_gather_objects((np.concatenate(rows), torch.cat(feats)))
        order = np.concatenate([r for r, _ in parts])
        f = torch.cat([x for _, x in parts])
        with self.run.cost.timed("icarl-herding"):
            return order[herding_order(f, self.cfg.memory_size)]

    def record_memory(self, task) -> None:
        """Exemplars kept after `task`, per task, and their size as uint8 images at the model's input size."""
        x = self.run.memory_batch(self.memory, self.memory.rows[:1]).x
        task_of = np.searchsorted(self.memory.offsets, self.memory.rows, side="right") - 1
        per_task = {str(t): int(c) for t, c in zip(*np.unique(task_of, return_counts=True))}
        n = len(self.memory)
        self.run.record("exemplars", task.index, {"count": n, "per_task": per_task,
                                                   "uint8_bytes": n * int(x[0].numel()), "row_bytes": n * 8})
        self.run.log(f"icarl: {n} exemplars ({per_task}), {n * int(x[0].numel()) / 1e6:.2f} MB as uint8 images")

    def state_dict(self):
        return {"memory": self.memory.state_dict()}

    def load_state_dict(self, state):
        self.memory.load_state_dict(state["memory"])
