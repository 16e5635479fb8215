"""`loracl bench`: what a continual-learning step costs, measured side by side on one model in one process.

Sections (each returns a plain dict, `render` prints them; new sections plug into `SECTIONS`):

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
  evaluation at the training batch size), both calling the method's own `loss`; their ratio; peak memory.

- `tasks` (`bench_tasks.py`, not in the default): the method's own step at every task count and, for a prompt
  method, the query's cost.

`--json` writes the flat figures of `summary` and the machine. Without the preset's data the bench times
random images (`loracl.data.synthetic`). See docs/performance.md.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import resource
import statistics
import tempfile
import time
from pathlib import Path

import torch

from .data.loader import make_loader
from .errors import LoraclError
from .flops import FlopMeter
from .methods import Batch
from .bench_report import WAYS, machine_info, render, summary


# --------------------------------------------------------------------------------------------------


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def _median_seconds(run, fn, steps: int, warmup: int) -> float:
    """Median seconds of fn() over `steps` calls after `warmup` untimed ones (CUDA synchronised around each)."""
    times = []
    for i in range(warmup + steps):
        _sync(run.device)
        t0 = time.perf_counter()
        fn()
        _sync(run.device)
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _time_steps(run, task, batch, params, steps: int, warmup: int) -> float:
    """Median seconds of one training step (forward, backward, Adam step) on a fixed batch."""
    opt = torch.optim.Adam(params, lr=1e-4)

    def step():
        opt.zero_grad(set_to_none=True)
        with run.services.amp_context():
            loss = run.method.loss(batch, task)
        loss.backward()
        opt.step()

    return _median_seconds(run, step, steps, warmup)


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
                br = s.add_branch(down, up, 1.0, train_down=False, train_up=k == tasks - 1)
            ups.append(br.up)
            if way == "merged":
                for _ in range(tasks - 1):
                    s.merge(0)
        # "official": every task's up @ down summed into a dense d_out x d_in matrix in each forward
        with adapter.dense_sums() if way == "official" else contextlib.nullcontext():
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
                    sec = _time_steps(run, task, batch, params, steps, warmup)
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
    _sync(run.device)
    t1 = time.perf_counter()
    run.services.fit(task, phase="train", images=task.train, epochs=1)
    t2 = time.perf_counter()
    run.method.end_task(task)
    _sync(run.device)
    t3 = time.perf_counter()
    hooks, epoch = (t1 - t0) + (t3 - t2), t2 - t1
    passes = {k: round(v, 3) for k, v in run.record.phase_seconds.items() if k != "train"}  # every pass of the hooks
    return {"images": len(task.train), "begin_task_s": round(t1 - t0, 3), "end_task_s": round(t3 - t2, 3),
            "stats_passes_s": passes, "epoch_s": round(epoch, 3), "epochs": epochs,
            "share": hooks / (hooks + epochs * epoch)}


class ImageCount(FlopMeter):
    """Counts images per phase instead of FLOPs: a run counts FLOPs on one step per phase, the bench's short
    timed phases would be dominated by that instrumented step."""

    def step(self, phase: str, batch_size: int, fn):
        self.by_phase[phase] += batch_size
        return fn()

    def new_phase(self, phase: str) -> None:
        pass


def peak_memory(device) -> tuple[int, str]:
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device)), "cuda_max_allocated"
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024), "cpu_process_max_rss"


def _reset_peak(device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


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
            loss = run.method.loss(Batch(run.data.prepare(x, True), y.to(dev), rows), task)
            loss.backward()
            opt.step()
            total += loss.item()
        return total

    epoch(1, warmup)
    _sync(dev)
    t0 = time.perf_counter()
    epoch(0)
    _sync(dev)
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
    _sync(run.device)
    return time.perf_counter() - t0


def reference_settings(run):
    """The run under the reference's data path and precision (for the method's own passes)."""
    return run.settings(**{"data.pipeline": "pil", "data.eval_batch_size": run.cfg.data.batch_size,
                           "train.amp": "none"})


def _fast_side(run, task, train_images, test_images, stats_task, tasks, rank) -> tuple:
    """loracl: earlier branches merged, one live branch; the Runner's own training loop, evaluation and the
    method's statistics passes, as the config sets them up. (train epoch s, eval s, stats passes s, stats images)"""
    with holding(run, tasks, rank, "merged") as ups:
        params = _trainable(run, task, ups)
        groups = {"backbone": ups, "head": params[len(ups):]}
        # warm-up: decode caches, kernels, compile
        run.trainer.fit(task, phase="bench-warmup", images=train_images, epochs=1, groups=groups, max_steps=2)
        run.record.phase_seconds.clear()
        run.services.fit(task, phase="bench-train", images=train_images, epochs=1, groups=groups)
        train_s = run.record.phase_seconds["bench-train"]
        run.evaluator.accuracy(test_images, task.class_ids)  # warm-up: builds the eval cache
        _sync(run.device)
        t0 = time.perf_counter()
        run.evaluator.accuracy(test_images, task.class_ids)
        eval_s = time.perf_counter() - t0
        stats = stats_pass(run, stats_task)
    return (train_s, eval_s, *stats)


def _reference_side(run, task, train_images, test_images, stats_task, tasks, rank) -> tuple:
    """The naive reference: every branch live and summed dense, fp32, PIL DataLoader, training batch size."""
    with holding(run, tasks, rank, "official") as ups:
        params = _trainable(run, task, ups)
        train_s = reference_train(run, task, train_images, params)
        eval_s = reference_eval(run, test_images, run.data.class_tensor(task.class_ids))
        with reference_settings(run):
            stats = stats_pass(run, stats_task)
    return (train_s, eval_s, *stats)


def throughput(run, task, train_images, test_images, tasks: int, rank: int | None = None, repeats: int = 1) -> dict:
    """Training, evaluation and statistics-pass images/s with `tasks - 1` earlier branches, loracl's path
    (what the config selects) against the naive reference, on the same model in the same process."""
    rank = rank or getattr(run.method.cfg, "rank", 8)
    n_train, n_test = len(train_images), len(test_images)
    out = {"tasks": tasks, "rank": rank, "train_images": n_train, "eval_images": n_test,
           "batch_size": run.cfg.data.batch_size, "eval_batch_size": run.cfg.data.eval_batch_size,
           "pipeline": "tensor" if run.data.tensor_pipeline else "pil", "amp": run.precision.mode,
           "compile": run.cfg.train.compile}
    stats_task = dataclasses.replace(task, train=train_images)

    fast, ref = [], []
    for _ in range(repeats):  # alternated, best of each: other load on the machine hits both sides alike
        _reset_peak(run.device)
        fast.append(_fast_side(run, task, train_images, test_images, stats_task, tasks, rank))
        out["peak_memory_bytes"], out["peak_memory_kind"] = peak_memory(run.device)
        _reset_peak(run.device)
        ref.append(_reference_side(run, task, train_images, test_images, stats_task, tasks, rank))
        out["reference_peak_memory_bytes"], _ = peak_memory(run.device)
    train_s, eval_s, stats_s = (min(x) if x[0] is not None else None for x in list(zip(*fast))[:3])
    ref_train_s, ref_eval_s, ref_stats_s = (min(x) if x[0] is not None else None for x in list(zip(*ref))[:3])
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


SECTIONS = ("stats", "steps", "throughput", "tasks")
DEFAULT_SECTIONS = ("stats", "steps", "throughput")


def _config(args):
    """The run config of the bench: the preset (or file) with the command's overrides."""
    from .config import load_config

    sets = list(args.set or [])
    if args.backbone:  # any timm ViT, random weights: no download, no file, none of the fixture's shape
        sets += [f"backbone.name={args.backbone}", "backbone.kind=timm", "backbone.pretrained=false",
                 "backbone.file=null", "backbone.head_file_key=null", "eval.retention=null",
                 f"backbone.kwargs={{img_size: {args.img_size}}}" if args.img_size else "backbone.kwargs={}",
                 f"backbone.cfg_overlay={{input_size: [3, {args.img_size}, {args.img_size}]}}" if args.img_size
                 else "backbone.cfg_overlay={}"]
    elif args.img_size:
        sets += [f"backbone.kwargs.img_size={args.img_size}", f"backbone.cfg_overlay.input_size=[3, {args.img_size}, "
                 f"{args.img_size}]", "backbone.pretrained=false", "backbone.file=null", "eval.retention=null"]
    if args.batch_size:
        sets.append(f"data.batch_size={args.batch_size}")
    if args.threads:
        sets.append(f"threads={args.threads}")
    sets.append(f"device={args.device or ('cuda' if torch.cuda.is_available() else 'cpu')}")
    return load_config(args.config, preset=None if args.config else args.preset, method=args.method, sets=sets)


def _scenario(cfg, args):
    """The preset's scenario, or random images of the model's input size when its data is absent."""
    from .data.scenarios import build_scenario
    from .data.synthetic import synthetic_scenario

    try:
        return build_scenario(cfg.benchmark, cfg.seed), False
    except (LoraclError, OSError, RuntimeError):
        size = args.img_size or cfg.backbone.kwargs.get("img_size") or 224
        return synthetic_scenario(max(args.tasks), 10, args.images, args.images, int(size)), True


def _first(images, n: int):
    import numpy as np

    return images.subset(np.arange(min(n, len(images))))


def run_bench(args) -> dict:
    from . import bench_tasks
    from .train import Runner

    cfg = _config(args)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    scenario, synthetic = _scenario(cfg, args)
    with tempfile.TemporaryDirectory() as tmp:
        run = Runner(cfg, Path(tmp), progress=False, log=lambda *a, **k: None, scenario=scenario,
                     meter=ImageCount())
        run.method.setup()
        task = run.scenario.tasks[0]
        train, test = _first(task.train, args.images), _first(task.test, args.images)
        res = {"preset": cfg.name, "method": cfg.method_name, "backbone": cfg.backbone.name,
               "img_size": run.model.backbone.data_config()["size"], "device": str(run.device),
               "threads": torch.get_num_threads(), "synthetic_data": synthetic}
        if "stats" in args.sections:
            res["stats"] = stats_share(run, dataclasses.replace(task, train=train), args.epochs)
        else:
            run.trainer.current_task = task
            run.method.begin_task(task)
        if "steps" in args.sections:
            res["steps"] = step_cost(run, task, args.tasks, steps=args.steps, warmup=args.warmup,
                                     repeats=args.repeats)
        if "throughput" in args.sections:
            res["throughput"] = throughput(run, task, train, test, max(args.tasks), repeats=args.repeats)
    if "tasks" in args.sections:  # a fresh run: the method's own state from its first task on
        with tempfile.TemporaryDirectory() as tmp:
            run = Runner(cfg, Path(tmp), progress=False, log=lambda *a, **k: None, scenario=scenario,
                         meter=ImageCount())
            run.method.setup()
            res["tasks"] = bench_tasks.method_steps(run, max(args.tasks), args.images, args.steps, args.warmup)
    res["machine"] = machine_info()
    res["summary"] = summary(res)
    return res


def cmd_bench(args) -> int:
    res = run_bench(args)
    print(render(res))
    if args.json:
        Path(args.json).write_text(json.dumps(res["summary"] | {"sections": {k: res[k] for k in SECTIONS if k in res}},
                                              indent=1))
        print(f"\nwrote {args.json}")
    return 0


def add_parser(sub) -> None:
    b = sub.add_parser("bench", help="measure throughput against a naive reference, step cost across tasks and "
                                     "the statistics passes' share", description=__doc__.split("\n\n")[0])
    b.add_argument("config", nargs="?", help="config YAML (instead of --preset)")
    b.add_argument("--preset", default="cifar100-mini")
    b.add_argument("--method", default="inflora")
    b.add_argument("--backbone", help="any timm ViT name, built with random weights (default: the preset's)")
    b.add_argument("--img-size", type=int, help="model input size (with --backbone, or the preset's ViT)")
    b.add_argument("--device", choices=("cpu", "cuda"), help="default: cuda if available")
    b.add_argument("--images", type=int, default=512, help="training (and evaluation) images to time")
    b.add_argument("--tasks", type=int, nargs="+", default=[1, 10],
                   help="task counts to time a step at; the last is the throughput section's")
    b.add_argument("--steps", type=int, default=10, help="timed steps per measurement (median)")
    b.add_argument("--warmup", type=int, default=2)
    b.add_argument("--repeats", type=int, default=1,
                   help="throughput: measure both sides this many times, alternated, and keep the best")
    b.add_argument("--batch-size", type=int, help="default: the preset's data.batch_size")
    b.add_argument("--epochs", type=int, help="epochs per task for the share (default: the preset's)")
    b.add_argument("--threads", type=int, help="torch CPU threads")
    b.add_argument("--sections", nargs="+", choices=SECTIONS, default=list(DEFAULT_SECTIONS),
                   help="'tasks': the method's own step cost at every task count (not in the default)")
    b.add_argument("--json", metavar="PATH", help="write the figures (and the machine) as JSON")
    b.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a config key (repeatable)")
    b.set_defaults(fn=cmd_bench)
