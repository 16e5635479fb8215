"""The run loop: tasks in order, each trained by the configured method, evaluated on every task, checkpointed.

It knows no method by name: it calls the method's hooks (see `loracl.methods.base`) and wires the rooms of
`loracl.engine` (data, trainer, evaluator, checkpoints, record); the method sees them through `Services`.
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

from . import dist
from .config import RunConfig, dump_config
from .data.datasets import ImageSet
from .data.loader import derive_seed
from .alignment import ClassifierAlignment
from .data.scenarios import Scenario, Task, build_scenario
from .engine.checkpoints import CheckpointManager
from .engine.data import DataService
from .engine.evaluator import Evaluator
from .engine.record import RunRecord
from .engine.services import Services
from .engine.trainer import Precision, Trainer
from .errors import ConfigError
from .flops import FlopMeter
from .methods import get_method
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
        progress = (sys.stderr.isatty() if progress is None else progress) and dist.is_main()
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        self.resume = resume
        seed_all(derive_seed(cfg.seed, "build"))
        # a scenario given by the caller (synthetic images for `loracl bench`) stands in for cfg.benchmark's
        self.scenario: Scenario = scenario or build_scenario(cfg.benchmark, cfg.seed)
        self.model: ContinualModel = build_model(cfg, self.device)
        self.progress = progress
        cls = get_method(cfg.method_name)
        self.record = RunRecord(cfg, self.scenario, self.out, self.device, meter)
        self.checkpoints = CheckpointManager(self.out, self.model, self.record, self.device, self.log)
        self.services = Services(self.model, self.scenario, self.log, self.record)
        self.method = None
        self._wire(cfg, joint=cls.joint)
        self.method = cls(cls.Config.model_validate({k: v for k, v in cfg.method.items() if k != "name"}),
                          self.services)
        self.trainer.method = self.evaluator.method = self.checkpoints.method = self.method
        # classifier alignment is a step of the classifier, not of a method: any method with linear heads
        self.aligner = ClassifierAlignment(cfg.align, self.services, self.model) if cfg.align.enabled else None
        self.checkpoints.components = {"align": self.aligner} if self.aligner is not None else {}

    def _wire(self, cfg: RunConfig, joint: bool) -> None:
        """The rooms whose behaviour the config's data, precision and training keys set, bound to the services."""
        self.cfg = cfg
        self.data = DataService(cfg, self.device, self.scenario, self.model.backbone.data_config(), joint=joint,
                                log=self.log)
        self.precision = Precision(cfg.train.amp, self.device)
        task = getattr(self, "trainer", None) and self.trainer.current_task
        self.trainer = Trainer(cfg, self.device, self.data, self.record, self.precision, self.checkpoints,
                               progress=self.progress)
        self.trainer.current_task = task
        self.evaluator = Evaluator(cfg, self.model, self.data, self.precision)
        self.trainer.method = self.evaluator.method = self.method
        self.services.bind(cfg, self.data, self.trainer, self.evaluator, self.precision)

    @contextlib.contextmanager
    def settings(self, **sets):
        """Run the block under other config values of the data path, precision or training loop (dotted keys
        as `--set` takes them, e.g. `**{"data.pipeline": "pil", "train.amp": "none"}`); `loracl bench` times its
        naive reference this way. The run's own rooms and their caches come back afterwards."""
        cfg = self.cfg.model_copy(deep=True)
        for key, value in sets.items():
            *path, last = key.split(".")
            section = cfg
            for k in path:
                section = getattr(section, k)
            setattr(section, last, value)
        saved = (self.cfg, self.data, self.precision, self.trainer, self.evaluator)
        self._wire(cfg, joint=self.method.joint)
        try:
            yield
        finally:
            self.cfg, self.data, self.precision, self.trainer, self.evaluator = saved
            self.services.bind(self.cfg, self.data, self.trainer, self.evaluator, self.precision)

    @property
    def results(self) -> dict:
        return self.record.results

    # ------------------------------------------------------------------------------------------------
    # the loop

    def run(self) -> dict:
        self.out.mkdir(parents=True, exist_ok=True)
        cfg_text = dump_config(self.cfg)
        if dist.is_main():
            (self.out / "config.yaml").write_text(cfg_text)
        self.record.open_tensorboard()
        T = len(self.scenario)
        self.method.check()
        seed_all(derive_seed(self.cfg.seed, "setup"))
        self.method.setup()
        if self.method.needs_lora and self.model.adapter is None:
            raise RuntimeError(f"method '{self.method.name}' declares needs_lora but its setup injected no LoRA")
        start, step_state = self.checkpoints.restore() if self.resume else (0, None)
        if self.model.head.zero_shot and not self.method.joint:
            # a zero-shot head scores every dataset from its class names before it is trained on: the upper
            # triangle of the accuracy matrix (MTIL Transfer) and the zero-shot row need all prompts now
            for t in self.scenario.tasks:
                self.method.add_task_classes(t)
        if start == 0:
            if not self.method.joint:
                self.results["acc_before"] = self.evaluator.evaluate_before()
            if self.cfg.eval.retention:
                self.results["retention"] = {"initial": self.evaluator.retention_accuracy(), "per_task": [None] * T}
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
        self.trainer.current_task = task
        self.record.start_task()
        t0 = time.perf_counter()
        with self.record.timed("begin_task"):
            self.method.begin_task(task)
        if resume_state is not None:
            self.checkpoints.resume_task(resume_state)
        self.trainer.fit(task, phase="train", images=task.train, epochs=cfg.epochs_for(t), resume_state=resume_state)
        with self.record.timed("end_task"):
            self.method.end_task(task)
        if self.aligner is not None:
            self.aligner.end_task(task)
        seconds = time.perf_counter() - t0 + (resume_state or {}).get("elapsed", 0.0)
        e0 = time.perf_counter()
        row, aware = self.evaluator.evaluate_row(t)
        if self.results["retention"] is not None and (cfg.eval.retention_every_task or t == T - 1):
            self.results["retention"]["per_task"][t] = self.evaluator.retention_accuracy()
        self.record.task_done(t, row, aware, seconds, time.perf_counter() - e0, self.evaluator.eval_sizes())
        if cfg.eval.ncm and (t == T - 1 or self.method.joint):  # after the task's cost is recorded: not training
            self.results["final_acc_ncm"] = self.evaluator.ncm_accuracy(self.services, t)
            self.results["metrics"]["final_acc_ncm"] = self.results["final_acc_ncm"]
        self.log(self.record.progress_line(t, task.name, seconds, self.method.joint))
        self.checkpoints.save_task(t)
        self.record.write()

    def _finish(self) -> None:
        self.record.close()
        self.record.write()
        if dist.is_main():
            self.checkpoints.drop_step()
            from .report import write_report

            write_report(self.out)
            self.log(f"wrote {self.out / 'results.json'} and {self.out / 'report.html'}")
