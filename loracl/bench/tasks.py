"""`loracl bench --sections tasks`: the method's own training step at every task count, from a fresh run's first
task on, with whatever the method keeps from earlier tasks; for a prompt method also the query forward's cost
and what the query memo saves an evaluation batch. See docs/performance.md."""

from __future__ import annotations

import dataclasses

import torch

from ..engine import Batch
from ..models.prompts import QueryMemo
from .timing import first, median_seconds, time_steps


def method_steps(run, tasks: int, images: int, steps: int, warmup: int) -> dict:
    """The method itself through `tasks` tasks, each its begin_task, `steps` timed training steps on one batch
    and end_task: median seconds per step at every task, with whatever the method keeps from earlier tasks
    (SD-LoRA's frozen directions and magnitudes, O-LoRA's live branches, prompt pools)."""
    seconds = []
    for task in run.scenario.tasks[:tasks]:
        task = dataclasses.replace(task, train=first(task.train, images))
        run.trainer.current_task = task
        run.method.begin_task(task)
        params = [p for ps in run.method.param_groups(task).values() for p in ps if p.requires_grad]
        batch = Batch(*next(iter(run.data.batches(task.train, train=True, seed_parts=("bench", task.index)))))
        run.model.train(run.cfg.train.model_mode == "train")
        seconds.append(time_steps(run, task, batch, params, steps, warmup))
        run.method.end_task(task)
    out = {"tasks": list(range(1, len(seconds) + 1)), "seconds": seconds, "batch_size": len(batch.y)}
    if getattr(run.model, "prompts", None) is not None:
        out["query"] = query_cost(run, batch.x, steps, warmup)
    return out


def query_cost(run, x, steps: int, warmup: int) -> dict:
    """A prompt method's query forward (the frozen model without prompts) alone, as every training step runs
    it, and an evaluation batch (query + prompted forward) with the query computed (an empty memo, as a first
    evaluation) and with it held by the query memo (every evaluation after a task's first)."""
    prompts, backbone = run.model.prompts, run.model.backbone
    ids = run.data.classes.train(run.trainer.current_task)
    run.model.eval()
    with torch.no_grad(), run.precision.context():
        backbone.train(run.cfg.train.model_mode == "train")
        query = median_seconds(run.device, lambda: prompts.query(backbone, x), steps, warmup)
        backbone.eval()
        memo, prompts.memo = prompts.memo, QueryMemo(0)
        try:
            computed = median_seconds(run.device, lambda: run.method.logits(x, ids), steps, warmup)
        finally:
            prompts.memo = memo
        held = median_seconds(run.device, lambda: run.method.logits(x, ids), steps, warmup)
    return {"query_seconds": query, "eval_batch_seconds": computed, "eval_batch_seconds_memo": held}
