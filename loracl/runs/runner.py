"""The run loop: tasks in order, each trained by the configured method, evaluated on every task, checkpointed.

The runner is the one place that knows both sides: it looks the method up in the registry, builds the rooms of
`loracl.engine` once (data, trainer, evaluator, checkpoints, record) and the services the method sees, then calls
the method's hooks and hands the rooms what they need of the method (its loss, its logits, its state) as
arguments. It knows no method by name; what differs between methods is in their declared capabilities.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

from .. import dist
from ..cl.alignment import ClassifierAlignment
from ..config import RunConfig
from ..data.datasets import ImageSet
from ..data.loader import derive_seed
from ..data.scenarios import Scenario, Task, build_scenario, carve_validation
from ..engine import Services
from ..engine.checkpoints import CheckpointManager
from ..engine.data import DataService
from ..engine.evaluator import Evaluator
from ..engine.flops import FlopMeter
from ..engine.record import RunRecord
from ..engine.trainer import Precision, Trainer
from ..errors import ConfigError
from ..methods import lookup
from ..models.model import ContinualModel, build_model
from .assembly import dump_config
from .files import write_file


def seed_all(seed: int) -> None:
    import random

    random.seed(seed)
    np.random.seed(seed % (2 ** 32))
    torch.manual_seed(seed)


def pick_device(name: str) -> torch.device:
    if name == "cuda" or (name == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise ConfigError("device 'cuda' requested but CUDA is not available on this machine")
        if dist.is_dist() or "LOCAL_RANK" in os.environ:
            return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        return torch.device("cuda")
    return torch.device("cpu")


class Runner:
    def __init__(self, cfg: RunConfig, out_dir: str | Path, *, resume: bool = False, progress: bool | None = None,
                 log=print, scenario: Scenario | None = None, meter: FlopMeter | None = None):
        self.cfg = cfg
        self.out = Path(out_dir)
        self.device = pick_device(cfg.device)
        dist.init_from_env(self.device)
        self.log = log if dist.is_main() else (lambda *a, **k: None)
        self.progress = (sys.stderr.isatty() if progress is None else progress) and dist.is_main()
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        self.resume = resume
        cls = lookup(cfg.method_name).cls
        self.caps = cls.caps
        seed_all(derive_seed(cfg.seed, "build"))
        # a scenario given by the caller (synthetic images for `loracl bench`) stands in for cfg.benchmark's
        self.scenario: Scenario = scenario or build_scenario(cfg.benchmark, cfg.seed)
        if cfg.data.val_fraction > 0 and self.scenario.tasks[0].val is None:
            carve_validation(self.scenario, cfg.data.val_fraction, cfg.seed)
        self.check_capabilities(cls)
        self.model: ContinualModel = build_model(cfg, self.device)
        find_unused = cfg.train.ddp_find_unused
        find_unused = (not self.caps.all_params_every_step) if find_unused is None else find_unused
        self.record = RunRecord(cfg, self.scenario, self.out, self.device, meter)
        self.checkpoints = CheckpointManager(self.out, self.model, self.record, self.device, self.log,
                                             keep=cfg.train.keep_checkpoints)
        self.data = DataService(cfg, self.device, self.scenario, self.model.backbone.data_config(),
                                joint=self.caps.joint, log=self.log)
        self.precision = Precision(cfg.train.amp, self.device)
        self.trainer = Trainer(cfg, self.model, self.data, self.record, self.precision, self.checkpoints,
                               find_unused=find_unused, progress=self.progress)
        self.evaluator = Evaluator(cfg, self.model, self.data, self.precision, task_identity=self.caps.task_identity)
        self.services = Services(self.model, self.scenario, self.log, self.record, self.data, self.trainer,
                                 self.evaluator, self.precision)
        self.method = cls(cfg.method, self.services)
        # classifier alignment is a step of the classifier, not of a method: any method with linear heads
        self.aligner = ClassifierAlignment(cfg.align, self.services, self.model) if cfg.align.enabled else None

    def check_capabilities(self, cls) -> None:
        """What the method declares it runs on, and per-task settings that must cover every task, before
        anything is built or trained."""
        caps, cfg, name = cls.caps, self.cfg, self.cfg.method_name
        if self.scenario.kind not in caps.scenarios:
            raise ConfigError(f"method '{name}' runs on {' / '.join(caps.scenarios)} scenarios, not on "
                              f"{self.scenario.kind} ({cfg.benchmark.name})")
        if cfg.backbone.kind not in caps.backbones:
            raise ConfigError(f"method '{name}' runs on {' / '.join(caps.backbones)} backbones, not "
                              f"{cfg.backbone.kind} (backbone.kind)")
        if caps.text_head and cfg.head.kind != "text":
            raise ConfigError(f"method '{name}' scores classes against CLIP's text embeddings: it needs head.kind: "
                              f"text with an open_clip backbone, not head.kind: {cfg.head.kind}")
        epochs = cfg.train.epochs
        if isinstance(epochs, list) and len(epochs) < len(self.scenario):
            raise ConfigError(f"train.epochs lists {len(epochs)} entries but {cfg.benchmark.name} has "
                              f"{len(self.scenario)} tasks; give one per task, or one number")

    @property
    def results(self) -> dict:
        return self.record.results

    # ------------------------------------------------------------------------------------------------
    # the loop

    def run(self) -> dict:
        self.out.mkdir(parents=True, exist_ok=True)
        cfg_text = dump_config(self.cfg)
        if dist.is_main():
            write_file(self.out / "config.yaml", cfg_text, root=self.out)
        self.record.open_tensorboard()
        T = len(self.scenario)
        start, step_state = self.prepare()
        if start == 0:
            if not self.caps.joint:
                self.results["acc_before"] = self.evaluator.evaluate_before(self.method.logits)
            if self.cfg.eval.retention:
                self.results["retention"] = {"initial": self.evaluator.retention_accuracy(), "per_task": [None] * T}
        self.log(f"loracl: {self.cfg.method_name} on {self.cfg.benchmark.name} ({self.scenario.kind}, {T} tasks), "
                 f"seed {self.cfg.seed}, device {self.device}; output {self.out}")
        if self.caps.joint:
            tasks = [self._joint_task()] if start < T else []
        else:
            tasks = self.scenario.tasks[start:]
        for task in tasks:
            resume = step_state if (step_state is not None and step_state["task"] == task.index) else None
            self._run_task(task, resume)
        self.results["status"] = "complete"
        self._finish()
        return self.results

    def prepare(self, resume: bool | None = None) -> tuple[int, dict | None]:
        """check, setup and (when resuming) the newest checkpoint restored into the model, the method and the
        alignment; returns (first task to run, step state of an interrupted task or None). `loracl predict`
        stops here, with the finished run's final state."""
        self.method.check()
        seed_all(derive_seed(self.cfg.seed, "setup"))
        self.method.setup()
        if self.caps.lora and self.model.adapter is None:
            raise RuntimeError(f"method '{self.method.name}' declares lora but its setup injected no LoRA")
        resume = self.resume if resume is None else resume
        start, state, step_state = self.checkpoints.restore() if resume else (0, None, None)
        if state is not None:
            self.method.load_state_dict(state["method"])
            if self.aligner is not None:
                self.aligner.load_state_dict(state.get("components", {})["align"])
        if self.model.head.zero_shot and not self.caps.joint:
            # a zero-shot head scores every dataset from its class names before it is trained on: the upper
            # triangle of the accuracy matrix (MTIL Transfer) and the zero-shot row need all prompts now (a
            # restored head already holds them)
            for t in self.scenario.tasks:
                if not self.model.head.knows(t.class_ids):
                    self.method.add_task_classes(t)
        return start, step_state

    def _joint_task(self) -> Task:
        tasks = self.scenario.tasks
        for t in tasks:  # register every task's classes with its own prompts
            self.method.add_task_classes(t)
        last = tasks[-1]
        ids = self.scenario.seen_classes(len(tasks) - 1)
        names = [self.scenario.class_names[i] for i in ids]
        val = ImageSet.concat([t.val for t in tasks]) if last.val is not None else None
        return Task(last.index, "joint", ids, names, ImageSet.concat([t.train for t in tasks]),
                    ImageSet.concat([t.test for t in tasks]), last.templates, "joint", val=val)

    def _components(self) -> dict:
        return {"align": self.aligner.state_dict()} if self.aligner is not None else {}

    def _save_step(self, task, opt, sched, scaler, epoch, batch, step) -> None:
        self.checkpoints.save_step(task, opt, sched, scaler, epoch, batch, step, self.method.state_dict())

    def _run_task(self, task: Task, resume_state: dict | None) -> None:
        cfg, t, T, method = self.cfg, task.index, len(self.scenario), self.method
        seed_all(derive_seed(cfg.seed, "task", t))
        self.trainer.current_task = task
        self.record.start_task()
        t0 = time.perf_counter()
        with self.record.timed("begin_task"):
            method.begin_task(task)
        if resume_state is not None:
            self.checkpoints.resume_task(resume_state)
            if "method" in resume_state:  # state a method changes during training (a reservoir memory)
                method.load_state_dict(resume_state["method"])
            method.restore(task)
        self.trainer.fit(task, phase="train", images=task.train, epochs=cfg.epochs_for(t),
                         groups=method.param_groups(task), loss=method.loss, after_backward=method.after_backward,
                         resume_state=resume_state, save_step=self._save_step, begin_epoch=method.begin_epoch)
        with self.record.timed("end_task"):
            method.end_task(task)
        if self.aligner is not None:
            self.aligner.end_task(task)
        seconds = time.perf_counter() - t0 + (resume_state or {}).get("elapsed", 0.0)
        e0 = time.perf_counter()
        row, aware = self.evaluator.evaluate_row(t, method.logits)
        if self.results["retention"] is not None and (cfg.eval.retention_every_task or t == T - 1):
            self.results["retention"]["per_task"][t] = self.evaluator.retention_accuracy()
        self.record.task_done(t, row, aware, seconds, time.perf_counter() - e0, self.evaluator.eval_sizes())
        if task.val is not None:  # data.val_fraction: the same row on validation images (what selection may use)
            vrow, vaware = self.evaluator.evaluate_row(t, method.logits, split="val")
            self.record.val_done(t, vrow, vaware, self.evaluator.eval_sizes("val"))
        if cfg.eval.ncm and (t == T - 1 or self.caps.joint):  # after the task's cost is recorded: not training
            self.results["final_acc_ncm"] = self.evaluator.ncm_accuracy(self.services, t)
            self.results["metrics"]["final_acc_ncm"] = self.results["final_acc_ncm"]
        self.log(self.record.progress_line(t, task.name, seconds, self.caps.joint))
        self.checkpoints.save_task(t, method.state_dict(), self._components())
        self.record.write()

    def _finish(self) -> None:
        self.record.close()
        self.record.write()
        if dist.is_main():
            self.checkpoints.drop_step()
            from ..results.report import write_report

            write_report(self.out)
            self.log(f"wrote {self.out / 'results.json'} and {self.out / 'report.html'}")
