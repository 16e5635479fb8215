"""NCM: nearest class mean on the frozen pretrained backbone (SimpleCIL, Zhou et al. IJCV 2024).

No training at all: after each task the prototype of each of its classes is the mean of the backbone's features
of its training images (test transforms), and a test image goes to the class whose prototype has the highest
cosine similarity with its features. Class sums and counts are kept rather than means, so a class seen again
in a later task (domain-incremental) gets the mean over all its images so far. The class statistics are the
ones classifier alignment stores (loracl/cl/alignment.py).

The evaluator scores any model's current backbone the same way (`eval.ncm: true` -> `final_acc_ncm`): what
the features alone know, without the heads.
"""

from __future__ import annotations

import torch

from ..cl.statistics import class_feature_statistics, prototype_logits
from . import register
from .base import Capabilities, Method


@register
class NCM(Method):
    """Nearest class mean on the frozen pretrained backbone (SimpleCIL): cosine to class-mean prototypes, no training."""

    name = "ncm"
    caps = Capabilities(export=False)  # its classifier is the prototypes, not a head of the model

    def setup(self):
        d = self.model.backbone.feature_dim
        self.ids = torch.zeros(0, dtype=torch.long)
        self.sums = torch.zeros(0, d, dtype=torch.float64)
        self.counts = torch.zeros(0, dtype=torch.float64)
        self._device_protos = None

    def begin_task(self, task):
        self.add_task_classes(task)  # the head's table of known classes decides which tasks are evaluated
        self.model.set_trainable("none")

    def end_task(self, task):
        s = class_feature_statistics(self.run, self.model, task.train, task.class_ids, "ncm-means", covariance=False)
        sums, counts = (s.means * s.count.unsqueeze(1)).cpu(), s.count.cpu()
        rows = {c: i for i, c in enumerate(self.ids.tolist())}
        for k, c in enumerate(task.class_ids):
            if c in rows:
                self.sums[rows[c]] += sums[k]
                self.counts[rows[c]] += counts[k]
            else:
                rows[c] = len(self.ids)
                self.ids = torch.cat([self.ids, torch.tensor([c])])
                self.sums = torch.cat([self.sums, sums[k:k + 1]])
                self.counts = torch.cat([self.counts, counts[k:k + 1]])
        self._device_protos = None

    def prototypes(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self._device_protos is None:
            dev = self.model.device
            means = self.sums / self.counts.clamp(min=1).unsqueeze(1)
            self._device_protos = (self.ids.to(dev), means.float().to(dev))
        return self._device_protos

    def logits(self, x, class_ids):
        """Cosine to the prototypes. Classes without one yet score -inf; when none of `class_ids` has one (CLIP's
        text head knows every dataset's classes before its task), the model's own head scores them: the
        zero-shot row, which MTIL's Transfer measures."""
        ids, protos = self.prototypes()
        out = prototype_logits(lambda: self.model.features(x), class_ids, ids, protos, self.run.classes.columns)
        return super().logits(x, class_ids) if out is None else out

    def state_dict(self):
        return {"ids": self.ids, "sums": self.sums, "counts": self.counts}

    def load_state_dict(self, state):
        self.ids, self.sums, self.counts = state["ids"].long(), state["sums"].double(), state["counts"].double()
        self._device_protos = None
