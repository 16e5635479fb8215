"""The `loracl bench` command: its config and scenario, the sections it runs, and `--json`.

Without the preset's data the bench times random images (`loracl.data.synthetic`). See docs/performance.md.
"""

from __future__ import annotations

import dataclasses
import json
import tempfile
from pathlib import Path

import torch

from ..errors import LoraclError
from .report import machine_info, render, summary
from .sections import stats_share, step_cost, throughput
from .tasks import method_steps
from .timing import ImageCount, first

SECTIONS = ("stats", "steps", "throughput", "tasks")
DEFAULT_SECTIONS = ("stats", "steps", "throughput")


def _config(args):
    """The run config of the bench: the preset (or file) with the command's overrides."""
    from ..runs.assembly import load_config

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
    from ..data.scenarios import build_scenario
    from ..data.synthetic import synthetic_scenario

    try:
        return build_scenario(cfg.benchmark, cfg.seed), False
    except (LoraclError, OSError, RuntimeError):
        size = args.img_size or cfg.backbone.kwargs.get("img_size") or 224
        return synthetic_scenario(max(args.tasks), 10, args.images, args.images, int(size)), True


def _runner(cfg, out: Path, scenario):
    from ..runs.runner import Runner

    run = Runner(cfg, out, progress=False, log=lambda *a, **k: None, scenario=scenario, meter=ImageCount())
    run.method.setup()
    return run


def reference_config(cfg):
    """The naive reference's settings: PIL pipeline, fp32, evaluation at the training batch size."""
    return cfg.model_copy(update={
        "data": cfg.data.model_copy(update={"pipeline": "pil", "eval_batch_size": cfg.data.batch_size}),
        "train": cfg.train.model_copy(update={"amp": "none"})})


def run_bench(args) -> dict:
    cfg = _config(args)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    scenario, synthetic = _scenario(cfg, args)
    with tempfile.TemporaryDirectory() as tmp:
        run = _runner(cfg, Path(tmp) / "run", scenario)
        task = run.scenario.tasks[0]
        train, test = first(task.train, args.images), first(task.test, args.images)
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
            ref = _runner(reference_config(cfg), Path(tmp) / "reference", scenario)
            ref.trainer.current_task = task
            ref.method.begin_task(task)
            res["throughput"] = throughput(run, ref, task, train, test, max(args.tasks), repeats=args.repeats)
    if "tasks" in args.sections:  # a fresh run: the method's own state from its first task on
        with tempfile.TemporaryDirectory() as tmp:
            run = _runner(cfg, Path(tmp), scenario)
            res["tasks"] = method_steps(run, max(args.tasks), args.images, args.steps, args.warmup)
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
                                     "the statistics passes' share",
                       description="What a continual-learning step costs, measured side by side on one model in "
                                   "one process (docs/performance.md).")
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
