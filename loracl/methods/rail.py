"""RAIL, primal form: a ridge-regression adapter on frozen CLIP image features, fused with zero-shot CLIP (Xu et al.,
NeurIPS 2024, "Advancing Cross-domain Discriminability in Continual Learning of Vision-Language Models"; official
code linghan1997/Regression-based-Analytic-Incremental-Learning, `primal_RAIL.py`; BASELINES.md 5).

    after every task (no backpropagation):
        f = unit-norm CLIP image features of the task's training images
        h = ReLU(W_rand^T f)                      W_rand: 512 x 15,000, U(-1/sqrt(d), 1/sqrt(d)) (nn.Linear's init)
        W = (G + 0.1 I)^-1 C                      G, C over every image so far (the official recursion, one
                                                  batch at a time, computes exactly this: cl/ridge.py)
    test, on an image x:
        p = softmax of zero-shot CLIP over the classes of every dataset, seen or not
        if p's top class belongs to a dataset already learned:   p <- 0.1 p + 0.9 [h(x)^T W, 0 for unseen classes]
        the prediction is the best of p over the classes asked for

An image whose zero-shot prediction falls outside the learned datasets keeps zero-shot CLIP's scores, and so
does every class of a dataset not learned yet: Transfer is zero-shot CLIP's by construction. The official code
evaluates over the union of all datasets' classes (its X-TAIL setting); loracl's MTIL evaluation asks for the
dataset's own classes, of which the prediction takes the best after the same fusion.
"""

from __future__ import annotations

import torch
from pydantic import Field

from ..config import MethodConfig
from . import register
from .base import Capabilities
from .ranpac import RidgeHeadMethod


class RAILConfig(MethodConfig):
    M: int = Field(15000, ge=1, description="random features (the official hidden_dim)")
    lam: float = Field(0.1, gt=0, description="ridge regularisation (the official `regularization`)")
    fusion_weight: float = Field(0.9, ge=0, le=1, description="weight of the adapter's scores in the fusion")


@register
class RAIL(RidgeHeadMethod):
    """RAIL (primal): frozen CLIP, a ridge adapter on random ReLU features, zero-shot CLIP for unlearned domains."""

    name = "rail"
    Config = RAILConfig
    caps = Capabilities(backbones=("open_clip",), export=False, text_head=True)  # classifier: the adapter, fused at test
    init = "uniform"
    normalize = True

    def begin_task(self, task):
        self.add_task_classes(task)
        self.model.set_trainable("none")

    def choose_lambda(self, f, y, task):
        return self.cfg.lam

    def logits(self, x, class_ids):
        feats = self.model.features(x)
        every = torch.tensor(sorted(self.model.head.prompts), device=class_ids.device)  # every dataset's classes
        p = torch.softmax(self.model.head(feats, every).float(), dim=-1)
        ids, adapter = self.scores(feats)
        if len(ids):
            learned = torch.isin(every[p.argmax(-1)], ids)
            padded = torch.zeros_like(p)
            padded[:, self.run.classes.columns(ids, every)] = adapter.float()
            w = self.cfg.fusion_weight
            p = torch.where(learned.unsqueeze(1), (1 - w) * p + w * padded, p)
        return p[:, self.run.classes.columns(class_ids, every)]
