"""`loracl bench`: what a continual-learning step costs, measured side by side on one model in one process.

Sections (each returns a plain dict, `render` prints them; new sections plug into `SECTIONS`):

- `step_cost`: seconds per training step at task 1 and at task N (N - 1 earlier tasks' branches present),
  with the earlier branches merged into the weights (loracl), kept live and summed low-rank
  (`method.merge: false`), and summed as the official InfLoRA forward does (every task's `up @ down`
  materialised as a d x d matrix in each forward). Merged should be flat across tasks.
- `stats_share`: a real task of the method (its `begin_task` and `end_task`, which hold InfLoRA's statistics
  passes, SVDs and memory update, and one training epoch), and the share of a task those hooks take at the
  configured number of epochs.
"""

from __future__ import annotations

import contextlib
import statistics
import tempfile
import time
import types
from pathlib import Path

import torch
import torch.nn.functional as F

from .errors import LoraclError
from .methods import Batch


# --------------------------------------------------------------------------------------------------
# the official InfLoRA forward, for comparison: sum every task's branch into a dense d_out x d_in matrix


def _dense_apply(layer, x, out):
    for tap in list(layer.taps.values()):
        tap(x)
    if not layer.active:
        return out
    for name, branches in layer.branches.items():
        if len(branches) == 0:
            continue
        a, b = layer.slices[name]
        delta_w = torch.stack([br.scale * (br.up @ br.down) for br in branches]).sum(0)
        delta = F.linear(x.to(delta_w.dtype) if not torch.is_autocast_enabled() else x, delta_w).to(out.dtype)
        out = torch.cat([out[..., :a], out[..., a:b] + delta, out[..., b:]], dim=-1)
    return out


@contextlib.contextmanager
def official_forward(adapter):
    """Within the block, adapted layers sum their branches as the official InfLoRA code does."""
    for layer in adapter.layers:
        layer.apply_branches = types.MethodType(_dense_apply, layer)
    try:
        yield
    finally:
        for layer in adapter.layers:
            del layer.apply_branches


# --------------------------------------------------------------------------------------------------


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def _time_steps(run, task, batch, params, steps: int, warmup: int) -> float:
    """Median seconds of one training step (forward, backward, Adam step) on a fixed batch."""
    method = run.method
    opt = torch.optim.Adam(params, lr=1e-4)
    times = []
    for i in range(warmup + steps):
        _sync(run.device)
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        with run.amp_context():
            loss = method.loss(batch, task)
        loss.backward()
        opt.step()
        _sync(run.device)
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


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
        with official_forward(adapter) if way == "official" else contextlib.nullcontext():
            yield ups
    finally:
        adapter.clear()
        with torch.no_grad():
            for s in adapter.sites:
                s.weight().copy_(saved[id(s)])


WAYS = {"merged": "merged into W (loracl)", "branches": "kept, summed low-rank",
        "official": "kept, summed dense (official code)"}


def step_cost(run, task, tasks: list[int], steps: int = 10, warmup: int = 2, rank: int | None = None) -> dict:
    """Seconds per step at each task count in `tasks`, for the three ways of holding earlier branches."""
    rank = rank or getattr(run.method.cfg, "rank", 8)
    batch = Batch(*next(iter(run.batches(task.train, train=True, seed_parts=("bench",)))))
    out = {"batch_size": len(batch.y), "rank": rank, "sites": len(run.model.adapter.sites), "tasks": tasks,
           "seconds": {way: [] for way in WAYS}}
    run.model.train(run.cfg.train.model_mode == "train")
    for t in tasks:
        for way in WAYS:
            with holding(run, t, rank, way, seed=t) as ups:
                params = _trainable(run, task, ups)
                out["seconds"][way].append(_time_steps(run, task, batch, params, steps, warmup))
    return out


def stats_share(run, task, epochs: int | None = None) -> dict:
    """Time a real task of the method: begin_task, one training epoch, end_task."""
    epochs = epochs or run.cfg.epochs_for(task.index)
    run.current_task = task
    t0 = time.perf_counter()
    run.method.begin_task(task)
    _sync(run.device)
    t1 = time.perf_counter()
    run.fit(task, phase="train", images=task.train, epochs=1)
    t2 = time.perf_counter()
    run.method.end_task(task)
    _sync(run.device)
    t3 = time.perf_counter()
    hooks, epoch = (t1 - t0) + (t3 - t2), t2 - t1
    passes = {k: round(v, 3) for k, v in run.phase_seconds.items() if k.startswith("stats")}
    return {"images": len(task.train), "begin_task_s": round(t1 - t0, 3), "end_task_s": round(t3 - t2, 3),
            "stats_passes_s": passes, "epoch_s": round(epoch, 3), "epochs": epochs,
            "share": hooks / (hooks + epochs * epoch)}


SECTIONS = ("stats", "steps")


def render(res: dict) -> str:
    lines = [f"loracl bench: {res['method']} on {res['preset']} ({res['backbone']}), device {res['device']}, "
             f"{res['threads']} CPU threads"]
    if "stats" in res:
        s = res["stats"]
        lines += ["", f"statistics passes and memory update (task 1, {s['images']} training images):",
                  f"  begin_task {s['begin_task_s']:.2f} s + end_task {s['end_task_s']:.2f} s "
                  f"(passes {', '.join(f'{k} {v:.2f} s' for k, v in s['stats_passes_s'].items())}); "
                  f"one epoch {s['epoch_s']:.2f} s",
                  f"  share of a task at {s['epochs']} epochs: {100 * s['share']:.1f}%"]
        for e in (20, 50):
            if e != s["epochs"]:
                h = s["begin_task_s"] + s["end_task_s"]
                lines.append(f"  share at {e} epochs (same per-epoch cost): {100 * h / (h + e * s['epoch_s']):.1f}%")
    if "steps" in res:
        st = res["steps"]
        ts = st["tasks"]
        lines += ["", f"seconds per training step (batch {st['batch_size']}, rank {st['rank']}, {st['sites']} adapted "
                      f"projections), earlier tasks' branches held three ways:",
                  "  " + f"{'':34s}" + "".join(f"{'task ' + str(t):>12s}" for t in ts) + f"{'last/first':>12s}"]
        for mode, label in WAYS.items():
            v = st["seconds"][mode]
            lines.append("  " + f"{label:34s}" + "".join(f"{x:12.4f}" for x in v) + f"{v[-1] / v[0]:12.2f}")
        m, o = st["seconds"]["merged"][-1], st["seconds"]["official"][-1]
        lines.append(f"  at task {ts[-1]}: official / merged = {o / m:.2f}x")
    return "\n".join(lines)


def run_bench(args) -> dict:
    from .config import load_config
    from .train import Runner

    sets = list(args.set or [])
    if args.batch_size:
        sets.append(f"data.batch_size={args.batch_size}")
    if args.threads:
        sets.append(f"threads={args.threads}")
    cfg = load_config(args.config, preset=None if args.config else args.preset, method=args.method, sets=sets)
    with tempfile.TemporaryDirectory() as tmp:
        run = Runner(cfg, Path(tmp), progress=False, log=lambda *a, **k: None)
        run.method.setup()
        task = run.scenario.tasks[0]
        res = {"preset": cfg.name, "method": cfg.method_name, "backbone": cfg.backbone.name,
               "device": str(run.device), "threads": torch.get_num_threads()}
        if "stats" in args.sections:
            res["stats"] = stats_share(run, task, args.epochs)
        else:
            run.current_task = task
            run.method.begin_task(task)
        if "steps" in args.sections:
            res["steps"] = step_cost(run, task, args.tasks, steps=args.steps, warmup=args.warmup)
    return res


def cmd_bench(args) -> int:
    print(render(run_bench(args)))
    return 0


def add_parser(sub) -> None:
    b = sub.add_parser("bench", help="measure step cost across tasks and the statistics passes' share",
                       description=__doc__.split("\n\n")[0])
    b.add_argument("config", nargs="?", help="config YAML (instead of --preset)")
    b.add_argument("--preset", default="cifar100-mini")
    b.add_argument("--method", default="inflora")
    b.add_argument("--tasks", type=int, nargs="+", default=[1, 10], help="task counts to time a step at")
    b.add_argument("--steps", type=int, default=10, help="timed steps per measurement (median)")
    b.add_argument("--warmup", type=int, default=2)
    b.add_argument("--batch-size", type=int, help="default: the preset's data.batch_size")
    b.add_argument("--epochs", type=int, help="epochs per task for the share (default: the preset's)")
    b.add_argument("--threads", type=int, help="torch CPU threads")
    b.add_argument("--sections", nargs="+", choices=SECTIONS, default=list(SECTIONS))
    b.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a config key (repeatable)")
    b.set_defaults(fn=cmd_bench)
