"""The dataset registry: `@register(name)` a loader; `load_dataset(spec)` resolves a DatasetSpec with it.

Loaders live in `datasets.py` (image folders, split files, torchvision datasets, PACS, ImageNet-R, DomainNet)
and `mtil.py` (the 11 MTIL datasets); both are imported on the first lookup, so every name is known.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Callable

import numpy as np

from ..config import DatasetSpec
from ..errors import DataError
from .images import DatasetSplits

LOADER_MODULES = ("loracl.data.datasets", "loracl.data.mtil", "loracl.data.tiny_imagenet")

LOADERS: dict[str, Callable[[DatasetSpec], DatasetSplits]] = {}


def register(*names: str):
    def deco(fn):
        for n in names:
            LOADERS[n] = fn
        return fn
    return deco


def load_dataset(spec: DatasetSpec) -> DatasetSplits:
    for m in LOADER_MODULES:  # each registers its loaders when first imported
        importlib.import_module(m)
    if spec.name not in LOADERS:
        raise DataError(f"unknown dataset '{spec.name}' (known: {', '.join(sorted(LOADERS))})")
    root = Path(spec.root).expanduser()
    if not root.exists() and not spec.download:
        raise DataError(f"dataset '{spec.name}': root {root} does not exist (set its 'root', or "
                        f"'download: true' for datasets torchvision can download)")
    ds = LOADERS[spec.name](spec)
    ds = _restrict(ds, spec)
    if len(ds.train) == 0 or len(ds.test) == 0:
        raise DataError(f"dataset '{spec.name}' at {root} has an empty split (train {len(ds.train)}, "
                        f"test {len(ds.test)})")
    return ds


def _restrict(ds: DatasetSplits, spec: DatasetSpec) -> DatasetSplits:
    """Apply `classes` (keep and relabel 0..k-1 in the given order) and `max_per_class`."""
    names = ds.class_names
    if spec.classes is not None:
        keep = []
        for c in spec.classes:
            if isinstance(c, int):
                if not 0 <= c < len(names):
                    raise DataError(f"dataset '{spec.name}': class index {c} out of range (0..{len(names) - 1})")
                keep.append(c)
            else:
                if c not in names:
                    raise DataError(f"dataset '{spec.name}': no class named '{c}'")
                keep.append(names.index(c))
        remap = np.full(len(names), -1)
        remap[keep] = np.arange(len(keep))
        sets = []
        for s in (ds.train, ds.test):
            rows = np.nonzero(remap[s.targets] >= 0)[0]
            s = s.subset(rows)
            sets.append(s.with_targets(remap[s.targets]))
        keys = None if ds.class_keys is None else [ds.class_keys[k] for k in keep]
        ds = DatasetSplits(ds.name, [names[k] for k in keep], sets[0], sets[1], ds.template, ds.templates, keys)
    if spec.max_per_class:
        rng = np.random.default_rng(spec.holdout_seed)
        for part in ("train", "test"):
            n = spec.max_per_class.get(part)
            if n is None:
                continue
            s = getattr(ds, part)
            rows = []
            for c in range(len(ds.class_names)):
                r = np.nonzero(s.targets == c)[0]
                rows.extend(sorted(rng.permutation(r)[:n]) if len(r) > n else r)
            setattr(ds, part, s.subset(np.sort(np.asarray(rows, dtype=np.int64))))
    return ds
