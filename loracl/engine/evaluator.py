"""The evaluator: accuracy rows of the accuracy matrix, the zero-shot row, pretrained retention and NCM scoring.

It scores with the logits function it is handed (a method's `logits(x, class_ids)`); it never hands a method the
labels of the images, and hands it the task of the images only for methods that declare they use it.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from .. import dist
from ..cl.statistics import class_feature_statistics, ncm_logits
from ..config import RunConfig
from ..data.datasets import ImageSet
from ..errors import LoraclError
from ..models.model import ContinualModel
from .data import DataService
from .trainer import Precision


class Evaluator:
    def __init__(self, cfg: RunConfig, model: ContinualModel, data: DataService, precision: Precision, *,
                 task_identity: bool = False):
        self.cfg, self.model, self.data, self.precision = cfg, model, data, precision
        self.scenario = data.scenario
        self.task_identity = task_identity  # the method's logits take the images' task (task-incremental methods)
        self._retention = None

    @torch.no_grad()
    def top1(self, images: ImageSet, predict, k: int = 1) -> list[float]:
        """Top-1 (%) of each of the k predictions predict(x) returns (tuples of predicted global ids) over
        `images`, counts summed over processes."""
        device = self.data.device
        correct = torch.zeros(k, dtype=torch.long, device=device)
        total = torch.zeros((), dtype=torch.long, device=device)
        self.model.eval()
        with self.precision.context():
            for x, y in self.data.eval_batches(images):
                correct += torch.stack([(p == y).sum() for p in predict(x)])
                total += len(y)
        dist.all_reduce_sum_(correct)
        dist.all_reduce_sum_(total)
        return [round(100.0 * float(c) / max(int(total), 1), 4) for c in correct]

    def accuracy(self, images: ImageSet, class_ids: list[int], logits, own: list[int] | None = None):
        """Top-1 (%) of `logits(x, ids)` over `class_ids`; with `own` (a task's classes, a subset of class_ids)
        also the task-aware top-1 from the same logits restricted to those classes: (acc, task-aware acc)."""
        classes = self.data.classes
        ids = classes.tensor(class_ids)
        images = self.data.eval_subset(images)
        if own is None:
            return self.top1(images, lambda x: (ids[logits(x, ids).argmax(-1)],))[0]
        own_ids = classes.tensor(own)
        cols = classes.columns(own_ids, ids)

        def predict(x):
            out = logits(x, ids)
            return ids[out.argmax(-1)], own_ids[out[:, cols].argmax(-1)]

        return tuple(self.top1(images, predict, k=2))

    def scorer(self, logits, i: int):
        """The logits function for task i's test images: with the task only for a method that uses it."""
        return (lambda x, ids: logits(x, ids, task=i)) if self.task_identity else logits

    def evaluate_row(self, j: int, logits, split: str = "test") -> tuple[list, list | None]:
        """Accuracies on every task after training task j; in a class-incremental scenario also the
        task-aware ones (the task's own classes only: what is left when the task identity is given). `split`
        "val": on the validation images carved from the training ones (`data.val_fraction`)."""
        row, aware = [], []
        for i, task in enumerate(self.scenario.tasks):
            ids = self.scenario.eval_classes(i, j)
            images = task.test if split == "test" else task.val
            if ids is None or not self.model.head.knows(ids):
                row.append(None)
                aware.append(None)
            elif self.scenario.kind == "class-incremental" and set(ids) != set(task.class_ids):
                acc, own = self.accuracy(images, ids, self.scorer(logits, i), own=task.class_ids)
                row.append(acc)
                aware.append(own)
            else:
                row.append(self.accuracy(images, ids, self.scorer(logits, i)))
                aware.append(row[-1])
        return row, (aware if self.scenario.kind == "class-incremental" else None)

    def evaluate_before(self, logits) -> list[float | None] | None:
        """Accuracy of the untrained model on each task where its head can already score it (CLIP zero-shot)."""
        row = []
        for i, task in enumerate(self.scenario.tasks):
            ids = task.class_ids
            if self.model.head.knows(ids):
                row.append(self.accuracy(task.test, ids, self.scorer(logits, i)))
            else:
                row.append(None)
        return row if any(v is not None for v in row) else None

    def ncm_accuracy(self, services, j: int) -> float:
        """`eval.ncm`: top-1 (%) of a nearest-class-mean classifier on the current backbone over the classes
        seen after task j, its class means from their training images."""
        tasks = self.scenario.tasks[: j + 1]
        ids = self.scenario.seen_classes(j)
        return ncm_accuracy(services, self.model, [t.train for t in tasks],
                            [self.data.eval_subset(t.test) for t in tasks], ids)

    def eval_sizes(self, split: str = "test") -> list[int]:
        return [len(self.data.eval_subset(t.test if split == "test" else t.val)) for t in self.scenario.tasks]

    def retention_accuracy(self) -> float | None:
        """Top-1 of the pretrained head on the backbone's pretraining domain, through the current backbone."""
        e = self.cfg.eval
        if e.retention is None or self.model.backbone.pretrained_head is None:
            return None
        if self._retention is None:
            self._retention = retention_set(e.retention, e.retention_classes, e.retention_per_class)
        head = self.model.backbone.pretrained_head
        return self.top1(self._retention, lambda x: (head(self.model.features(x)).argmax(-1),))[0]


def retention_set(root: str, classes_tsv: str | None, per_class: int | None = None) -> ImageSet:
    """An image folder whose sub-folders are the pretrained head's classes (mapped by a tsv, else sorted)."""
    from ..data.datasets import FileSource, scan_folder

    names, paths, targets = scan_folder(Path(root))
    if classes_tsv:
        index = {}
        for line in Path(classes_tsv).read_text().splitlines():
            parts = line.split("\t")
            if len(parts) >= 2:
                index[parts[1]] = int(parts[0])
        try:
            remap = [index[n] for n in names]
        except KeyError as e:
            raise LoraclError(f"retention folder {root}: class {e} is not in {classes_tsv}") from None
        targets = [remap[t] for t in targets]
    images = ImageSet.from_source(FileSource(paths, "retention"), targets)
    if per_class:
        rng = np.random.default_rng(0)
        rows = [r for c in np.unique(images.targets)
                for r in rng.permutation(np.nonzero(images.targets == c)[0])[:per_class]]
        images = images.subset(np.sort(np.asarray(rows)))
    return images


@torch.no_grad()
def ncm_accuracy(run, model, train_sets, test_sets, class_ids) -> float:
    """Top-1 (%) over every image of `test_sets` of the nearest-class-mean classifier over `class_ids`, its
    prototypes the means of the model's current features over `train_sets` (test transforms)."""
    s = class_feature_statistics(run, model, list(train_sets), class_ids, "ncm-means", covariance=False)
    ids, protos = s.ids, s.means.float()
    correct = torch.zeros((), dtype=torch.long, device=model.device)
    total = torch.zeros((), dtype=torch.long, device=model.device)

    def fn(b):
        nonlocal correct, total
        pred = ids[ncm_logits(model.features(b.x), protos).argmax(-1)]
        correct += (pred == b.y).sum()
        total += len(b.y)

    was_training = model.training
    model.eval()
    for images in test_sets:
        run.forward_pass(images, fn, desc="ncm-eval", view="test")
    model.train(was_training)
    dist.all_reduce_sum_(correct)
    dist.all_reduce_sum_(total)
    return round(100.0 * float(correct) / max(int(total), 1), 4)
