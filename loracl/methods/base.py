"""The plug-in contract of a continual-learning method.

A method is one class with a `name`, a typed `Config`, and hooks the runner calls in this order:

    check()                          refuse a scenario or model the method cannot run on
    setup()                          once, before the first task (the model is pretrained and untouched)
    for each task:
        begin_task(task)             statistics passes, new branches, new head classes
        param_groups(task)           what the optimiser trains: {"backbone": [...], "head": [...]}
        loss(batch, task)            every training step (after_backward(task) between backward and step)
        end_task(task)               merges, memories, extra training phases (run.fit)
        logits(x, class_ids)         evaluation

The engine (`loracl.engine`, wired by `loracl.train.Runner`) owns data, optimisation, FLOP counting,
checkpoints and evaluation; it knows no method by name. A method sees it only through `self.run`, an object
with the calls `RunServices` lists. A method that needs its own pass over data uses `run.forward_pass`, and an
extra training phase `run.fit`. Modules a method trains beside the head and the LoRA branches (a cosine head,
prompts, shared magnitudes) are registered with `self.model.own(name, module)`, so DDP averages them and
checkpoints hold them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, ClassVar, Protocol

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field

if TYPE_CHECKING:
    from ..config import OptimizerConfig, RunConfig, ScheduleConfig
    from ..data.datasets import ImageSet
    from ..data.scenarios import Scenario, Task
    from ..models.model import ContinualModel


class RunServices(Protocol):
    """Everything of the run a method may use (`loracl.engine.services.Services` implements it)."""

    cfg: "RunConfig"
    model: "ContinualModel"  # the method's `self.model`
    scenario: "Scenario"
    device: torch.device
    log: Callable[..., None]

    def fit(self, task: "Task", *, phase: str, images: "ImageSet", epochs: int, groups=None, loss_fn=None,
            after_backward=None, optimizer: "OptimizerConfig | None" = None,
            schedule: "ScheduleConfig | None" = None, batch_size: int | None = None) -> int:
        """An extra training phase through the run's loop (FLOPs, precision, progress, DDP)."""

    def forward_pass(self, images: "ImageSet", fn, *, desc: str, train_transform: bool = True,
                     grad: bool = False, batch_size: int | None = None, drop_last: bool = False) -> None:
        """fn(Batch) over `images` once, timed and FLOP-counted as phase `desc`."""

    def amp_context(self): ...
    def timed(self, phase: str): ...
    def count_flops(self, phase: str, batch_size: int, fn): ...
    def recount_flops(self, phase: str) -> None: ...
    def train_classes(self, task: "Task") -> torch.Tensor: ...
    def columns(self, y: torch.Tensor, class_ids: torch.Tensor) -> torch.Tensor: ...
    def class_tensor(self, ids) -> torch.Tensor: ...
    def prepare(self, x: torch.Tensor, train: bool) -> torch.Tensor: ...
    def decoded_rows(self, images: "ImageSet", rows) -> torch.Tensor | None: ...
    def augment(self, u8: torch.Tensor, train: bool, generator, lo: int = 0, total: int | None = None): ...
    @property
    def train_transform(self): ...
    def evaluate_row(self, j: int) -> tuple[list, list | None]: ...
    def record(self, key: str, t: int, value) -> None: ...


class MethodConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")


class LoRAOptions(MethodConfig):
    """Where LoRA goes and its shape (every LoRA method shares these keys)."""

    rank: int = Field(8, ge=1)
    alpha: float | None = Field(None, description="scale = alpha / rank; None: scale 1")
    targets: list[str] = Field(default_factory=lambda: ["q", "v"], description="q, k, v, out, fc1, fc2")
    blocks: list[int] | None = Field(None, description="block indices (None: all)")
    encoders: list[str] | None = Field(None, description="image and/or text (CLIP); None: all")

    @property
    def scale(self) -> float:
        return 1.0 if self.alpha is None else self.alpha / self.rank


@dataclass
class Batch:
    x: torch.Tensor
    y: torch.Tensor  # global class ids
    rows: torch.Tensor  # row of each sample in the task's training ImageSet


class Method:
    name: ClassVar[str] = ""
    Config: ClassVar[type[MethodConfig]] = MethodConfig
    joint: ClassVar[bool] = False  # True: trained once on the union of all tasks (offline upper bound)
    needs_lora: ClassVar[bool] = False  # True: `setup` must inject LoRA (the runner checks it did)
    # True: every parameter a phase trains gets a gradient in every step, so DDP need not search the graph for
    # unused ones each step (tests/test_distributed.py runs each method that says so under torchrun)
    uses_all_trained_params: ClassVar[bool] = False

    def __init__(self, cfg: MethodConfig, run: RunServices):
        self.cfg = cfg
        self.run = run
        self.model = run.model
        self.net = run.model  # what training forwards go through (a DDP wrapper under torchrun)

    # ---- hooks -------------------------------------------------------------------------------------
    def check(self) -> None:
        """Refuse a scenario or model this method cannot run on (ConfigError), before anything is built."""

    def setup(self) -> None:
        pass

    def begin_task(self, task: "Task") -> None:
        self.add_task_classes(task)

    def param_groups(self, task: "Task") -> dict[str, list[torch.nn.Parameter]]:
        head = [p for p in self.model.head.parameters() if p.requires_grad]
        back = [p for p in self.model.backbone.parameters() if p.requires_grad]
        return {"backbone": back, "head": head}

    def loss(self, batch: Batch, task: "Task") -> torch.Tensor:
        return self.cross_entropy(batch, self.run.train_classes(task))

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

    def cross_entropy(self, batch: Batch, class_ids: torch.Tensor) -> torch.Tensor:
        return self.logits_loss(self.net(batch.x, class_ids), batch.y, class_ids)

    def logits_loss(self, logits: torch.Tensor, y: torch.Tensor, class_ids: torch.Tensor, **kw) -> torch.Tensor:
        """Cross-entropy of logits over `class_ids` against global targets `y` (fp32)."""
        return F.cross_entropy(logits.float(), self.run.columns(y, class_ids), **kw)
