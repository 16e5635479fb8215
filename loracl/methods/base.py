"""The plug-in contract of a continual-learning method.

A method is one class with a `name`, a typed `Config`, declared capabilities (`caps`), optional named
configurations (`variants`) and hooks the runner calls in this order:

    check()                        refuse what `caps` cannot say (conflicting settings, a missing reference set, ...)
    setup()                        once, before the first task (the model is pretrained and untouched)
    for each task:
        begin_task(task)           statistics passes, new branches, new head classes, what trains
        restore(task)              only after a mid-task resume reloaded the model: rebuild what derives from it
        param_groups(task)         what the optimiser trains: a pure query (default: what the model declares)
        begin_epoch(task, epoch)   before each epoch of the task's training (LAE's calibration epochs)
        loss(net, batch, task)     every training step; `net` is the forward to call (DDP's wrapper under torchrun)
        after_backward(task)       between backward and step (A-GEM's projection)
        end_task(task)             merges, memories, extra training phases (run.fit)
        logits(x, class_ids)       evaluation (with `task=` too only if `caps.task_identity`)
    state_dict() / load_state_dict(state)   everything carried across tasks, for resume

The engine owns data, optimisation, FLOP counting, checkpoints and evaluation and knows no method by name; a
method sees it only through `self.run` (`loracl.engine.RunServices`: model, scenario, batch_size, fit,
forward_pass, memory_batch, seed, classes, cost, evaluate_row, record, log). What trains is declared on the
model (`self.model.set_trainable`), on branches and on owned modules (`self.model.own`), and the model restores
it after a resume.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, ClassVar

import torch
import torch.nn.functional as F
from pydantic import Field, field_validator

from ..config import MethodConfig
from ..engine import Batch, RunServices
from ..models.backbones import PROJECTION_KINDS

if TYPE_CHECKING:
    from ..data.scenarios import Task

SCENARIOS = ("class-incremental", "domain-incremental", "cross-dataset")
BACKBONES = ("timm", "open_clip")


@dataclass(frozen=True)
class Capabilities:
    """What a method runs on and how it behaves, read by the runner, the evaluator and export (none of which
    names a method)."""

    backbones: tuple[str, ...] = BACKBONES
    scenarios: tuple[str, ...] = SCENARIOS
    task_identity: bool = False  # its logits take the task of a test image (task-incremental evaluation)
    joint: bool = False  # trained once on the union of all tasks (the offline upper bound)
    lora: bool = False  # setup injects LoRA (the runner checks it did)
    all_params_every_step: bool = False  # every trained tensor gets a gradient in every step (DDP: no search)
    export: bool = True  # its predictor is the model itself, branches merged: `loracl export` can write it
    text_head: bool = False  # it scores classes against CLIP's text embeddings (head.kind: text, open_clip)


@dataclass(frozen=True)
class Variant:
    """A named configuration of a method, as timm names pretrained configurations of one architecture:
    method-section defaults (`settings`) and run-config defaults (`run`, e.g. alignment on)."""

    doc: str
    settings: dict = field(default_factory=dict)
    run: dict = field(default_factory=dict)


class LoRAOptions(MethodConfig):
    """Where LoRA goes and its shape (every LoRA method shares these keys); `model.inject_lora(cfg)` reads them."""

    rank: int = Field(8, ge=1)
    alpha: float | None = Field(None, description="scale = alpha / rank; None: scale 1")
    targets: list[str] = Field(default_factory=lambda: ["q", "v"], description="q, k, v, out, fc1, fc2")
    blocks: list[int] | None = Field(None, description="block indices (None: all)")
    encoders: list[str] | None = Field(None, description="image and/or text (CLIP); None: all")

    @field_validator("targets")
    @classmethod
    def _known(cls, v):
        bad = [t for t in v if t not in PROJECTION_KINDS]
        if bad:
            raise ValueError(f"unknown LoRA target(s) {bad}; choose from {', '.join(PROJECTION_KINDS)}")
        return v

    @property
    def scale(self) -> float:
        return 1.0 if self.alpha is None else self.alpha / self.rank


class DistillOptions(MethodConfig):
    """ZSCL's distillation of CLIP's image-text scores (cl/distill.py) and its label-smoothed cross-entropy: the keys
    its fine-tuning rows share (lwf, icarl)."""

    temperature: float = Field(2.0, gt=0)
    image_loss: bool = True
    text_loss: bool = True
    label_smoothing: float = Field(0.2, ge=0, lt=1, description="of the cross-entropy (ZSCL's --ls)")


class Method:
    name: ClassVar[str] = ""
    Config: ClassVar[type[MethodConfig]] = MethodConfig
    caps: ClassVar[Capabilities] = Capabilities()
    variants: ClassVar[dict[str, Variant]] = {}

    def __init__(self, cfg: MethodConfig, run: RunServices):
        self.cfg = cfg
        self.run = run
        self.model = run.model

    # ---- hooks -------------------------------------------------------------------------------------
    def check(self) -> None:
        """Refuse a scenario or model this method cannot run on (ConfigError), before anything is built."""

    def setup(self) -> None:
        pass

    def begin_task(self, task: "Task") -> None:
        self.add_task_classes(task)

    def restore(self, task: "Task") -> None:
        """After a mid-task resume rebuilt the model and loaded the method's state: rebuild whatever derives from
        them (caches of branch tensors, ...). begin_task(task) ran before the reload."""

    def param_groups(self, task: "Task") -> dict[str, list[torch.nn.Parameter]]:
        return self.model.param_groups()

    def begin_epoch(self, task: "Task", epoch: int) -> None:
        """Before epoch `epoch` of the task's training phase (also the epoch a mid-task resume continues),
        outside any step: what trains may change here (call `self.run.cost.recount("train")` when it does)."""

    def loss(self, net, batch: Batch, task: "Task") -> torch.Tensor:
        ids = self.run.classes.train(task)
        return self.cross_entropy(net(batch.x, ids), batch.y, ids)

    def after_backward(self, task: "Task") -> None:
        pass

    def end_task(self, task: "Task") -> None:
        pass

    def logits(self, x: torch.Tensor, class_ids: torch.Tensor) -> torch.Tensor:
        return self.model(x, class_ids)

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass

    # ---- helpers shared by methods -----------------------------------------------------------------
    def add_task_classes(self, task: "Task") -> None:
        self.model.head.add_classes(task.class_ids, task.class_names, task.templates)

    def cross_entropy(self, logits: torch.Tensor, y: torch.Tensor, class_ids: torch.Tensor, **kw) -> torch.Tensor:
        """Cross-entropy of logits over `class_ids` against global targets `y` (fp32)."""
        return F.cross_entropy(logits.float(), self.run.classes.columns(y, class_ids), **kw)
