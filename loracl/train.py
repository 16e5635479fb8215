"""The run loop: tasks in order, each trained by the configured method, evaluated on every task, checkpointed.

It knows no method by name: it calls the method's hooks (see `loracl.methods.base`) and offers them the
services they share (`fit`, `forward_pass`, `train_classes`, `columns`).
"""

from __future__ import annotations

import contextlib
import json
import math
import platform
import resource
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from . import __version__, dist
from .checkpoint import atomic_save, changed_state, digests, load
from .config import OptimizerConfig, RunConfig, ScheduleConfig, dump_config
from .data.datasets import ImageSet
from .data.loader import derive_seed, make_loader
from .data.scenarios import Scenario, Task, build_scenario
from .data.transforms import build_transforms, crop_fraction
from .errors import ConfigError, LoraclError, TrainingDiverged
from .flops import FlopMeter
from .methods import Batch, get_method
from .metrics import all_metrics, final_acc_task_avg, learning_acc
from .models.model import ContinualModel, build_model


def seed_all(seed: int) -> None:
    import random

    random.seed(seed)
    np.random.seed(seed % (2 ** 32))
    torch.manual_seed(seed)


def pick_device(name: str) -> torch.device:
    if name == "cuda" or (name == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise ConfigError("device 'cuda' requested but CUDA is not available on this machine")
        if dist.is_dist() or "LOCAL_RANK" in __import__("os").environ:
            return torch.device("cuda", int(__import__("os").environ.get("LOCAL_RANK", "0")))
        return torch.device("cuda")
    return torch.device("cpu")


def build_optimizer(groups: dict[str, list], cfg: OptimizerConfig) -> torch.optim.Optimizer:
    pg = []
    for name, params in groups.items():
        params = [p for p in params if p.requires_grad]
        if params:
            lr = cfg.head_lr if (name == "head" and cfg.head_lr) else cfg.lr
            pg.append({"params": params, "lr": lr, "name": name})
    if cfg.name == "adam":
        return torch.optim.Adam(pg, lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay)
    if cfg.name == "adamw":
        return torch.optim.AdamW(pg, lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay)
    return torch.optim.SGD(pg, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)


def build_schedule(opt, cfg: ScheduleConfig, epochs: int, steps_per_epoch: int):
    """A per-step scheduler. `inflora-cosine` is the official per-epoch rule lr_e = lr0 cos(99 pi e / (200 (E-1)))."""
    total = max(epochs * steps_per_epoch, 1)
    warm = int(cfg.warmup_epochs * steps_per_epoch)
    if cfg.name == "onecycle":
        return torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=[g["lr"] for g in opt.param_groups], total_steps=total)

    def factor(step: int) -> float:
        if warm and step < warm:
            return (step + 1) / warm
        epoch = step // max(steps_per_epoch, 1)
        if cfg.name == "constant":
            return 1.0
        if cfg.name == "cosine":
            return 0.5 * (1 + math.cos(math.pi * (step - warm) / max(total - warm, 1)))
        if cfg.name == "inflora-cosine":
            return 1.0 if epochs <= 1 else math.cos(99 * math.pi * epoch / (200 * (epochs - 1)))
        if cfg.name == "step":
            return cfg.gamma ** sum(epoch >= m for m in cfg.milestones)
        raise ValueError(cfg.name)

    return torch.optim.lr_scheduler.LambdaLR(opt, factor)


def package_versions() -> dict:
    import importlib.metadata as md

    out = {"python": platform.python_version(), "loracl": __version__}
    for pkg in ("torch", "torchvision", "timm", "open_clip_torch", "numpy", "pillow"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            out[pkg] = None
    repo = Path(__file__).resolve().parent.parent
    try:
        commit = subprocess.run(["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True, text=True,
                                timeout=5).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(repo), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=5).stdout.strip()
        out["git_commit"] = (commit + ("-dirty" if dirty else "")) if commit else None
    except (OSError, subprocess.SubprocessError):
        out["git_commit"] = None
    return out


def machine() -> dict:
    d = {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
         "cpu_threads": torch.get_num_threads()}
    if torch.cuda.is_available():
        d["gpu"] = torch.cuda.get_device_name(0)
    return d


class Runner:
    def __init__(self, cfg: RunConfig, out_dir: str | Path, *, resume: bool = False, progress: bool | None = None,
                 log=print, scenario: Scenario | None = None):
        self.cfg = cfg
        self.out = Path(out_dir)
        self.device = pick_device(cfg.device)
        dist.init_from_env(self.device)
        self.log = log if dist.is_main() else (lambda *a, **k: None)
        self.progress = (sys.stderr.isatty() if progress is None else progress) and dist.is_main()
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        self.resume = resume
        seed_all(derive_seed(cfg.seed, "build"))
        # a scenario given by the caller (synthetic images for `loracl bench`) stands in for cfg.benchmark's
        self.scenario: Scenario = scenario or build_scenario(cfg.benchmark, cfg.seed)
        self.model: ContinualModel = build_model(cfg, self.device)
        self.train_tf, self.test_tf = build_transforms(cfg.data, self.model.backbone.data_config())
        self.base_digests = digests(self.model)
        cls = get_method(cfg.method_name)
        self.method = cls(cls.Config.model_validate({k: v for k, v in cfg.method.items() if k != "name"}), self)
        self.flops = FlopMeter()
        self.phase_seconds: dict[str, float] = defaultdict(float)
        self.current_task: Task | None = None
        self._train_classes: dict[int, torch.Tensor] = {}
        self._retention = None
        self._tb = None
        self._eval_cache: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self._decoded_sets: dict = {}
        if self._tensor_pipeline():
            from .data.tensor_pipeline import BatchAugment

            dc = self.model.backbone.data_config()
            pct = crop_fraction(cfg.data, dc)
            self._augment = {True: BatchAugment(cfg.data.train_augment, dc["size"], pct, self.train_tf),
                             False: BatchAugment("none", dc["size"], pct, self.test_tf)}
        self._eval_cache_bytes = 0
        T = len(self.scenario)
        self.results = {
            "method": cfg.method_name, "benchmark": cfg.benchmark.name, "scenario": self.scenario.kind,
            "preset": cfg.name, "seed": cfg.seed, "status": "running",
            "tasks": [t.summary() for t in self.scenario.tasks],
            "acc_matrix": [[None] * T for _ in range(T)], "acc_before": None, "metrics": {},
            "cost": {"train_seconds_per_task": [None] * T, "train_flops_per_task": [None] * T,
                     "flops_by_phase_per_task": [None] * T, "phase_seconds_per_task": [None] * T,
                     "trainable_params_per_task": [None] * T, "eval_seconds_per_task": [None] * T,
                     "peak_memory_bytes": None, "peak_memory_kind": None},
            "retention": None, "versions": package_versions(), "machine": machine(),
        }

    # ------------------------------------------------------------------------------------------------
    # services for methods

    def amp_context(self):
        amp = self.cfg.train.amp
        if amp == "auto":
            amp = "bf16" if self.device.type == "cuda" else "none"
        if amp == "none":
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=torch.bfloat16 if amp == "bf16" else torch.float16)

    def train_classes(self, task: Task) -> torch.Tensor:
        if task.index not in self._train_classes:
            ids = task.class_ids if self.method.joint else self.scenario.train_classes(task.index,
                                                                                       self.cfg.train.loss_scope)
            self._train_classes[task.index] = torch.tensor(ids, dtype=torch.long, device=self.device)
        return self._train_classes[task.index]

    def class_tensor(self, ids) -> torch.Tensor:
        return torch.as_tensor(list(ids), dtype=torch.long, device=self.device)

    def columns(self, y: torch.Tensor, class_ids: torch.Tensor) -> torch.Tensor:
        """Positions of the global ids `y` within `class_ids` (the logits' columns; -1 for an id not among
        them). The table spans the scenario's classes, a size known on the host: no device sync in a step."""
        lut = torch.full((len(self.scenario.class_names),), -1, dtype=torch.long, device=class_ids.device)
        lut[class_ids] = torch.arange(len(class_ids), device=class_ids.device)
        return lut[y]

    def prepare(self, x: torch.Tensor, train: bool) -> torch.Tensor:
        """uint8 batch from a loader -> normalised float input on the model's device."""
        return (self.train_tf if train else self.test_tf).finish(x.to(self.device, non_blocking=True))

    def _tensor_pipeline(self) -> bool:
        p = self.cfg.data.pipeline
        return p == "tensor" or (p == "auto" and self.device.type == "cuda")

    def _decoded(self, images: ImageSet):
        """The decoded-once copy of `images` for the tensor pipeline (None: too large, use the PIL path)."""
        from .data.tensor_pipeline import DecodedImages, storage_size

        key = images.fingerprint()
        if key in self._decoded_sets:
            return self._decoded_sets[key]
        d = self.cfg.data
        dc = self.model.backbone.data_config()
        pct = crop_fraction(d, dc)
        store = storage_size(images, dc["size"], pct)
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
        dec = self._decoded(images) if self._tensor_pipeline() else None
        if dec is None:
            for x, y, rows in make_loader(images, self.train_tf if train else self.test_tf, bs, seed=seed,
                                          shuffle=shuffle, start=start, num_workers=self.cfg.data.num_workers,
                                          augment=train, pin_memory=self.device.type == "cuda",
                                          drop_last=drop_last, equal_steps=equal_steps):
                yield self.prepare(x, train), y.to(self.device, non_blocking=True), rows
            return
        from .data.loader import EpochBatches

        sampler = EpochBatches(len(images), bs, seed, shuffle, start, drop_last, augment=False,
                               equal_steps=equal_steps)
        for b, mine, lo, total in sampler.shares():
            rows = torch.tensor(mine, dtype=torch.long)
            gen = torch.Generator().manual_seed(derive_seed(seed, b)) if train else None
            # parameters drawn for the global batch, this process's positions taken: as on one process
            x = self.augment(dec.rows(rows).to(self.device, non_blocking=True), train, gen, lo, total)
            yield x, dec.targets[rows].to(self.device, non_blocking=True), rows

    def decoded_rows(self, images: ImageSet, rows) -> torch.Tensor | None:
        """uint8 images `rows` of `images` on the device, from the tensor pipeline's decoded copy of the set;
        None when the pipeline is off or the set is read with PIL."""
        dec = self._decoded(images) if self._tensor_pipeline() else None
        if dec is None:
            return None
        return dec.rows(torch.as_tensor(rows, dtype=torch.long)).to(self.device, non_blocking=True)

    def augment(self, u8: torch.Tensor, train: bool, generator: torch.Generator | None, lo: int = 0,
                total: int | None = None) -> torch.Tensor:
        """The tensor pipeline's training (or test) views of a uint8 batch from `decoded_rows`, which holds
        positions lo.. of a batch of `total` (see `BatchAugment`)."""
        return self._augment[train](u8, generator, lo, total)

    def num_batches(self, images: ImageSet, batch_size: int, drop_last: bool = False) -> int:
        from .data.loader import EpochBatches

        return EpochBatches(len(images), batch_size, 0, False, drop_last=drop_last).num_batches()

    def eval_batches(self, images: ImageSet):
        """(input, target) batches of a test set; with the PIL pipeline decoded once and kept as uint8 when
        it fits cfg.eval.cache_mb."""
        if self._tensor_pipeline():
            for x, y, _ in self.batches(images, train=False, shuffle=False):
                yield x, y
            return
        key = images.fingerprint()
        cached = self._eval_cache.get(key)
        bs = self.cfg.data.eval_batch_size
        if cached is None:
            size = self.model.backbone.data_config()["size"]
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

    @contextlib.contextmanager
    def timed(self, phase: str):
        t0 = time.perf_counter()
        try:
            yield
        finally:
            if self.device.type == "cuda":
                torch.cuda.synchronize()
            self.phase_seconds[phase] += time.perf_counter() - t0

    def forward_pass(self, images: ImageSet, fn, *, desc: str, train_transform: bool = True,
                     grad: bool = False, batch_size: int | None = None, drop_last: bool = False) -> None:
        """Call fn(Batch) over `images` once (statistics, features, gradient estimates), timed and FLOP-counted
        as phase `desc`. Training transforms by default, as InfLoRA's statistics passes use. `drop_last`
        leaves out a short last (global) batch, on every process alike."""
        t = self.current_task.index if self.current_task else -1
        bs = batch_size or self.cfg.data.eval_batch_size
        batches = self.batches(images, train=train_transform, seed_parts=("pass", desc, t), shuffle=False,
                               batch_size=bs, drop_last=drop_last)
        self.flops.new_phase(desc)
        with self.timed(desc), torch.set_grad_enabled(grad), self.amp_context():
            for x, y, rows in tqdm(batches, total=self.num_batches(images, bs, drop_last), desc=f"  {desc}",
                                   leave=False, disable=not self.progress):
                b = Batch(x, y, rows)
                self.flops.step(desc, len(y), lambda: fn(b))

    def fit(self, task: Task, *, phase: str, images: ImageSet, epochs: int, groups=None, loss_fn=None,
            after_backward=None, optimizer: OptimizerConfig | None = None, schedule: ScheduleConfig | None = None,
            batch_size: int | None = None, resume_state: dict | None = None) -> int:
        """Train the parameters in `groups` for `epochs` over `images`; returns the number of steps taken."""
        cfg = self.cfg
        groups = groups if groups is not None else self.method.param_groups(task)
        params = [p for ps in groups.values() for p in ps if p.requires_grad]
        if phase == "train":
            self.results["cost"]["trainable_params_per_task"][task.index] = int(sum(p.numel() for p in params))
        if not params or epochs == 0 or len(images) == 0:
            return 0
        loss_fn = loss_fn or self.method.loss
        after_backward = after_backward if after_backward is not None else self.method.after_backward
        bs = batch_size or cfg.data.batch_size
        opt = build_optimizer(groups, optimizer or cfg.train.optimizer)
        spe = self.num_batches(images, bs)
        if cfg.train.max_steps_per_epoch:
            spe = min(spe, cfg.train.max_steps_per_epoch)
        sched = build_schedule(opt, schedule or cfg.train.schedule, epochs, spe)
        amp = cfg.train.amp if cfg.train.amp != "auto" else ("bf16" if self.device.type == "cuda" else "none")
        scaler = torch.amp.GradScaler(self.device.type, enabled=amp == "fp16")
        start_epoch, start_batch, step = 0, 0, 0
        if resume_state is not None:
            opt.load_state_dict(resume_state["optimizer"])
            sched.load_state_dict(resume_state["scheduler"])
            scaler.load_state_dict(resume_state["scaler"])
            start_epoch, start_batch, step = resume_state["epoch"], resume_state["batch"], resume_state["step"]
            torch.set_rng_state(resume_state["rng"])
        first_bad = torch.tensor(-1, device=self.device)
        loss = torch.zeros(())
        self.method.net = self._data_parallel()
        if cfg.train.compile:
            self.method.net = torch.compile(self.method.net)
        self.flops.new_phase(phase)
        self.model.train(cfg.train.model_mode == "train")
        bar = tqdm(total=epochs * spe, initial=start_epoch * spe + start_batch, leave=False,
                   desc=f"task {task.index + 1}/{len(self.scenario)} {task.name} {phase}", disable=not self.progress)
        with self.timed(phase):
            for epoch in range(start_epoch, epochs):
                b0 = start_batch if epoch == start_epoch else 0
                batches = self.batches(images, train=True, seed_parts=(task.index, phase, epoch), batch_size=bs,
                                       start=b0, equal_steps=True)
                for b, (x, y, rows) in enumerate(batches, start=b0):
                    if b >= spe:
                        break
                    batch = Batch(x, y, rows)
                    opt.zero_grad(set_to_none=True)

                    def step_fn():
                        with self.amp_context():
                            loss = loss_fn(batch, task)
                        scaler.scale(loss).backward()
                        return loss

                    loss = self.flops.step(phase, len(y), step_fn).detach()
                    finite = torch.isfinite(loss)
                    if cfg.train.nan_policy == "skip" and not self._all_finite(finite):
                        opt.zero_grad(set_to_none=True)
                    else:
                        first_bad = torch.where((first_bad < 0) & ~finite, torch.tensor(step, device=self.device),
                                                first_bad)
                        after_backward(task)
                        if cfg.train.grad_clip:
                            scaler.unscale_(opt)
                            torch.nn.utils.clip_grad_norm_(params, cfg.train.grad_clip)
                        scaler.step(opt)
                        scaler.update()
                    sched.step()
                    step += 1
                    bar.update(1)
                    if self._tb is not None and step % 20 == 0:
                        self._tb.add_scalar(f"loss/{phase}", float(loss), self._tb_step(task, step))
                    every = cfg.train.checkpoint_every
                    if phase == "train" and every and step % every == 0:
                        self._check_finite(first_bad, task, phase, spe)
                        self._save_step(task, opt, sched, scaler, epoch, b + 1, step)
                self._check_finite(first_bad, task, phase, spe)
                bar.set_postfix(loss=f"{float(loss):.3f}", refresh=False)
        bar.close()
        self.method.net = self.model
        self.model.eval()
        return step

    def _data_parallel(self):
        """Under torchrun, training forwards go through DDP (gradients averaged across processes)."""
        if not dist.is_dist():
            return self.model
        from torch.nn.parallel import DistributedDataParallel as DDP

        # rebuilt per phase: each task trains a different set of parameters. A method may leave some trainable
        # tensors out of a step; DDP then has to look for them in every step's graph
        find = self.cfg.train.ddp_find_unused
        if find is None:
            find = not self.method.uses_all_trained_params
        return DDP(self.model, device_ids=[self.device.index] if self.device.type == "cuda" else None,
                   find_unused_parameters=find)

    @staticmethod
    def _all_finite(finite: torch.Tensor) -> bool:
        """One host sync per step (nan_policy skip); under torchrun all processes skip the step together,
        since the averaged gradients of a step with a non-finite loss anywhere are non-finite everywhere."""
        ok = finite.to(torch.int32)
        return bool(dist.all_reduce_min_(ok))

    def _check_finite(self, first_bad: torch.Tensor, task: Task, phase: str, spe: int) -> None:
        # the earliest bad step over all processes, so that every process raises together (none waits on
        # a collective that its peers never reach)
        never = torch.iinfo(first_bad.dtype).max
        bad = dist.all_reduce_min_(torch.where(first_bad < 0, torch.full_like(first_bad, never), first_bad))
        bad = -1 if int(bad) == never else int(bad)
        if bad >= 0:
            last = self._last_good_checkpoint()
            raise TrainingDiverged(
                f"non-finite loss in task {task.index} ('{task.name}'), phase '{phase}', epoch {bad // spe}, "
                f"step {bad % spe} of the epoch (step {bad} of the phase); training stopped. Last good checkpoint: "
                f"{last or 'none'}; lower the learning rate (train.optimizer.lr) or set train.grad_clip")

    def _tb_step(self, task: Task, step: int) -> int:
        return task.index * 1_000_000 + step

    # ------------------------------------------------------------------------------------------------
    # evaluation

    @torch.no_grad()
    def _top1(self, images: ImageSet, predict, k: int = 1) -> list[float]:
        """Top-1 (%) of each of the k predictions predict(x) returns (tuples of predicted global ids) over
        `images`, counts summed over processes."""
        correct = torch.zeros(k, dtype=torch.long, device=self.device)
        total = torch.zeros((), dtype=torch.long, device=self.device)
        self.model.eval()
        with self.amp_context():
            for x, y in self.eval_batches(images):
                correct += torch.stack([(p == y).sum() for p in predict(x)])
                total += len(y)
        dist.all_reduce_sum_(correct)
        dist.all_reduce_sum_(total)
        return [round(100.0 * float(c) / max(int(total), 1), 4) for c in correct]

    def accuracy(self, images: ImageSet, class_ids: list[int], own: list[int] | None = None):
        """Top-1 (%) over `class_ids`; with `own` (a task's classes, a subset of class_ids) also the
        task-aware top-1 from the same logits restricted to those classes: (acc, task-aware acc)."""
        ids = self.class_tensor(class_ids)
        images = self._eval_subset(images)
        if own is None:
            return self._top1(images, lambda x: (ids[self.method.logits(x, ids).argmax(-1)],))[0]
        own_ids = self.class_tensor(own)
        cols = self.columns(own_ids, ids)

        def predict(x):
            logits = self.method.logits(x, ids)
            return ids[logits.argmax(-1)], own_ids[logits[:, cols].argmax(-1)]

        return tuple(self._top1(images, predict, k=2))

    def _eval_subset(self, images: ImageSet) -> ImageSet:
        cap = self.cfg.eval.max_per_task
        if cap and len(images) > cap:
            rows = np.random.default_rng(0).permutation(len(images))[:cap]
            return images.subset(np.sort(rows))
        return images

    def evaluate_row(self, j: int) -> tuple[list, list | None]:
        """Accuracies on every task after training task j; in a class-incremental scenario also the
        task-aware ones (the task's own classes only: what is left when the task identity is given)."""
        row, aware = [], []
        for i, task in enumerate(self.scenario.tasks):
            ids = self.scenario.eval_classes(i, j)
            if ids is None or not self.model.head.knows(ids):
                row.append(None)
                aware.append(None)
            elif self.scenario.kind == "class-incremental" and set(ids) != set(task.class_ids):
                acc, own = self.accuracy(task.test, ids, own=task.class_ids)
                row.append(acc)
                aware.append(own)
            else:
                row.append(self.accuracy(task.test, ids))
                aware.append(row[-1])
        return row, (aware if self.scenario.kind == "class-incremental" else None)

    def evaluate_before(self) -> list[float | None] | None:
        """Accuracy of the untrained model on each task where its head can already score it (CLIP zero-shot)."""
        row = []
        for task in self.scenario.tasks:
            ids = task.class_ids
            if self.model.head.knows(ids):
                row.append(self.accuracy(task.test, ids))
            else:
                row.append(None)
        return row if any(v is not None for v in row) else None

    def retention_accuracy(self) -> float | None:
        """Top-1 of the pretrained head on the backbone's pretraining domain, through the current backbone."""
        if self.cfg.eval.retention is None or self.model.backbone.pretrained_head is None:
            return None
        if self._retention is None:
            self._retention = _retention_set(self.cfg.eval.retention, self.cfg.eval.retention_classes,
                                             self.cfg.eval.retention_per_class)
        head = self.model.backbone.pretrained_head
        return self._top1(self._retention, lambda x: (head(self.model.features(x)).argmax(-1),))[0]

    # ------------------------------------------------------------------------------------------------
    # the loop

    def run(self) -> dict:
        self.out.mkdir(parents=True, exist_ok=True)
        cfg_text = dump_config(self.cfg)
        if dist.is_main():
            (self.out / "config.yaml").write_text(cfg_text)
        if self.cfg.tensorboard and dist.is_main():
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise ConfigError("tensorboard: true needs the tensorboard package (pip install loracl[tensorboard])") from None
            self._tb = SummaryWriter(str(self.out / "tensorboard"))
        T = len(self.scenario)
        seed_all(derive_seed(self.cfg.seed, "setup"))
        self.method.setup()
        start, step_state = self._restore() if self.resume else (0, None)
        if self.model.head.zero_shot and not self.method.joint:
            # a zero-shot head scores every dataset from its class names before it is trained on: the upper
            # triangle of the accuracy matrix (MTIL Transfer) and the zero-shot row need all prompts now
            for t in self.scenario.tasks:
                self.method.add_task_classes(t)
        if start == 0:
            if not self.method.joint:
                self.results["acc_before"] = self.evaluate_before()
            if self.cfg.eval.retention:
                self.results["retention"] = {"initial": self.retention_accuracy(), "per_task": [None] * T}
        self.log(f"loracl: {self.cfg.method_name} on {self.cfg.benchmark.name} ({self.scenario.kind}, {T} tasks), "
                 f"seed {self.cfg.seed}, device {self.device}; output {self.out}")
        if self.method.joint:
            tasks = [self._joint_task()] if start < T else []
        else:
            tasks = self.scenario.tasks[start:]
        for task in tasks:
            resume = step_state if (step_state is not None and step_state["task"] == task.index) else None
            self._run_task(task, resume)
        self.results["status"] = "complete"
        self._finish()
        return self.results

    def _joint_task(self) -> Task:
        tasks = self.scenario.tasks
        for t in tasks:  # register every task's classes with its own prompts
            self.method.add_task_classes(t)
        last = tasks[-1]
        ids = self.scenario.seen_classes(len(tasks) - 1)
        names = [self.scenario.class_names[i] for i in ids]
        return Task(last.index, "joint", ids, names, ImageSet.concat([t.train for t in tasks]),
                    ImageSet.concat([t.test for t in tasks]), last.templates, "joint")

    def _run_task(self, task: Task, resume_state: dict | None) -> None:
        cfg, t, T = self.cfg, task.index, len(self.scenario)
        seed_all(derive_seed(cfg.seed, "task", t))
        self.current_task = task
        self.flops.reset()
        self.phase_seconds = defaultdict(float)
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        with self.timed("begin_task"):
            self.method.begin_task(task)
        if resume_state is not None:
            self._load_model_state(resume_state)
            if "method" in resume_state:  # state a method changes during training (a reservoir memory)
                self.method.load_state_dict(resume_state["method"])
            self.flops.load_state_dict(resume_state["flops"])
            self.phase_seconds.update(resume_state["phase_seconds"])
        epochs = cfg.epochs_for(t)
        self.fit(task, phase="train", images=task.train, epochs=epochs, resume_state=resume_state)
        with self.timed("end_task"):
            self.method.end_task(task)
        seconds = time.perf_counter() - t0 + (resume_state or {}).get("elapsed", 0.0)
        e0 = time.perf_counter()
        row, aware = self.evaluate_row(t)
        self.results["acc_matrix"][t] = row
        if aware is not None:
            self.results.setdefault("acc_matrix_task_aware", [[None] * T for _ in range(T)])[t] = aware
        if self.results["retention"] is not None and (cfg.eval.retention_every_task or t == T - 1):
            self.results["retention"]["per_task"][t] = self.retention_accuracy()
        c = self.results["cost"]
        c["train_seconds_per_task"][t] = round(seconds, 3)
        c["train_flops_per_task"][t] = self.flops.total
        c["flops_by_phase_per_task"][t] = dict(self.flops.by_phase)
        c["phase_seconds_per_task"][t] = {k: round(v, 3) for k, v in self.phase_seconds.items()}
        c["eval_seconds_per_task"][t] = round(time.perf_counter() - e0, 3)
        c["peak_memory_bytes"], c["peak_memory_kind"] = self._peak_memory()
        self.results["metrics"] = self._metrics()
        seen = [v for v in row[: t + 1] if v is not None]
        msg = f"task {t + 1}/{T} '{task.name}': {seconds:.1f}s"
        if seen:
            msg += f", mean acc on tasks so far {sum(seen) / len(seen):.2f}%"
        if self.results["retention"] is not None and self.results["retention"]["per_task"][t] is not None:
            msg += f", pretrained retention {self.results['retention']['per_task'][t]:.2f}%"
        done = [x for x in c["train_seconds_per_task"] if x]
        left = sum(1 for k in range(t + 1, T) if not self.method.joint)
        if left and done:
            msg += f"; about {left * sum(done) / len(done) / 60:.1f} min of training left"
        self.log(msg)
        if self._tb is not None:
            for i, v in enumerate(row):
                if v is not None:
                    self._tb.add_scalar(f"acc/task{i}", v, t)
        self._save_task(task)
        self._write_results()

    def _metrics(self) -> dict:
        a = self.results["acc_matrix"]
        n = [len(self._eval_subset(t.test)) for t in self.scenario.tasks]
        done = [j for j, r in enumerate(a) if any(v is not None for v in r)]
        T = (done[-1] + 1) if done else 0
        if T == 0:
            return {}
        sub = [row[:T] for row in a[:T]]
        before = self.results["acc_before"][:T] if self.results["acc_before"] else None
        m = all_metrics(sub, n[:T], self.scenario.kind, before)
        aware = self.results.get("acc_matrix_task_aware")
        if aware is not None and aware[T - 1][0] is not None:
            # task-incremental accuracy (task identity given at test time), beside the class-incremental one
            aware = [row[:T] for row in aware[:T]]
            m["final_acc_task_aware"] = round(final_acc_task_avg(aware), 4)
            la = learning_acc(aware)  # None where tasks are not scored one by one as learned (joint)
            m["learning_acc_task_aware"] = None if la is None else round(la, 4)
        if self.results["retention"] is not None:
            per = [v for v in self.results["retention"]["per_task"] if v is not None]
            m["pretrained_retention"] = per[-1] if per else None
            m["pretrained_retention_initial"] = self.results["retention"]["initial"]
        return m

    def _peak_memory(self):
        if self.device.type == "cuda":
            return int(torch.cuda.max_memory_allocated()), "cuda_max_allocated"
        return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024), "cpu_max_rss"

    def _finish(self) -> None:
        if self._tb is not None:
            self._tb.close()
        self._write_results()
        if dist.is_main():
            step = self.out / "checkpoints" / "step.pt"
            if step.exists():
                step.unlink()
            from .report import write_report

            write_report(self.out)
            self.log(f"wrote {self.out / 'results.json'} and {self.out / 'report.html'}")

    def _write_results(self) -> None:
        if dist.is_main():
            tmp = self.out / "results.json.tmp"
            tmp.write_text(json.dumps(self.results, indent=1))
            tmp.replace(self.out / "results.json")

    # ------------------------------------------------------------------------------------------------
    # checkpoints

    def _ckpt_dir(self) -> Path:
        return self.out / "checkpoints"

    def _model_state(self) -> dict:
        return {"structure": self.model.structure(), "model": changed_state(self.model, self.base_digests)}

    def _load_model_state(self, state: dict) -> None:
        self.model.rebuild(state["structure"])
        self.model.to(self.device)
        missing, unexpected = self.model.load_state_dict(state["model"], strict=False)
        if unexpected:
            raise LoraclError(f"checkpoint does not fit this model (unexpected keys {unexpected[:3]}...)")

    def _save_task(self, task: Task) -> None:
        if not dist.is_main():
            return
        state = {"task": task.index, **self._model_state(), "method": self.method.state_dict(),
                 "results": self.results}
        atomic_save(state, self._ckpt_dir() / f"task_{task.index:02d}.pt")
        step = self._ckpt_dir() / "step.pt"
        if step.exists():
            step.unlink()

    def _save_step(self, task, opt, sched, scaler, epoch, batch, step) -> None:
        if not dist.is_main():
            return
        elapsed = sum(v for k, v in self.phase_seconds.items())
        state = {"task": task.index, "epoch": epoch, "batch": batch, "step": step, **self._model_state(),
                 "optimizer": opt.state_dict(), "scheduler": sched.state_dict(), "scaler": scaler.state_dict(),
                 "rng": torch.get_rng_state(), "flops": self.flops.state_dict(), "method": self.method.state_dict(),
                 "phase_seconds": dict(self.phase_seconds), "elapsed": elapsed}
        atomic_save(state, self._ckpt_dir() / "step.pt")

    def _last_good_checkpoint(self) -> str | None:
        d = self._ckpt_dir()
        if (d / "step.pt").exists():
            return str(d / "step.pt")
        tasks = sorted(d.glob("task_*.pt"))
        return str(tasks[-1]) if tasks else None

    def _restore(self) -> tuple[int, dict | None]:
        """Load the latest task checkpoint (and a later step checkpoint); returns (first task to run, step state)."""
        d = self._ckpt_dir()
        tasks = sorted(d.glob("task_*.pt"))
        start = 0
        if tasks:
            state = load(tasks[-1])
            self._load_model_state(state)
            self.method.load_state_dict(state["method"])
            self.results = state["results"]
            start = state["task"] + 1
            self.log(f"resuming after task {start} from {tasks[-1]}")
        step_state = None
        if (d / "step.pt").exists():
            s = load(d / "step.pt")
            if s["task"] >= start:
                step_state = s
                self.log(f"resuming task {s['task'] + 1} at epoch {s['epoch'] + 1}, batch {s['batch']} "
                         f"from {d / 'step.pt'}")
        if start == 0 and step_state is None:
            self.log("nothing to resume: starting from the beginning")
        return start, step_state


def _retention_set(root: str, classes_tsv: str | None, per_class: int | None = None) -> ImageSet:
    """An image folder whose sub-folders are the pretrained head's classes (mapped by a tsv, else sorted)."""
    from .data.datasets import FileSource, scan_folder

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
