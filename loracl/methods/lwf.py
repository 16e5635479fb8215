"""LwF on CLIP as ZSCL's code runs it (Li & Hoiem, TPAMI 2017; Thunderbeee/ZSCL `mtil/scripts/lwf.sh`, the
`ZSCL` method with `--image_loss --text_loss`, reference set = the current dataset, reference model = the
previous task's; BASELINES.md 5).

    every task t: both encoders fine-tuned (CLIP's temperature fixed), reference model = a frozen copy of the
                  model at the task's start (task 0: zero-shot CLIP)
    every step:   CE with label smoothing 0.2 over the task's class prompts
                  + image-side and text-side distillation (T = 2; cl/distill.py) of the batch's images scored
                    against the reference model's embeddings of the task's class prompts

The official code draws the reference images as a second batch of the current dataset, shuffled on its own,
with test transforms; loracl distils on the step's own batch (MTIL trains without augmentation, so both are draws
of the same images), one forward of the trained model instead of two. Under torchrun the text-side term runs
over each process's share of the batch.
"""

from __future__ import annotations

import torch

from ..cl.distill import clip_distillation, frozen_copy
from ..models.heads import prompt_embeddings
from . import register
from .base import Capabilities, DistillOptions, Method


@register
class LwF(Method):
    """LwF (ZSCL's recipe): full fine-tuning of CLIP, distilled towards the model at the task's start."""

    name = "lwf"
    Config = DistillOptions
    caps = Capabilities(backbones=("open_clip",), text_head=True)

    def begin_task(self, task):
        self.add_task_classes(task)
        self.model.set_trainable("full+head")
        self.reference = frozen_copy(self.model.backbone)  # the model as it starts the task (also on resume)
        with torch.no_grad():
            self.texts = prompt_embeddings(self.reference, [self.model.head.prompts[i] for i in task.class_ids])

    def loss(self, net, batch, task):
        ids = self.run.classes.train(task)
        logits, feats = net(batch.x, ids, return_features=True)
        loss = self.cross_entropy(logits, batch.y, ids, label_smoothing=self.cfg.label_smoothing)
        with torch.no_grad():
            ref_feats = self.reference.features(batch.x)
        scale = self.model.backbone.logit_scale.exp()
        return loss + clip_distillation(feats, ref_feats, self.texts.to(feats.device), scale, self.cfg.temperature,
                                        self.cfg.image_loss, self.cfg.text_loss)

    def end_task(self, task):
        self.reference = self.texts = None
