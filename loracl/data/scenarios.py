"""Continual-learning scenarios: a benchmark config becomes a sequence of tasks over global class ids.

- class-incremental: one dataset, its classes in a fixed, seeded or given order, cut into tasks; the model
  is evaluated over every class seen so far (no task id).
- domain-incremental: one dataset spec per domain, all with the same classes (same ids); evaluated over them.
- cross-dataset (MTIL): one dataset per task, each with its own classes; a task is evaluated over its own
  classes, so a CLIP text head can score datasets not yet trained (transfer).

Global class id = position of the class in the scenario's class table; targets are remapped to it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ..config import BenchmarkConfig
from ..errors import ConfigError, DataError
from .images import DatasetSplits, ImageSet
from .registry import load_dataset

DEFAULT_TEMPLATE = "a photo of a {c}."


@dataclass
class Task:
    index: int
    name: str
    class_ids: list[int]
    class_names: list[str]
    train: ImageSet
    test: ImageSet
    templates: list[str] = field(default_factory=lambda: [DEFAULT_TEMPLATE])
    dataset: str = ""
    class_keys: list[str] | None = None  # the classes as the data names them, where that differs from the names
    val: ImageSet | None = None  # validation images carved from the training ones (`data.val_fraction`)

    def summary(self) -> dict:
        out = {"name": self.name, "dataset": self.dataset, "class_ids": self.class_ids,
               "class_names": self.class_names, "train_size": len(self.train), "test_size": len(self.test)}
        if self.val is not None:
            out["val_size"] = len(self.val)
        if self.class_keys is not None and self.class_keys != self.class_names:
            out["class_keys"] = self.class_keys
        return out


@dataclass
class Scenario:
    kind: str
    name: str
    tasks: list[Task]
    class_names: list[str]

    def __len__(self) -> int:
        return len(self.tasks)

    def seen_classes(self, j: int) -> list[int]:
        out, seen = [], set()
        for t in self.tasks[: j + 1]:
            for c in t.class_ids:
                if c not in seen:
                    seen.add(c)
                    out.append(c)
        return out

    def eval_classes(self, i: int, j: int) -> list[int] | None:
        """Candidate classes when testing task i after training task j (None: not defined)."""
        if self.kind == "class-incremental":
            return self.seen_classes(j) if i <= j else None
        return list(self.tasks[i].class_ids)

    def train_classes(self, j: int, scope: str) -> list[int]:
        if scope == "seen" and self.kind == "class-incremental":
            return self.seen_classes(j)
        return list(self.tasks[j].class_ids)


def _templates(ds: DatasetSplits, spec_template: str | None) -> list[str]:
    if spec_template:
        return [spec_template]
    if ds.templates:
        return list(ds.templates)
    if ds.template:
        return [ds.template]
    return [DEFAULT_TEMPLATE]


def class_order(n: int, order, seed: int) -> list[int]:
    if order == "fixed":
        return list(range(n))
    if order == "seeded":
        return [int(x) for x in np.random.default_rng(seed).permutation(n)]
    order = [int(x) for x in order]
    if len(set(order)) != len(order) or not all(0 <= x < n for x in order):
        raise ConfigError(f"benchmark.class_order must list distinct class indices in 0..{n - 1}")
    return order


def split_sizes(n: int, num_tasks: int | None, sizes: list[int] | None) -> list[int]:
    if sizes:
        if any(k <= 0 for k in sizes):
            raise ConfigError(f"benchmark.task_sizes {sizes}: every task needs at least one class")
        if sum(sizes) != n:
            raise ConfigError(f"benchmark.task_sizes sum to {sum(sizes)} but the class order has {n} classes")
        return list(sizes)
    if not num_tasks:
        raise ConfigError("class-incremental benchmarks need benchmark.num_tasks or benchmark.task_sizes")
    if n % num_tasks:
        raise ConfigError(f"{n} classes do not split into {num_tasks} equal tasks; give benchmark.task_sizes")
    return [n // num_tasks] * num_tasks


def _remap(s: ImageSet, table: np.ndarray) -> ImageSet:
    tg = table[s.targets]
    keep = np.nonzero(tg >= 0)[0]
    s = s.subset(keep)
    return s.with_targets(tg[keep])


def _checked(sc: Scenario) -> Scenario:
    """Tasks that would train or test on nothing stop the run before it starts; classes without training
    images are reported by name."""
    from .images import note

    for t in sc.tasks:
        if not t.class_ids:
            raise ConfigError(f"benchmark '{sc.name}': task {t.index} ('{t.name}') has no classes; check "
                              f"benchmark.task_sizes / num_tasks")
        for part in ("train", "test"):
            if len(getattr(t, part)) == 0:
                raise DataError(f"benchmark '{sc.name}': task {t.index} ('{t.name}', classes "
                                f"{', '.join(t.class_names[:5])}) has no {part} images")
        have = set(np.unique(t.train.targets).tolist())
        empty = [n for i, n in zip(t.class_ids, t.class_names) if i not in have]
        if empty and sc.kind != "domain-incremental":
            note(f"task {t.index} ('{t.name}'): classes without training images: {', '.join(empty[:5])}"
                 + (f" and {len(empty) - 5} more" if len(empty) > 5 else ""))
    return sc


def build_scenario(cfg: BenchmarkConfig, seed: int) -> Scenario:
    kind = cfg.scenario
    if kind == "class-incremental":
        if len(cfg.datasets) != 1:
            raise ConfigError("a class-incremental benchmark takes exactly one dataset")
        spec = cfg.datasets[0]
        ds = load_dataset(spec)
        order = class_order(len(ds.class_names), cfg.class_order, seed)
        sizes = split_sizes(len(order), cfg.num_tasks, cfg.task_sizes)
        table = np.full(len(ds.class_names), -1)
        table[order] = np.arange(len(order))
        train, test = _remap(ds.train, table), _remap(ds.test, table)
        names = [ds.class_names[k] for k in order]
        keys = [(ds.class_keys or ds.class_names)[k] for k in order]
        tasks, start = [], 0
        for t, n in enumerate(sizes):
            ids = list(range(start, start + n))
            tr = train.subset(np.nonzero((train.targets >= start) & (train.targets < start + n))[0])
            te = test.subset(np.nonzero((test.targets >= start) & (test.targets < start + n))[0])
            tasks.append(Task(t, f"task{t}", ids, names[start:start + n], tr, te,
                              _templates(ds, spec.template), ds.name, keys[start:start + n]))
            start += n
        return _checked(Scenario(kind, cfg.name, tasks, names))

    if kind == "domain-incremental":
        tasks, names = [], None
        for t, spec in enumerate(cfg.datasets):
            ds = load_dataset(spec)
            if names is None:
                names = list(ds.class_names)
            elif list(ds.class_names) != names:
                raise DataError(f"domain-incremental: classes of '{spec.label or ds.name}' differ from the "
                                f"first domain's ({ds.class_names[:3]}... vs {names[:3]}...)")
            tasks.append(Task(t, spec.label or ds.name, list(range(len(names))), names, ds.train, ds.test,
                              _templates(ds, spec.template), ds.name, ds.class_keys))
        return _checked(Scenario(kind, cfg.name, tasks, names))

    # cross-dataset
    tasks, names, offset = [], [], 0
    for t, spec in enumerate(cfg.datasets):
        ds = load_dataset(spec)
        n = len(ds.class_names)
        ids = list(range(offset, offset + n))
        tr = ds.train.with_targets(ds.train.targets + offset)
        te = ds.test.with_targets(ds.test.targets + offset)
        tasks.append(Task(t, spec.label or ds.name, ids, list(ds.class_names), tr, te,
                          _templates(ds, spec.template), ds.name, ds.class_keys))
        names.extend(ds.class_names)
        offset += n
    return _checked(Scenario(kind, cfg.name, tasks, names))


def carve_validation(sc: Scenario, fraction: float, seed: int) -> Scenario:
    """Every task's training images split, per class and seeded, into training and validation images: model and
    hyper-parameter selection can then use validation images only, never test ones."""
    from .datasets import stratified_split
    from .loader import derive_seed

    for t in sc.tasks:
        train, val = stratified_split(t.train.targets, fraction, derive_seed(seed, "validation", t.index))
        if len(val) == 0 or len(train) == 0:
            raise ConfigError(f"data.val_fraction {fraction}: task {t.index} ('{t.name}') has {len(t.train)} "
                              f"training images, too few to split")
        t.train, t.val = t.train.subset(train), t.train.subset(val)
    return sc
