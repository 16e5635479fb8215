"""The services object a method holds as `self.run`: the only way a method reaches the engine.

It implements `loracl.methods.base.RunServices`; everything else of the engine (caches, checkpoints, the
results record) stays out of a method's reach.
"""

from __future__ import annotations

from ..config import RunConfig
from ..data.scenarios import Scenario
from ..models.model import ContinualModel
from .data import DataService
from .evaluator import Evaluator
from .record import RunRecord
from .trainer import Precision, Trainer


class Services:
    def __init__(self, model: ContinualModel, scenario: Scenario, log, record: RunRecord):
        self.model, self.scenario, self.log, self._record = model, scenario, log, record

    def bind(self, cfg: RunConfig, data: DataService, trainer: Trainer, evaluator: Evaluator,
             precision: Precision) -> None:
        """The rooms the runner wired for `cfg` (again under `Runner.settings`)."""
        self.cfg, self.device = cfg, data.device
        self._data, self._trainer, self._evaluator, self._precision = data, trainer, evaluator, precision

    # ---- training and passes -------------------------------------------------------------------------
    def fit(self, task, **kw) -> int:
        return self._trainer.fit(task, **kw)

    def forward_pass(self, images, fn, **kw) -> None:
        return self._trainer.forward_pass(images, fn, **kw)

    def amp_context(self):
        return self._precision.context()

    def timed(self, phase: str):
        return self._record.timed(phase)

    def count_flops(self, phase: str, batch_size: int, fn):
        """Run fn() as one step of `phase` on `batch_size` samples, its FLOPs counted; returns fn's result."""
        return self._record.flops.step(phase, batch_size, fn)

    def recount_flops(self, phase: str) -> None:
        """The steps of `phase` change cost from now on (a branch added, a replay batch grew): count anew."""
        self._record.flops.new_phase(phase)

    # ---- class ids -----------------------------------------------------------------------------------
    def train_classes(self, task):
        return self._data.train_classes(task)

    def columns(self, y, class_ids):
        return self._data.columns(y, class_ids)

    def class_tensor(self, ids):
        return self._data.class_tensor(ids)

    # ---- images outside the training loop (replay memories) -----------------------------------------
    def prepare(self, x, train: bool):
        return self._data.prepare(x, train)

    def decoded_rows(self, images, rows):
        return self._data.decoded_rows(images, rows)

    def augment(self, u8, train: bool, generator, lo: int = 0, total: int | None = None):
        return self._data.augment(u8, train, generator, lo, total)

    @property
    def train_transform(self):
        """The PIL training transform (geometric part, to uint8)."""
        return self._data.train_tf

    # ---- evaluation and results ----------------------------------------------------------------------
    def evaluate_row(self, j: int):
        return self._evaluator.evaluate_row(j)

    def record(self, key: str, t: int, value) -> None:
        """A per-task value beside the standard results (results.json: method_extras[key][t])."""
        self._record.extra(key, t, value)
