"""The services object a method holds as `self.run`: the only way a method reaches the engine.

`RunServices` is the contract, twelve members: three values, seven verbs and two small groups. Everything else of
the engine (caches, checkpoints, the results record, the config) stays out of a method's reach.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable, Protocol

import numpy as np

from ..data.loader import derive_seed
from .data import Batch, ClassIds

if TYPE_CHECKING:
    import torch

    from ..config import OptimizerConfig, ScheduleConfig
    from ..data.datasets import ImageSet
    from ..data.scenarios import Scenario, Task
    from ..models.model import ContinualModel
    from .data import DataService
    from .evaluator import Evaluator
    from .record import RunRecord
    from .trainer import Precision, Trainer


class RunServices(Protocol):
    """What a method may use of the run it is part of."""

    model: "ContinualModel"  # the model it trains (`self.model`; its device: `model.device`)
    scenario: "Scenario"  # every task, with its classes and images
    batch_size: int  # the training batch size (`data.batch_size`)
    classes: ClassIds  # `train(task)`: the loss's classes; `tensor(ids)`; `columns(y, ids)`
    cost: "Cost"  # `timed(phase)`, `counted(phase, n, fn)`, `recount(phase)`: seconds and FLOPs of own work

    def fit(self, task: "Task", *, phase: str, images: "ImageSet", epochs: int | None, groups: dict, loss,
            after_backward=None, optimizer: "OptimizerConfig | None" = None, lr: float | None = None,
            schedule: "ScheduleConfig | None" = None, batch_size: int | None = None) -> int:
        """An extra training phase through the run's loop (FLOPs, precision, progress, DDP): `loss(net, batch,
        task)` over `images`, training `groups`, for `epochs` (None: the task's)."""

    def optimizer_step(self, loss: torch.Tensor, after=None) -> None:
        """Only inside `loss` during `fit`: backward `loss`, call `after()` (a gradient edit), take one step of
        fit's optimiser and zero the gradients: a second update per batch before the loss `loss` returns
        (CL-LoRA's distillation step). Its forwards are the method's own (not through DDP)."""

    def forward_pass(self, images: "ImageSet", fn: Callable[[Batch], None], *, desc: str, view: str = "train",
                     grad: bool = False, batch_size: int | None = None, drop_last: bool = False) -> None:
        """fn(Batch) over `images` once, timed and FLOP-counted as phase `desc`; `view` train, test or stats."""

    def memory_batch(self, memory, rows: np.ndarray, keep: slice = slice(None)) -> Batch:
        """Rows of an episodic memory (`cl.memory.EpisodicMemory`) as a training batch, with training views."""

    def seed(self, *parts) -> int:
        """A seed derived from the run's seed and `parts` (the same after a resume, on every process)."""

    def evaluate_row(self, j: int, logits) -> tuple[list, list | None]:
        """The accuracy matrix's row after task j, scored by `logits(x, class_ids)`."""

    def record(self, key: str, t: int, value) -> None:
        """A per-task value beside the standard results (results.json: method_extras[key][t])."""

    def log(self, *args) -> None: ...


class Cost:
    """Seconds and FLOPs of work a method does outside `fit` and `forward_pass`."""

    def __init__(self, record: "RunRecord", precision: "Precision"):
        self._record, self._precision = record, precision

    def timed(self, phase: str):
        """Add the seconds of the block to `phase`."""
        return self._record.timed(phase)

    def counted(self, phase: str, batch_size: int, fn, replicated: bool = False):
        """Run fn() under the run's precision as one step of `phase` on `batch_size` samples, its FLOPs counted;
        returns fn's result. `replicated`: under torchrun every process runs this same step (not a share of a
        global batch), so it counts once, not once per process."""
        with self._precision.context():
            return self._record.flops.step(phase, batch_size, fn, replicated)

    def recount(self, phase: str) -> None:
        """The steps of `phase` change cost from now on (a replay batch grew): count anew."""
        self._record.flops.new_phase(phase)


class Services:
    """The run's services for its method, bound once to the rooms the runner built."""

    def __init__(self, model: "ContinualModel", scenario: "Scenario", log, record: "RunRecord", data: "DataService",
                 trainer: "Trainer", evaluator: "Evaluator", precision: "Precision"):
        self.model, self.scenario, self.log = model, scenario, log
        self.batch_size = data.cfg.data.batch_size
        self.classes = data.classes
        self.cost = Cost(record, precision)
        self._seed = data.cfg.seed
        self._record, self._data, self._trainer, self._evaluator = record, data, trainer, evaluator

    def fit(self, task, **kw) -> int:
        return self._trainer.fit(task, **kw)

    def optimizer_step(self, loss, after=None) -> None:
        if self._trainer.optimizer_step is None:
            raise RuntimeError("optimizer_step is only available inside a loss that fit is running")
        self._trainer.optimizer_step(loss, after)

    def forward_pass(self, images, fn, **kw) -> None:
        return self._trainer.forward_pass(images, fn, **kw)

    def memory_batch(self, memory, rows, keep: slice = slice(None)) -> Batch:
        return self._data.memory_batch(memory, rows, keep)

    def seed(self, *parts) -> int:
        return derive_seed(self._seed, *parts)

    def evaluate_row(self, j: int, logits):
        return self._evaluator.evaluate_row(j, logits)

    def record(self, key: str, t: int, value) -> None:
        self._record.extra(key, t, value)
