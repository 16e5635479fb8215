"""ZSCL: zero-shot continual learning of CLIP by distillation on a reference set (Zheng et al., ICCV 2023; official
code Thunderbeee/ZSCL, `mtil/src/models/finetune.py`, `mtil/scripts/ZSCL.sh`; BASELINES.md 5).

    setup:        the reference model: a frozen zero-shot CLIP; the reference sentences through its text
                  encoder, once (the official code re-encodes them every step, without gradient: the same values)
    every task:   both encoders fine-tuned (CLIP's temperature fixed); theta_0 = the weights at the task's start
    every step:   CE with label smoothing 0.2 over the task's class prompts
                  + image-side and text-side distillation (T = 2; cl/distill.py) of a batch of reference images
                    scored against the reference sentences, by the reference model and by the model trained
                  + l2 * sum (theta - theta_0)^2
                  weight ensemble: after steps 0, 100, 200, ... the running mean of theta_0 and those weights;
                  the task ends with the mean as the model
    reference:    images `method.reference` (ImageNet's training images at paper scale; Tiny-ImageNet here),
                  sentences `method.ref_sentences` (Conceptual Captions; sentences from Tiny-ImageNet's WordNet
                  entries here), both data given by path

The task batch and the reference batch go through the trained model in one forward (under torchrun, one DDP
forward per step). A run without its reference set stops before training, naming the key.
"""

from __future__ import annotations

import torch
from pydantic import Field

from .. import dist
from ..cl.distill import clip_distillation, frozen_copy
from ..cl.memory import EpisodicMemory
from ..config import DatasetSpec, MethodConfig
from ..data.registry import load_dataset
from ..data.tiny_imagenet import reference_sentences
from ..errors import ConfigError
from ..models.heads import prompt_embeddings
from . import register
from .base import Capabilities, Method
from .wise_ft import snapshot


class ZSCLConfig(MethodConfig):
    reference: DatasetSpec | None = Field(None, description="reference images (their training split)")
    ref_sentences: str | None = Field(None, description="reference sentences: a text file, one per line, a CSV/TSV "
                                                        "with a caption column, or a WordNet table")
    ref_batch: int | None = Field(None, ge=1, description="reference images per step (None: the batch size)")
    temperature: float = Field(2.0, gt=0)
    image_loss: bool = True
    text_loss: bool = True
    l2: float = Field(1.0, ge=0, description="weight of the squared distance to the task's starting weights")
    we_every: int = Field(100, ge=0, description="weight ensemble every this many steps (0: off)")
    label_smoothing: float = Field(0.2, ge=0, lt=1)


@register
class ZSCL(Method):
    """ZSCL: full fine-tuning of CLIP distilled towards zero-shot CLIP on reference images and sentences."""

    name = "zscl"
    Config = ZSCLConfig
    caps = Capabilities(backbones=("open_clip",), text_head=True, all_params_every_step=True)  # all of CLIP trains

    def check(self):
        for key in ("reference", "ref_sentences"):
            if getattr(self.cfg, key) is None:
                raise ConfigError(f"method 'zscl' needs its reference set: set method.{key} (see docs/mtil.md; "
                                  "the presets mini-mtil, mini-mtil-clip and _mtil set it)")

    def setup(self):
        self.refs = EpisodicMemory.over(load_dataset(self.cfg.reference).train)
        self.reference = frozen_copy(self.model.backbone)  # zero-shot CLIP, before anything trains
        sentences = reference_sentences(self.cfg.ref_sentences)
        with torch.no_grad():
            self.texts = torch.cat([prompt_embeddings(self.reference, [[s] for s in sentences[k:k + 256]])
                                    for k in range(0, len(sentences), 256)])
        self.run.log(f"zscl: {len(self.refs.pool)} reference images, {len(sentences)} reference sentences")

    def begin_task(self, task):
        self.add_task_classes(task)
        self.model.set_trainable("full+head")
        self.start = snapshot(self.model.backbone)  # the task's starting weights (also on resume)
        self.mean, self.merged, self.steps = snapshot(self.model.backbone), 0, 0

    def _ensemble(self) -> None:
        """Fold the current weights (those after step `steps - 1`) into the running mean, every `we_every`."""
        if self.cfg.we_every and self.steps and (self.steps - 1) % self.cfg.we_every == 0:
            self.merged += 1
            with torch.no_grad():
                for n, p in self.model.backbone.named_parameters():
                    self.mean[n].mul_(self.merged / (self.merged + 1)).add_(p.detach(), alpha=1 / (self.merged + 1))

    def loss(self, net, batch, task):
        self._ensemble()
        self.steps += 1
        m = self.cfg.ref_batch or self.run.batch_size
        ref = self.run.memory_batch(self.refs, torch.randint(len(self.refs.pool), (m,)).numpy(), keep=dist.share(m))
        ids, n = self.run.classes.train(task), len(batch.y)
        logits, feats = net(torch.cat([batch.x, ref.x]), ids, return_features=True)
        loss = self.cross_entropy(logits[:n], batch.y, ids, label_smoothing=self.cfg.label_smoothing)
        with torch.no_grad():
            ref_feats = self.reference.features(ref.x)
        scale = self.model.backbone.logit_scale.exp()
        loss = loss + clip_distillation(feats[n:], ref_feats, self.texts.to(feats.device), scale,
                                        self.cfg.temperature, self.cfg.image_loss, self.cfg.text_loss)
        if self.cfg.l2:
            loss = loss + self.cfg.l2 * sum(((p - self.start[name]) ** 2).sum()
                                            for name, p in self.model.backbone.named_parameters() if p.requires_grad)
        return loss

    def end_task(self, task):
        self._ensemble()
        if self.cfg.we_every and self.merged:
            with torch.no_grad():
                for n, p in self.model.backbone.named_parameters():
                    p.copy_(self.mean[n])
        self.start = self.mean = None

    def state_dict(self):  # mid-task: the running mean and its count (the task's start is re-made on resume)
        if getattr(self, "mean", None) is None:
            return {}
        return {"mean": self.mean, "merged": self.merged, "steps": self.steps}

    def load_state_dict(self, state):
        if state:
            self.mean, self.merged, self.steps = state["mean"], state["merged"], state["steps"]
