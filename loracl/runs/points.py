"""What both backends of `loracl sweep` share: one point of the grid (its run folder and its `loracl run`
arguments), the state of its run folder, and the progress line."""

from __future__ import annotations

import hashlib
import json
import re
import time
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Point:
    """One run of a sweep."""

    source: str  # a preset name, or a config file
    method: str
    seed: int
    grid: tuple[tuple[str, str], ...] = ()  # (key, value) this point sets, part of its folder name
    sets: tuple[str, ...] = ()  # key=value items every point sets

    @property
    def is_file(self) -> bool:
        return self.source.endswith((".yaml", ".yml"))

    @property
    def label(self) -> str:
        return ",".join(f"{k}={v}" for k, v in self.grid)

    def out(self, root: Path) -> Path:
        base = Path(root) / (Path(self.source).stem if self.is_file else self.source) / self.method
        if self.grid:
            name = re.sub(r"[^A-Za-z0-9_.=,+-]", "_", self.label)
            if len(name) > 96:  # long grids: a readable prefix and a hash of the whole
                name = name[:80] + "-" + hashlib.sha1(self.label.encode()).hexdigest()[:8]
            base = base / name
        return base / f"seed{self.seed}"

    def argv(self, root: Path, resume: bool, threads: int | None) -> list[str]:
        """`loracl run` arguments of this point."""
        src = [self.source] if self.is_file else ["--preset", self.source]
        argv = ["run", *src, "--method", self.method, "--seed", str(self.seed), "--out", str(self.out(root))]
        for item in list(self.sets) + [f"{k}={v}" for k, v in self.grid] + ([f"threads={threads}"] if threads else []):
            argv += ["--set", item]
        return argv + (["--resume"] if resume else [])


def state_of(out: Path) -> str:
    """complete, partial (has checkpoints: resume it) or new."""
    try:
        status = json.loads((out / "results.json").read_text()).get("status")
    except (OSError, ValueError, AttributeError):
        status = None
    if status == "complete":
        return "complete"
    return "partial" if (out / "checkpoints").is_dir() and any((out / "checkpoints").iterdir()) else "new"


def last_line(log: Path) -> str:
    try:
        lines = [line for line in log.read_text(errors="replace").splitlines() if line.strip()]
    except OSError:
        return "(no log)"
    return lines[-1][:200] if lines else "(empty log)"


class Progress:
    """One status line whenever something changes: done / running / failed, and an estimate of the time left."""

    def __init__(self, total: int, jobs: int, log=print):
        self.total, self.jobs, self.log, self.t0, self.last = total, jobs, log, time.time(), None
        self.durations: list[float] = []

    def show(self, done: int, running: int, failed: int) -> None:
        left = self.total - done - failed
        eta = ""
        if self.durations and left:
            mean = sum(self.durations) / len(self.durations)
            eta = f", about {mean * -(-left // self.jobs) / 60:.1f} min left"
        line = f"sweep: {done}/{self.total} done, {running} running, {failed} failed{eta}"
        if line != self.last:
            self.log(line)
            self.last = line
