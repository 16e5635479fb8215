"""The rooms of a run, each with one job; `loracl.runs.runner.Runner` wires them into the task loop.

    data.py         DataService: transforms, decoded-once sets, batches, memory batches; ClassIds; Batch
    trainer.py      Precision (decided once) and Trainer: `fit`, `forward_pass`, DDP, divergence checks
    evaluator.py    Evaluator: accuracy rows, the zero-shot row, pretrained retention, NCM scoring
    checkpoints.py  CheckpointManager: task and step checkpoints, restore, last good checkpoint
    record.py       RunRecord: results.json, cost and phases, FLOP meter (flops.py), tensorboard
    services.py     Services: the only object a method sees (the `RunServices` protocol)

The engine knows no method: it imports nothing from `loracl.methods`, and whatever of a method it runs (a loss,
the logits, a state) is handed to it as an argument.
"""

from .data import Batch
from .services import RunServices, Services

__all__ = ["Batch", "RunServices", "Services"]
