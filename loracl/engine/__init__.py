"""The rooms of a run, each with one job; `loracl.train.Runner` wires them into the task loop.

    data.py         DataService: transforms, decoded-once sets, batches, training views, class-id mapping
    trainer.py      Precision (decided once) and Trainer: `fit`, `forward_pass`, DDP, divergence checks
    evaluator.py    Evaluator: accuracy rows, the zero-shot row, pretrained retention, cached test sets
    checkpoints.py  CheckpointManager: task and step checkpoints, restore, last good checkpoint
    record.py       RunRecord: results.json, cost and phases, FLOP meter, tensorboard
    services.py     Services: the only object a method sees (`methods.base.RunServices` lists it)
"""
