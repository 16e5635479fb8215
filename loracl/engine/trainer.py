"""The trainer: every training phase (`fit`) and every pass over data (`forward_pass`) of a run.

One precision policy, decided once per run (`Precision`), serves training, passes and evaluation. The trainer
knows no method: a phase is given its parameter groups and its loss, and hands the loss the forward to call
(`net`: the model, or under torchrun its DDP wrapper, which exists for the length of the phase only).
"""

from __future__ import annotations

import contextlib
import math

import torch
from tqdm.auto import tqdm

from .. import dist
from ..config import OptimizerConfig, RunConfig, ScheduleConfig
from ..data.datasets import ImageSet
from ..data.scenarios import Task
from ..errors import TrainingDiverged
from .data import Batch, DataService
from .record import RunRecord


class Precision:
    """Mixed precision: `train.amp` resolved once ('auto': bf16 on CUDA, none elsewhere)."""

    def __init__(self, amp: str, device: torch.device):
        self.device = device
        self.mode = ("bf16" if device.type == "cuda" else "none") if amp == "auto" else amp

    def context(self):
        if self.mode == "none":
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=torch.bfloat16 if self.mode == "bf16" else torch.float16)

    def scaler(self) -> torch.amp.GradScaler:
        return torch.amp.GradScaler(self.device.type, enabled=self.mode == "fp16")


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
    """A per-step scheduler. `cosine` anneals every step; `cosine-epoch` is torch's CosineAnnealingLR(T_max=E)
    stepped once per epoch, lr_e = lr0 (1 + cos(pi e / E)) / 2 (InfLoRA_CA's code); `inflora-cosine` is the
    official InfLoRA per-epoch rule lr_e = lr0 cos(99 pi e / (200 (E-1)))."""
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
        if cfg.name == "cosine-epoch":
            return 0.5 * (1 + math.cos(math.pi * epoch / epochs))
        if cfg.name == "inflora-cosine":
            return 1.0 if epochs <= 1 else math.cos(99 * math.pi * epoch / (200 * (epochs - 1)))
        if cfg.name == "step":
            return cfg.gamma ** sum(epoch >= m for m in cfg.milestones)
        raise ValueError(cfg.name)

    return torch.optim.lr_scheduler.LambdaLR(opt, factor)


class DivergenceWatch:
    """The first non-finite step, read on the host without waiting for the device: the step's flag is copied
    to pinned host memory asynchronously and read once the copy is done (on a GPU a step or two later; on the
    CPU at once), so training stops right after a divergence instead of at the end of the epoch. Under
    torchrun the processes could see it at different steps and wait on each other's collectives, so there the
    check stays at checkpoints and epoch ends."""

    def __init__(self, device: torch.device):
        self.enabled = not dist.is_dist()
        self.host = torch.full((1,), -1, dtype=torch.long, pin_memory=device.type == "cuda")
        self.view = self.host.numpy()  # the same memory, read without a tensor-to-host conversion
        self.event = torch.cuda.Event() if device.type == "cuda" else None

    def post(self, first_bad: torch.Tensor) -> None:
        if self.enabled:
            self.host.copy_(first_bad.reshape(1), non_blocking=self.event is not None)
            if self.event is not None:
                self.event.record()

    def tripped(self) -> bool:
        if not self.enabled or (self.event is not None and not self.event.query()):
            return False
        return bool(self.view[0] >= 0)


class Trainer:
    def __init__(self, cfg: RunConfig, model: torch.nn.Module, data: DataService, record: RunRecord,
                 precision: Precision, checkpoints, *, find_unused: bool = True, progress: bool = False):
        self.cfg, self.model, self.device, self.data, self.record = cfg, model, data.device, data, record
        self.precision, self.checkpoints, self.progress = precision, checkpoints, progress
        self.find_unused = find_unused  # DDP: search each step's graph for trained parameters without a gradient
        self.current_task: Task | None = None
        self.optimizer_step = None  # while `fit` runs: an extra optimiser step a loss may take (RunServices)

    def forward_pass(self, images: ImageSet, fn, *, desc: str, view: str = "train", grad: bool = False,
                     batch_size: int | None = None, drop_last: bool = False) -> None:
        """Call fn(Batch) over `images` once (statistics, features, gradient estimates), timed and FLOP-counted
        as phase `desc`. `view`: "train" (training transforms), "test", or "stats" (`data.stats_augment` picks:
        InfLoRA's official statistics passes see the training transforms). `drop_last` leaves out a short last
        (global) batch, on every process alike."""
        t = self.current_task.index if self.current_task else -1
        bs = batch_size or self.cfg.data.eval_batch_size
        batches = self.data.batches(images, train=self.data.view(view), seed_parts=("pass", desc, t), shuffle=False,
                                    batch_size=bs, drop_last=drop_last)
        flops = self.record.flops
        flops.new_phase(desc)
        with self.record.timed(desc), torch.set_grad_enabled(grad), self.precision.context():
            for x, y, rows in tqdm(batches, total=self.data.num_batches(images, bs, drop_last), desc=f"  {desc}",
                                   leave=False, disable=not self.progress):
                b = Batch(x, y, rows)
                flops.step(desc, len(y), lambda: fn(b))

    def fit(self, task: Task, *, phase: str, images: ImageSet, epochs: int | None, groups: dict, loss, after_backward=None,
            optimizer: OptimizerConfig | None = None, lr: float | None = None, schedule: ScheduleConfig | None = None,
            batch_size: int | None = None, resume_state: dict | None = None, max_steps: int | None = None,
            save_step=None, begin_epoch=None) -> int:
        """Train the parameters in `groups` ({group name: parameters}) for `epochs` (None: the task's, from
        `train.epochs`) over `images` with `loss(net, batch, task)`; returns the number of steps taken. `after_backward(task)` runs between the
        backward and the optimiser step; `lr` replaces the optimiser's learning rate; `save_step(task, opt,
        sched, scaler, epoch, batch, step)` writes the mid-task checkpoints of `train.checkpoint_every`;
        `max_steps` caps the steps per epoch below `train.max_steps_per_epoch` (the bench's warm-up);
        `begin_epoch(task, epoch)` runs before each epoch's first step (a resumed one too), outside any step."""
        cfg = self.cfg
        epochs = cfg.epochs_for(task.index) if epochs is None else epochs
        params = [p for ps in groups.values() for p in ps if p.requires_grad]
        if phase == "train":
            self.record.trainable_params(task.index, int(sum(p.numel() for p in params)))
        if not params or epochs == 0 or len(images) == 0:
            return 0
        bs = batch_size or cfg.data.batch_size
        optimizer = optimizer or cfg.train.optimizer
        if lr is not None:
            optimizer = optimizer.model_copy(update={"lr": lr})
        opt = build_optimizer(groups, optimizer)
        spe = self.data.num_batches(images, bs)
        for cap in (cfg.train.max_steps_per_epoch, max_steps):
            if cap:
                spe = min(spe, cap)
        sched = build_schedule(opt, schedule or cfg.train.schedule, epochs, spe)
        scaler = self.precision.scaler()
        start_epoch, start_batch, step = 0, 0, 0
        if resume_state is not None:
            opt.load_state_dict(resume_state["optimizer"])
            sched.load_state_dict(resume_state["scheduler"])
            scaler.load_state_dict(resume_state["scaler"])
            start_epoch, start_batch, step = resume_state["epoch"], resume_state["batch"], resume_state["step"]
            torch.set_rng_state(resume_state["rng"])
        first_bad = torch.tensor(-1, device=self.device)
        watch = DivergenceWatch(self.device)
        loss_value = torch.zeros(())

        def optimizer_step(value: torch.Tensor, after=None) -> None:
            """Inside `loss`: backward `value`, call `after()`, one optimiser step, zero the gradients."""
            scaler.scale(value).backward()
            if after is not None:
                after()
            if cfg.train.grad_clip:
                scaler.unscale_(opt)
                torch.nn.utils.clip_grad_norm_(params, cfg.train.grad_clip)
            scaler.step(opt)
            scaler.update()
            opt.zero_grad(set_to_none=True)

        self.optimizer_step = optimizer_step
        flops = self.record.flops
        net = self._data_parallel()
        if cfg.train.compile:
            net = torch.compile(net)
        flops.new_phase(phase)
        model = self.model
        model.train(cfg.train.model_mode == "train")
        bar = tqdm(total=epochs * spe, initial=start_epoch * spe + start_batch, leave=False,
                   desc=f"task {task.index + 1}/{len(self.data.scenario)} {task.name} {phase}",
                   disable=not self.progress)
        try:
            with self.record.timed(phase):
                for epoch in range(start_epoch, epochs):
                    if begin_epoch is not None:
                        begin_epoch(task, epoch)
                    b0 = start_batch if epoch == start_epoch else 0
                    batches = self.data.batches(images, train=True, seed_parts=(task.index, phase, epoch),
                                                batch_size=bs, start=b0, equal_steps=True)
                    for b, (x, y, rows) in enumerate(batches, start=b0):
                        if b >= spe:
                            break
                        batch = Batch(x, y, rows)
                        opt.zero_grad(set_to_none=True)

                        def step_fn():
                            with self.precision.context():
                                value = loss(net, batch, task)
                            scaler.scale(value).backward()
                            return value

                        loss_value = flops.step(phase, len(y), step_fn).detach()
                        finite = torch.isfinite(loss_value)
                        if cfg.train.nan_policy == "skip" and not self._all_finite(finite):
                            opt.zero_grad(set_to_none=True)
                        else:
                            first_bad = torch.where((first_bad < 0) & ~finite,
                                                    torch.tensor(step, device=self.device), first_bad)
                            watch.post(first_bad)
                            if watch.tripped():
                                self._check_finite(first_bad, task, phase, spe)
                            if after_backward is not None:
                                after_backward(task)
                            if cfg.train.grad_clip:
                                scaler.unscale_(opt)
                                torch.nn.utils.clip_grad_norm_(params, cfg.train.grad_clip)
                            scaler.step(opt)
                            scaler.update()
                        sched.step()
                        step += 1
                        bar.update(1)
                        if step % 20 == 0:
                            self.record.scalar(f"loss/{phase}", lambda: float(loss_value), task.index * 1_000_000 + step)
                        every = cfg.train.checkpoint_every
                        if save_step is not None and every and step % every == 0:
                            self._check_finite(first_bad, task, phase, spe)
                            save_step(task, opt, sched, scaler, epoch, b + 1, step)
                    self._check_finite(first_bad, task, phase, spe)
                    bar.set_postfix(loss=f"{float(loss_value):.3f}", refresh=False)
        finally:
            bar.close()
            model.eval()
            self.optimizer_step = None
        return step

    def _data_parallel(self):
        """Under torchrun, training forwards go through DDP (gradients averaged across processes)."""
        model = self.model
        if not dist.is_dist():
            return model
        from torch.nn.parallel import DistributedDataParallel as DDP

        # rebuilt per phase: each task trains a different set of parameters. A method may leave some trainable
        # tensors out of a step; DDP then has to look for them in every step's graph
        return DDP(model, device_ids=[self.device.index] if self.device.type == "cuda" else None,
                   find_unused_parameters=self.find_unused)

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
            last = self.checkpoints.last_good()
            raise TrainingDiverged(
                f"non-finite loss in task {task.index} ('{task.name}'), phase '{phase}', epoch {bad // spe}, "
                f"step {bad % spe} of the epoch (step {bad} of the phase); training stopped. Last good checkpoint: "
                f"{last or 'none'}; lower the learning rate (train.optimizer.lr) or set train.grad_clip")
