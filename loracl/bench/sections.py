"""The sections of `loracl bench` (each returns a plain dict; `report.render` prints them):

- `step_cost`: seconds per training step at task 1 and at task N (N - 1 earlier tasks' branches present),
  with the earlier branches merged into the weights (loracl), kept live and summed low-rank
  (`method.merge: false`), and summed as the official InfLoRA forward does (every task's `up @ down`
  materialised as a d x d matrix in each forward). Merged should be flat across tasks.
- `stats_share`: a real task of the method (its `begin_task` and `end_task`, which hold InfLoRA's statistics
  passes, SVDs and memory update, and one training epoch), and the share of a task those hooks take at the
  configured number of epochs.
- `throughput`: training, evaluation and statistics-pass images/s at the last task count, loracl's path (what
  the config selects: merged branches, the Runner's `fit`, its eval batches and data pipeline, amp) against a
  naive reference written as the original code bases train (fp32, PIL DataLoader, every branch summed dense,
  evaluation at the training batch size), both calling the method's own `loss`; their ratio; peak memory. The
  reference runs in a second Runner built under the reference's settings, so the run's own rooms stay as built.
"""

from __future__ import annotations

import contextlib
import dataclasses
import time

import torch

from ..data.loader import make_loader
from ..engine import Batch
from ..errors import LoraclError
from .dense import dense_sums
from .report import WAYS
from .timing import peak_memory, reset_peak, sync, time_steps


def _trainable(run, task, ups) -> list:
    """The live branch's up-projections and the task's head chunk, trainable; everything else frozen."""
    head = list(run.method.param_groups(task)["head"])
    run.model.set_trainable("lora")
    for p in head:
        p.requires_grad_(True)
    return list(ups) + head


@contextlib.contextmanager
def holding(run, tasks: int, rank: int, way: str, seed: int = 0):
    """`tasks` branches of rank `rank` on every adapted projection, the last one live and trainable (zero
    up-projection, as a new InfLoRA branch), held one of three ways: "merged" (the earlier ones folded into W,
    as loracl does), "branches" (kept, summed low-rank) or "official" (kept, summed dense in every forward).
    The same `seed` gives the same branches whichever the way; W is restored on exit."""
    adapter = run.model.adapter
    if adapter is None:
        raise LoraclError(f"loracl bench: method '{run.cfg.method_name}' injects no LoRA; the step and "
                          f"throughput sections time LoRA branches")
    saved = {id(s): s.weight().detach().clone() for s in adapter.sites}
    adapter.clear()
    g = torch.Generator().manual_seed(seed)
    ups = []
    try:
        for s in adapter.sites:
            for k in range(tasks):
                down = torch.linalg.qr(torch.randn(s.d_in, rank, generator=g))[0].t() / 3 ** 0.5
                up = torch.zeros(s.d_out, rank) if k == tasks - 1 else 0.01 * torch.randn(s.d_out, rank, generator=g)
                br = s.add_lora(down, up, tag=f"bench{k}", train_down=False, train_up=k == tasks - 1)
            ups.append(br.up)
            if way == "merged":
                for k in range(tasks - 1):
                    s.merge(f"bench{k}")
        # "official": every task's up @ down summed into a dense d_out x d_in matrix in each forward
        with dense_sums(adapter) if way == "official" else contextlib.nullcontext():
            yield ups
    finally:
        adapter.clear()
        with torch.no_grad():
            for s in adapter.sites:
                s.weight().copy_(saved[id(s)])


def step_cost(run, task, tasks: list[int], steps: int = 10, warmup: int = 2, rank: int | None = None,
              repeats: int = 1) -> dict:
    """Seconds per step at each task count in `tasks`, for the three ways of holding earlier branches; the
    whole sweep runs `repeats` times and each cell keeps its fastest, so other load hits every cell alike."""
    rank = rank or getattr(run.method.cfg, "rank", 8)
    batch = Batch(*next(iter(run.data.batches(task.train, train=True, seed_parts=("bench",)))))
    out = {"batch_size": len(batch.y), "rank": rank, "sites": len(run.model.adapter.sites), "tasks": tasks,
           "seconds": {way: [] for way in WAYS}}
    run.model.train(run.cfg.train.model_mode == "train")
    best = {}
    for _ in range(repeats):
        for t in tasks:
            for way in WAYS:
                with holding(run, t, rank, way, seed=t) as ups:
                    params = _trainable(run, task, ups)
                    sec = time_steps(run, task, batch, params, steps, warmup)
                best[way, t] = min(best.get((way, t), sec), sec)
    for way in WAYS:
        out["seconds"][way] = [best[way, t] for t in tasks]
    return out


def stats_share(run, task, epochs: int | None = None) -> dict:
    """Time a real task of the method: begin_task, one training epoch, end_task."""
    epochs = epochs or run.cfg.epochs_for(task.index)
    run.trainer.current_task = task
    run.record.phase_seconds.clear()  # the passes of this task only
    t0 = time.perf_counter()
    run.method.begin_task(task)
    sync(run.device)
    t1 = time.perf_counter()
    m = run.method
    run.trainer.fit(task, phase="train", images=task.train, epochs=1, groups=m.param_groups(task), loss=m.loss,
                    after_backward=m.after_backward)
    t2 = time.perf_counter()
    run.method.end_task(task)
    sync(run.device)
    t3 = time.perf_counter()
    hooks, epoch = (t1 - t0) + (t3 - t2), t2 - t1
    passes = {k: round(v, 3) for k, v in run.record.phase_seconds.items() if k != "train"}  # every pass of the hooks
    return {"images": len(task.train), "begin_task_s": round(t1 - t0, 3), "end_task_s": round(t3 - t2, 3),
            "stats_passes_s": passes, "epoch_s": round(epoch, 3), "epochs": epochs,
            "share": hooks / (hooks + epochs * epoch)}


def stats_pass(run, task) -> tuple[float | None, int]:
    """The passes over the task that the method makes in `begin_task`: (seconds or None, images)."""
    rec = run.record
    rec.phase_seconds.clear()
    rec.flops.reset()
    run.trainer.current_task = task
    run.method.begin_task(task)
    keys = list(rec.phase_seconds)  # every pass begin_task makes (InfLoRA: statistics; KeepLoRA: gradient)
    if not keys:
        return None, 0
    return sum(rec.phase_seconds[k] for k in keys), int(sum(rec.flops.by_phase[k] for k in keys))


# ---- the naive reference: fp32, PIL DataLoader, every branch summed dense, a host sync per step ----------


def reference_train(run, task, images, params, warmup: int = 2) -> float:
    """Seconds for one epoch over `images` the way the original code bases train: PIL decode and augment in
    a DataLoader, fp32, `loss.item()` every step (their logging). The loss is the method's own."""
    bs, dev = run.cfg.data.batch_size, run.device
    opt = torch.optim.Adam(params, lr=run.cfg.train.optimizer.lr)
    run.model.train(run.cfg.train.model_mode == "train")

    def epoch(seed, limit=None):
        total = 0.0
        for b, (x, y, rows) in enumerate(make_loader(images, run.data.train_tf, bs, seed=seed, shuffle=True,
                                                      num_workers=run.cfg.data.num_workers)):
            if limit is not None and b >= limit:
                break
            opt.zero_grad(set_to_none=True)
            loss = run.method.loss(run.model, Batch(run.data.prepare(x, True), y.to(dev), rows), task)
            loss.backward()
            opt.step()
            total += loss.item()
        return total

    epoch(1, warmup)
    sync(dev)
    t0 = time.perf_counter()
    epoch(0)
    sync(dev)
    return time.perf_counter() - t0


@torch.no_grad()
def reference_eval(run, images, class_ids) -> float:
    """Seconds to score `images` at the training batch size, fp32, PIL loader, predictions to the host per batch."""
    run.model.eval()
    correct = 0
    t0 = time.perf_counter()
    for x, y, _ in make_loader(images, run.data.test_tf, run.cfg.data.batch_size, augment=False,
                               num_workers=run.cfg.data.num_workers):
        pred = class_ids[run.method.logits(run.data.prepare(x, False), class_ids).argmax(-1)]
        correct += int((pred.cpu() == y).sum())
    sync(run.device)
    return time.perf_counter() - t0


def _fast_side(run, task, train_images, test_images, stats_task, tasks, rank) -> tuple:
    """loracl: earlier branches merged, one live branch; the Runner's own training loop, evaluation and the
    method's statistics passes, as the config sets them up. (train epoch s, eval s, stats passes s, stats images)"""
    with holding(run, tasks, rank, "merged") as ups:
        params = _trainable(run, task, ups)
        groups = {"backbone": ups, "head": params[len(ups):]}
        kw = dict(images=train_images, epochs=1, groups=groups, loss=run.method.loss,
                  after_backward=run.method.after_backward)
        run.trainer.fit(task, phase="bench-warmup", max_steps=2, **kw)  # warm-up: decode caches, kernels, compile
        run.record.phase_seconds.clear()
        run.trainer.fit(task, phase="bench-train", **kw)
        train_s = run.record.phase_seconds["bench-train"]
        logits = run.method.logits
        run.evaluator.accuracy(test_images, task.class_ids, logits)  # warm-up: builds the eval cache
        sync(run.device)
        t0 = time.perf_counter()
        run.evaluator.accuracy(test_images, task.class_ids, logits)
        eval_s = time.perf_counter() - t0
        stats = stats_pass(run, stats_task)
    return (train_s, eval_s, *stats)


def _reference_side(ref, task, train_images, test_images, stats_task, tasks, rank) -> tuple:
    """The naive reference, in the Runner built under its settings (PIL pipeline, fp32, evaluation at the
    training batch size): every branch live and summed dense, the original codes' loops."""
    with holding(ref, tasks, rank, "official") as ups:
        params = _trainable(ref, task, ups)
        train_s = reference_train(ref, task, train_images, params)
        eval_s = reference_eval(ref, test_images, ref.data.classes.tensor(task.class_ids))
        stats = stats_pass(ref, stats_task)
    return (train_s, eval_s, *stats)


def throughput(run, ref, task, train_images, test_images, tasks: int, rank: int | None = None,
               repeats: int = 1) -> dict:
    """Training, evaluation and statistics-pass images/s with `tasks - 1` earlier branches, loracl's path
    (what the config selects, in `run`) against the naive reference (in `ref`, the same model and method built
    under the reference's settings), in the same process."""
    rank = rank or getattr(run.method.cfg, "rank", 8)
    n_train, n_test = len(train_images), len(test_images)
    out = {"tasks": tasks, "rank": rank, "train_images": n_train, "eval_images": n_test,
           "batch_size": run.cfg.data.batch_size, "eval_batch_size": run.cfg.data.eval_batch_size,
           "pipeline": "tensor" if run.data.tensor_pipeline else "pil", "amp": run.precision.mode,
           "compile": run.cfg.train.compile}
    stats_task = dataclasses.replace(task, train=train_images)

    fast, refs = [], []
    for _ in range(repeats):  # alternated, best of each: other load on the machine hits both sides alike
        reset_peak(run.device)
        fast.append(_fast_side(run, task, train_images, test_images, stats_task, tasks, rank))
        out["peak_memory_bytes"], out["peak_memory_kind"] = peak_memory(run.device)
        reset_peak(run.device)
        refs.append(_reference_side(ref, task, train_images, test_images, stats_task, tasks, rank))
        out["reference_peak_memory_bytes"], _ = peak_memory(run.device)
    train_s, eval_s, stats_s = (min(x) if x[0] is not None else None for x in list(zip(*fast))[:3])
    ref_train_s, ref_eval_s, ref_stats_s = (min(x) if x[0] is not None else None for x in list(zip(*refs))[:3])
    n_stats = fast[0][3]
    out["train_images_per_s"] = n_train / train_s
    out["reference_train_images_per_s"] = n_train / ref_train_s
    out["speedup"] = out["train_images_per_s"] / out["reference_train_images_per_s"]
    out["eval_images_per_s"] = n_test / eval_s
    out["reference_eval_images_per_s"] = n_test / ref_eval_s
    out["eval_speedup"] = out["eval_images_per_s"] / out["reference_eval_images_per_s"]
    out["stats_images_per_s"] = n_stats / stats_s if stats_s else None
    out["reference_stats_images_per_s"] = n_stats / ref_stats_s if ref_stats_s else None
    out["repeats"] = repeats
    return out


