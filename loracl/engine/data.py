"""Data service: transforms, batches with training or test views, the tensor pipeline, class-id mapping."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ..config import RunConfig
from ..data.datasets import ImageSet
from ..data.loader import EpochBatches, derive_seed, make_loader
from ..data.scenarios import Scenario, Task
from ..data.transforms import build_transforms, crop_fraction


@dataclass
class Batch:
    x: torch.Tensor
    y: torch.Tensor  # global class ids
    rows: torch.Tensor  # row of each sample in its ImageSet (-1: not from it, e.g. a replayed sample)


class ClassIds:
    """Global class ids as the device tensors a step needs: the classes a task's loss runs over, any list of ids,
    and the logits' column of each target. Tables are sized on the host: no device sync inside a step."""

    def __init__(self, scenario: Scenario, device: torch.device, loss_scope: str, joint: bool):
        self.scenario, self.device, self.loss_scope, self.joint = scenario, device, loss_scope, joint
        self._train: dict[int, torch.Tensor] = {}

    def train(self, task: Task) -> torch.Tensor:
        """The classes the task's loss runs over (`train.loss_scope`; a joint run: all of them)."""
        if task.index not in self._train:
            ids = task.class_ids if self.joint else self.scenario.train_classes(task.index, self.loss_scope)
            self._train[task.index] = torch.tensor(ids, dtype=torch.long, device=self.device)
        return self._train[task.index]

    def tensor(self, ids) -> torch.Tensor:
        return torch.as_tensor(list(ids), dtype=torch.long, device=self.device)

    def columns(self, y: torch.Tensor, class_ids: torch.Tensor) -> torch.Tensor:
        """Positions of the global ids `y` within `class_ids` (the logits' columns; -1 for an id not among them)."""
        lut = torch.full((len(self.scenario.class_names),), -1, dtype=torch.long, device=class_ids.device)
        lut[class_ids] = torch.arange(len(class_ids), device=class_ids.device)
        return lut[y]


class DataService:
    def __init__(self, cfg: RunConfig, device: torch.device, scenario: Scenario, data_config: dict, *,
                 joint: bool, log=print):
        self.cfg, self.device, self.scenario, self.log = cfg, device, scenario, log
        self.data_config = data_config
        self.classes = ClassIds(scenario, device, cfg.train.loss_scope, joint)
        self.train_tf, self.test_tf = build_transforms(cfg.data, data_config)
        p = cfg.data.pipeline
        self.tensor_pipeline = p == "tensor" or (p == "auto" and device.type == "cuda")
        self._decoded_sets: dict = {}
        self._eval_cache: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self._eval_cache_bytes = 0
        if self.tensor_pipeline:
            from ..data.tensor_pipeline import BatchAugment

            pct = crop_fraction(cfg.data, data_config)
            self._augment = {True: BatchAugment(cfg.data.train_augment, data_config["size"], pct, self.train_tf,
                                                cfg.data.rrc_scale),
                             False: BatchAugment("none", data_config["size"], pct, self.test_tf)}

    # ---- images --------------------------------------------------------------------------------------
    def prepare(self, x: torch.Tensor, train: bool) -> torch.Tensor:
        """uint8 batch from a loader -> normalised float input on the model's device."""
        return (self.train_tf if train else self.test_tf).finish(x.to(self.device, non_blocking=True))

    def _decoded(self, images: ImageSet):
        """The decoded-once copy of `images` for the tensor pipeline (None: too large, use the PIL path)."""
        from ..data.tensor_pipeline import DecodedImages, storage_size

        key = images.fingerprint()
        if key in self._decoded_sets:
            return self._decoded_sets[key]
        d, dc = self.cfg.data, self.data_config
        store = storage_size(images, dc["size"], crop_fraction(d, dc))
        nbytes = len(images) * 3 * store * store
        used = sum(x.data.numel() for x in self._decoded_sets.values() if x is not None)
        dec = None
        if d.cache_dir or used + nbytes <= d.host_cache_mb * 2 ** 20:
            dec = DecodedImages(images, store, dc["interpolation"], d.resize == "resize", device=self.device,
                                device_budget=d.device_cache_mb * 2 ** 20, cache_dir=d.cache_dir,
                                workers=d.num_workers)
        else:
            self.log(f"  {len(images)} images at {store} px need {nbytes / 2**20:.0f} MiB, more than "
                     f"data.host_cache_mb: reading them with PIL instead (set data.cache_dir to memory-map them)")
        self._decoded_sets[key] = dec
        return dec

    def batches(self, images: ImageSet, *, train: bool, seed_parts=(), shuffle: bool | None = None,
                batch_size: int | None = None, start: int = 0, equal_steps: bool = False, drop_last: bool = False):
        """(input on device, target on device, rows) batches of `images`, with training or test views.

        Seeds derive from (run seed, *seed_parts), so the batches are the same after a resume. The tensor
        pipeline (decode once, augment on the device) is used when configured and the data fits."""
        bs = batch_size or (self.cfg.data.batch_size if train else self.cfg.data.eval_batch_size)
        shuffle = train if shuffle is None else shuffle
        seed = derive_seed(self.cfg.seed, *seed_parts)
        dec = self._decoded(images) if self.tensor_pipeline else None
        if dec is None:
            for x, y, rows in make_loader(images, self.train_tf if train else self.test_tf, bs, seed=seed,
                                          shuffle=shuffle, start=start, num_workers=self.cfg.data.num_workers,
                                          augment=train, pin_memory=self.device.type == "cuda",
                                          drop_last=drop_last, equal_steps=equal_steps):
                yield self.prepare(x, train), y.to(self.device, non_blocking=True), rows
            return
        sampler = EpochBatches(len(images), bs, seed, shuffle, start, drop_last, augment=False,
                               equal_steps=equal_steps)
        for b, mine, lo, total in sampler.shares():
            rows = torch.tensor(mine, dtype=torch.long)
            gen = torch.Generator().manual_seed(derive_seed(seed, b)) if train else None
            # parameters drawn for the global batch, this process's positions taken: as on one process
            x = self.augment(dec.rows(rows).to(self.device, non_blocking=True), train, gen, lo, total)
            yield x, dec.targets[rows].to(self.device, non_blocking=True), rows

    def view(self, name: str) -> bool:
        """Whether a pass with view `name` sees training transforms: "train", "test", or "stats" (the statistics
        and feature passes: `data.stats_augment`)."""
        if name not in ("train", "test", "stats"):
            raise ValueError(f"unknown view '{name}' (train, test or stats)")
        return name == "train" or (name == "stats" and self.cfg.data.stats_augment)

    def memory_batch(self, memory, rows: np.ndarray, keep: slice = slice(None)) -> Batch:
        """Rows `rows[keep]` of an episodic memory's pool as a training batch, with training views. With the tensor
        pipeline they come from the decoded copies on the device and are augmented there, as positions of the
        batch `rows` with one seed drawn alike in every process; otherwise PIL, one seed per sample."""
        mine = range(len(rows))[keep]
        if not len(mine):  # fewer memory rows than processes: this one holds none
            s = self.data_config["size"]
            empty = torch.zeros(0, 3, s, s, dtype=torch.uint8)
            return Batch(self.prepare(empty, True), torch.zeros(0, dtype=torch.long, device=self.device),
                         torch.as_tensor(rows[keep]))
        u8 = memory.gather(rows[keep], self.decoded_rows)
        if u8 is not None:
            gen = torch.Generator().manual_seed(int(torch.randint(2 ** 62, (1,))))
            x = self.augment(u8, True, gen, mine.start, len(rows))
            y = torch.as_tensor(memory.pool.targets[rows[keep]], dtype=torch.long, device=self.device)
            return Batch(x, y, torch.as_tensor(rows[keep]))
        x, y = memory.load(rows, self.train_tf, keep=keep)
        return Batch(self.prepare(x, True), y.to(self.device), torch.as_tensor(rows[keep]))

    def decoded_rows(self, images: ImageSet, rows) -> torch.Tensor | None:
        """uint8 images `rows` of `images` on the device, from the tensor pipeline's decoded copy of the set;
        None when the pipeline is off or the set is read with PIL."""
        dec = self._decoded(images) if self.tensor_pipeline else None
        if dec is None:
            return None
        return dec.rows(torch.as_tensor(rows, dtype=torch.long)).to(self.device, non_blocking=True)

    def augment(self, u8: torch.Tensor, train: bool, generator: torch.Generator | None, lo: int = 0,
                total: int | None = None) -> torch.Tensor:
        """The tensor pipeline's training (or test) views of a uint8 batch from `decoded_rows`, which holds
        positions lo.. of a batch of `total` (see `BatchAugment`)."""
        return self._augment[train](u8, generator, lo, total)

    @staticmethod
    def num_batches(images: ImageSet, batch_size: int, drop_last: bool = False) -> int:
        return EpochBatches(len(images), batch_size, 0, False, drop_last=drop_last).num_batches()

    def eval_subset(self, images: ImageSet) -> ImageSet:
        cap = self.cfg.eval.max_per_task
        if cap and len(images) > cap:
            rows = np.random.default_rng(0).permutation(len(images))[:cap]
            return images.subset(np.sort(rows))
        return images

    def eval_batches(self, images: ImageSet):
        """(input, target) batches of a test set; with the PIL pipeline decoded once and kept as uint8 when
        it fits cfg.eval.cache_mb."""
        if self.tensor_pipeline:
            for x, y, _ in self.batches(images, train=False, shuffle=False):
                yield x, y
            return
        key = images.fingerprint()
        cached = self._eval_cache.get(key)
        bs = self.cfg.data.eval_batch_size
        if cached is None:
            size = self.data_config["size"]
            fits = len(images) * 3 * size * size <= self.cfg.eval.cache_mb * 2 ** 20 - self._eval_cache_bytes
            if not fits:
                for x, y, _ in self.batches(images, train=False, shuffle=False):
                    yield x, y
                return
            xs, ys = [], []
            for x, y, _ in make_loader(images, self.test_tf, bs, num_workers=self.cfg.data.num_workers, augment=False):
                xs.append(x)
                ys.append(y)
            cached = (torch.cat(xs), torch.cat(ys))
            self._eval_cache[key] = cached
            self._eval_cache_bytes += cached[0].numel()
        X, Y = cached
        for k in range(0, len(Y), bs):
            yield self.prepare(X[k:k + bs], False), Y[k:k + bs].to(self.device)
