"""`loracl sweep`: many runs at once, on this machine or on a SLURM cluster, each a plain `loracl run`.

A sweep is a grid: presets x methods x values of `--set key=v1,v2` x seeds (from flags or a YAML file). Every point
has one deterministic run folder, `OUT/<preset>/<method>[/<key=value,...>]/seed<k>`, and a log, `run.log`, beside
its results. Points whose run is complete are skipped, interrupted ones are resumed from their checkpoints
(`loracl run --resume`), so running a sweep again finishes it. `--jobs N` runs N points at once here, the CPU
threads (and the GPUs) split between them; `--backend submitit` submits them as a SLURM job array instead
(`runs/cluster.py`). At the end: a summary of failures, the comparison table of the whole sweep, and with
`--select METRIC` the grid point each method scores best on *validation* images (`data.val_fraction`), reported
with its test numbers. Nothing in loracl picks a setting or an epoch on test images.
"""

from __future__ import annotations

import itertools
import json
import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import ConfigError, LoraclError
from .points import Point, Progress, last_line, state_of


def split_values(raw: str) -> list[str]:
    """`v1,v2,...` split at the commas outside brackets and quotes (`[5,2,5]` is one value)."""
    out, depth, quote, cur = [], 0, None, ""
    for ch in raw:
        if quote:
            quote = None if ch == quote else quote
        elif ch in "\"'":
            quote = ch
        elif ch in "[{(":
            depth += 1
        elif ch in "]})":
            depth -= 1
        elif ch == "," and depth == 0:
            out.append(cur)
            cur = ""
            continue
        cur += ch
    return out + [cur]


def parse_seeds(items) -> list[int]:
    """Seeds as given: numbers and ranges (`0-2`)."""
    seeds = []
    for it in items:
        it = str(it)
        m = re.fullmatch(r"(\d+)-(\d+)", it)
        if m:
            seeds += list(range(int(m[1]), int(m[2]) + 1))
        elif it.isdigit():
            seeds.append(int(it))
        else:
            raise ConfigError(f"sweep: seed '{it}' is not a number or a range like 0-2")
    return seeds


@dataclass
class SweepSpec:
    sources: list[str]
    methods: list[str]
    seeds: list[int]
    sets: list[str] = field(default_factory=list)  # key=v1,v2: two or more values make a grid axis
    out: str = "runs/sweep"
    jobs: int = 1
    backend: str = "local"
    select: str | None = None
    cluster: dict = field(default_factory=dict)  # submitit's parameters (partition, timeout_min, ...)

    def points(self) -> list[Point]:
        fixed, axes = [], []
        for item in self.sets:
            if "=" not in item:
                raise ConfigError(f"sweep: --set expects key=value or key=v1,v2, got '{item}'")
            key, raw = item.split("=", 1)
            values = split_values(raw)
            if len(values) == 1:
                fixed.append(item)
            else:
                axes.append([(key.strip(), v) for v in values])
        grids = list(itertools.product(*axes)) if axes else [()]
        return [Point(s, m, seed, tuple(g), tuple(fixed))
                for s in self.sources for m in self.methods for g in grids for seed in self.seeds]


def load_spec(path: str | None, args) -> SweepSpec:
    """The sweep file (if any) with the command's flags over it."""
    doc: dict = {}
    if path:
        import yaml

        try:
            doc = yaml.safe_load(Path(path).read_text()) or {}
        except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
            raise ConfigError(f"cannot read sweep file {path}: {str(e).splitlines()[0]}") from None
        if not isinstance(doc, dict):
            raise ConfigError(f"sweep file {path} must hold a mapping (preset, method, seed, set, ...)")
        unknown = set(doc) - {"preset", "config", "method", "seed", "set", "grid", "out", "jobs", "backend",
                              "select", "cluster"}
        if unknown:
            raise ConfigError(f"sweep file {path}: unknown key(s) {sorted(unknown)}")

    def listed(v):
        return [] if v is None else [str(x) for x in (v if isinstance(v, list) else [v])]

    sources = listed(args.preset) or listed(doc.get("preset")) + listed(doc.get("config"))
    methods = listed(args.method) or listed(doc.get("method"))
    seeds = parse_seeds(args.seed or listed(doc.get("seed")) or ["0"])
    sets = listed(doc.get("set")) + [f"{k}={','.join(json.dumps(x) if isinstance(x, str) and ',' in x else str(x) for x in (v if isinstance(v, list) else [v]))}"
                                     for k, v in (doc.get("grid") or {}).items()] + list(args.set or [])
    if not sources:
        raise ConfigError("sweep: give --preset (or a sweep file with preset: / config:)")
    if not methods:
        raise ConfigError("sweep: give --method (or a sweep file with method:)")
    spec = SweepSpec(sources, methods, seeds, sets, out=args.out or doc.get("out") or "runs/sweep",
                     jobs=int(args.jobs or doc.get("jobs") or 1), backend=args.backend or doc.get("backend", "local"),
                     select=args.select or doc.get("select"), cluster=dict(doc.get("cluster") or {}))
    for k in ("partition", "timeout_min", "gpus_per_job", "cpus_per_job", "array_parallelism"):
        if getattr(args, k, None) is not None:
            spec.cluster[k] = getattr(args, k)
    if spec.jobs < 1:
        raise ConfigError(f"sweep: --jobs must be at least 1 (got {spec.jobs})")
    if spec.backend not in ("local", "submitit"):
        raise ConfigError(f"sweep: --backend is local or submitit, not '{spec.backend}'")
    return spec


def check_points(points: list[Point]) -> None:
    """Every point's config loads (a typo in a preset, method or key stops the sweep before anything runs)."""
    from .assembly import load_config

    seen = set()
    for p in points:
        key = (p.source, p.method, p.grid, p.sets)
        if key not in seen:
            seen.add(key)
            load_config(p.source if p.is_file else None, preset=None if p.is_file else p.source, method=p.method,
                        sets=list(p.sets) + [f"{k}={v}" for k, v in p.grid])


def run_local(points: list[Point], root: Path, jobs: int, log=print) -> dict[Point, str | None]:
    """Run the points, `jobs` at a time, each `loracl run` in its own process with its share of the CPU threads
    (and one GPU each while there are GPUs); returns {point: None if it succeeded, else its log's last line}."""
    threads = max(1, (os.cpu_count() or 1) // jobs)
    gpus = _gpus()
    todo = [p for p in points if state_of(p.out(root)) != "complete"]
    outcome: dict[Point, str | None] = {p: None for p in points if p not in todo}
    progress = Progress(len(points), jobs, log)
    running: dict[int, tuple[Point, subprocess.Popen, float]] = {}
    try:
        while todo or running:
            while todo and len(running) < jobs:
                slot = next(i for i in range(jobs) if i not in running)
                p = todo.pop(0)
                out = p.out(root)
                out.mkdir(parents=True, exist_ok=True)
                env = dict(os.environ, OMP_NUM_THREADS=str(threads))
                if gpus:
                    env["CUDA_VISIBLE_DEVICES"] = gpus[slot % len(gpus)]
                argv = p.argv(root, state_of(out) == "partial", threads)
                with open(out / "run.log", "ab") as f:
                    proc = subprocess.Popen([sys.executable, "-m", "loracl", *argv], stdout=f,
                                            stderr=subprocess.STDOUT, env=env)
                running[slot] = (p, proc, time.time())
            for slot, (p, proc, t0) in list(running.items()):
                if proc.poll() is not None:
                    del running[slot]
                    if proc.returncode == 0:
                        outcome[p] = None
                        progress.durations.append(time.time() - t0)
                    else:
                        outcome[p] = last_line(p.out(root) / "run.log")
            failed = sum(1 for v in outcome.values() if v is not None)
            progress.show(len(outcome) - failed, len(running), failed)
            time.sleep(0.2)
    except KeyboardInterrupt:
        for _, proc, _ in running.values():  # each stops as a Ctrl-C would: finished tasks saved
            proc.send_signal(signal.SIGTERM)
        for _, proc, _ in running.values():
            proc.wait()
        raise
    return outcome


def _gpus() -> list[str]:
    try:
        import torch

        n = torch.cuda.device_count()
    except Exception:  # pragma: no cover - a broken CUDA install: run on the CPU
        n = 0
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    ids = [g for g in visible.split(",") if g.strip()] if visible else [str(i) for i in range(n)]
    return ids[:n]


def select(points: list[Point], root: Path, metric: str) -> str:
    """For each preset and method, the grid point with the best mean over seeds of `metric` (a dotted key of
    results.json, e.g. val_metrics.final_acc: validation images only), with that point's test numbers."""
    from ..results.compare import _cell, _mean_std

    groups: dict[tuple, dict[tuple, list[dict]]] = {}
    for p in points:
        try:
            r = json.loads((p.out(root) / "results.json").read_text())
        except (OSError, ValueError):
            continue
        if r.get("status") == "complete":
            groups.setdefault((p.source, p.method), {}).setdefault(p.grid, []).append(r)
    lines = [f"Selected on {metric} (mean over seeds); the test numbers of the selected point", "",
             "| preset | method | selected | " + metric + " | final acc (test) | seeds |", "|---|---|---|---|---|---|"]
    for (src, m), grids in sorted(groups.items()):
        scored = []
        for grid, rs in grids.items():
            v = _mean_std([_dotted(r, metric) for r in rs])
            if v[0] is not None:
                scored.append((v, grid, rs))
        if not scored:
            raise LoraclError(f"sweep --select {metric}: no run of {m} on {src} has it (set data.val_fraction "
                              f"for val_metrics)")
        v, grid, rs = max(scored, key=lambda s: s[0][0])
        test = _mean_std([r["metrics"].get("final_acc") for r in rs])
        label = ",".join(f"{k}={x}" for k, x in grid) or "(the only point)"
        lines.append(f"| {src} | {m} | {label} | {_cell(v)} | {_cell(test)} | {len(rs)} |")
    return "\n".join(lines)


def _dotted(r: dict, key: str):
    for k in key.split("."):
        r = r.get(k) if isinstance(r, dict) else None
    return r if isinstance(r, (int, float)) and not isinstance(r, bool) else None


def cmd_sweep(args) -> int:
    from ..results.compare import compare
    from .files import write_file

    spec = load_spec(args.file, args)
    points = spec.points()
    check_points(points)
    root = Path(spec.out)
    root.mkdir(parents=True, exist_ok=True)
    done = sum(state_of(p.out(root)) == "complete" for p in points)
    print(f"sweep: {len(points)} runs ({done} complete, skipped) into {root}, backend {spec.backend}, "
          f"{spec.jobs} at a time")
    t0 = time.time()
    try:
        if spec.backend == "submitit":
            from .cluster import run_submitit

            outcome = run_submitit(points, root, spec)
        else:
            outcome = run_local(points, root, spec.jobs)
    except KeyboardInterrupt:
        print("sweep interrupted: every run's finished tasks are saved; the same command again finishes the sweep",
              file=sys.stderr)
        return 130
    failed = {p: line for p, line in outcome.items() if line is not None}
    print(f"sweep: {len(points) - len(failed)} of {len(points)} runs complete in {(time.time() - t0) / 60:.1f} min")
    for p, line in failed.items():
        print(f"  failed: {p.out(root)}: {line}  (log: {p.out(root) / 'run.log'})")
    if len(failed) < len(points):
        print()
        print(compare([root], out=root / "comparison.md"))
        if spec.select:
            text = select(points, root, spec.select)
            write_file(root / "selection.md", text + "\n", root=root)
            print("\n" + text + f"\n\n(written to {root / 'selection.md'})")
    return 1 if failed else 0


def add_parser(sub) -> None:
    s = sub.add_parser("sweep", help="many runs: a grid of presets x methods x settings x seeds, here or on SLURM",
                       description=__doc__.split("\n\n")[1].replace("\n", " "))
    s.add_argument("file", nargs="?", help="a sweep YAML (preset, method, seed, set, grid, out, jobs, backend, "
                                           "select, cluster); flags override it")
    s.add_argument("--preset", nargs="+", help="preset names (or config files)")
    s.add_argument("--method", nargs="+")
    s.add_argument("--seed", nargs="+", help="seeds: numbers or ranges like 0-2 (default 0)")
    s.add_argument("--set", action="append", metavar="KEY=V1,V2",
                   help="a setting for every run; with two or more values (commas outside brackets) a grid axis")
    s.add_argument("--out", help="sweep folder (default runs/sweep)")
    s.add_argument("--jobs", type=int, help="runs at once on this machine (CPU threads and GPUs split between them)")
    s.add_argument("--backend", choices=["local", "submitit"], help="local process pool (default) or submitit "
                                                                    "(SLURM, or its local executor without SLURM)")
    s.add_argument("--select", metavar="METRIC", help="pick each method's grid point on this results.json key, "
                                                       "e.g. val_metrics.final_acc (needs data.val_fraction)")
    s.add_argument("--partition", help="submitit: SLURM partition")
    s.add_argument("--timeout-min", type=int, dest="timeout_min", help="submitit: time limit per job (requeued "
                                                                          "and resumed when it is reached)")
    s.add_argument("--gpus-per-job", type=int, dest="gpus_per_job")
    s.add_argument("--cpus-per-job", type=int, dest="cpus_per_job")
    s.add_argument("--array-parallelism", type=int, dest="array_parallelism", help="submitit: jobs of the array "
                                                                                      "running at once")
    s.set_defaults(fn=cmd_sweep)
