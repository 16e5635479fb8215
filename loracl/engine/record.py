"""The run record: results.json (accuracy matrices, metrics, cost per task), phase timing, the FLOP meter."""

from __future__ import annotations

import contextlib
import json
import platform
import resource
import subprocess
import time
from collections import defaultdict
from pathlib import Path

import torch

from .. import __version__, dist
from ..config import RunConfig
from ..data.scenarios import Scenario
from ..errors import ConfigError
from ..results.metrics import all_metrics, final_acc_task_avg, learning_acc
from ..runs.files import write_file
from .flops import FlopMeter


def package_versions() -> dict:
    import importlib.metadata as md

    out = {"python": platform.python_version(), "loracl": __version__}
    for pkg in ("torch", "torchvision", "timm", "open_clip_torch", "numpy", "pillow"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            out[pkg] = None
    repo = Path(__file__).resolve().parent.parent.parent
    try:
        commit = subprocess.run(["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True, text=True,
                                timeout=5).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(repo), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=5).stdout.strip()
        out["git_commit"] = (commit + ("-dirty" if dirty else "")) if commit else None
    except (OSError, subprocess.SubprocessError):
        out["git_commit"] = None
    return out


def machine() -> dict:
    d = {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
         "cpu_threads": torch.get_num_threads()}
    if torch.cuda.is_available():
        d["gpu"] = torch.cuda.get_device_name(0)
    return d


class RunRecord:
    def __init__(self, cfg: RunConfig, scenario: Scenario, out: Path, device: torch.device,
                 meter: FlopMeter | None = None):
        self.cfg, self.scenario, self.out, self.device = cfg, scenario, out, device
        self.flops = meter or FlopMeter()  # the bench counts images instead
        self.phase_seconds: dict[str, float] = defaultdict(float)
        self._tb = None
        T = len(scenario)
        self.results = {
            "method": cfg.method_name, "benchmark": cfg.benchmark.name, "scenario": scenario.kind,
            "preset": cfg.name, "seed": cfg.seed, "status": "running",
            "tasks": [t.summary() for t in scenario.tasks],
            "acc_matrix": [[None] * T for _ in range(T)], "acc_before": None, "metrics": {},
            "cost": {"train_seconds_per_task": [None] * T, "train_flops_per_task": [None] * T,
                     "flops_by_phase_per_task": [None] * T, "phase_seconds_per_task": [None] * T,
                     "trainable_params_per_task": [None] * T, "eval_seconds_per_task": [None] * T,
                     "peak_memory_bytes": None, "peak_memory_kind": None},
            "retention": None, "versions": package_versions(), "machine": machine(),
        }

    # ---- phases --------------------------------------------------------------------------------------
    @contextlib.contextmanager
    def timed(self, phase: str):
        t0 = time.perf_counter()
        try:
            yield
        finally:
            if self.device.type == "cuda":
                torch.cuda.synchronize()
            self.phase_seconds[phase] += time.perf_counter() - t0

    def start_task(self) -> None:
        self.flops.reset()
        self.phase_seconds = defaultdict(float)
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()

    def step_state(self) -> dict:
        return {"flops": self.flops.state_dict(), "phase_seconds": dict(self.phase_seconds),
                "elapsed": sum(self.phase_seconds.values())}

    def load_step_state(self, state: dict) -> None:
        self.flops.load_state_dict(state["flops"])
        self.phase_seconds.update(state["phase_seconds"])

    # ---- results -------------------------------------------------------------------------------------
    def extra(self, key: str, t: int, value) -> None:
        """A method's per-task value beside the standard results (results.json: method_extras)."""
        extras = self.results.setdefault("method_extras", {})
        extras.setdefault(key, [None] * len(self.scenario))[t] = value

    def trainable_params(self, t: int, n: int) -> None:
        self.results["cost"]["trainable_params_per_task"][t] = n

    def task_done(self, t: int, row, aware, seconds: float, eval_seconds: float, eval_sizes: list[int]) -> None:
        T = len(self.scenario)
        self.results["acc_matrix"][t] = row
        if aware is not None:
            self.results.setdefault("acc_matrix_task_aware", [[None] * T for _ in range(T)])[t] = aware
        c = self.results["cost"]
        c["train_seconds_per_task"][t] = round(seconds, 3)
        c["train_flops_per_task"][t] = self.flops.total
        c["flops_by_phase_per_task"][t] = dict(self.flops.by_phase)
        c["phase_seconds_per_task"][t] = {k: round(v, 3) for k, v in self.phase_seconds.items()}
        c["eval_seconds_per_task"][t] = round(eval_seconds, 3)
        c["peak_memory_bytes"], c["peak_memory_kind"] = self._peak_memory()
        self.results["metrics"] = self.metrics(eval_sizes)
        if self._tb is not None:
            for i, v in enumerate(row):
                if v is not None:
                    self._tb.add_scalar(f"acc/task{i}", v, t)

    def val_done(self, t: int, row, aware, sizes: list[int]) -> None:
        """The validation row after task t (`data.val_fraction`): val_acc_matrix and val_metrics, the same keys
        as the test ones, on images carved from the training sets."""
        T = len(self.scenario)
        self.results.setdefault("val_acc_matrix", [[None] * T for _ in range(T)])[t] = row
        if aware is not None:
            self.results.setdefault("val_acc_matrix_task_aware", [[None] * T for _ in range(T)])[t] = aware
        self.results["val_metrics"] = self.metrics(sizes, "val_")

    def metrics(self, eval_sizes: list[int], prefix: str = "") -> dict:
        a = self.results[f"{prefix}acc_matrix"]
        done = [j for j, r in enumerate(a) if any(v is not None for v in r)]
        T = (done[-1] + 1) if done else 0
        if T == 0:
            return {}
        sub = [row[:T] for row in a[:T]]
        before = self.results["acc_before"][:T] if self.results["acc_before"] and not prefix else None
        m = all_metrics(sub, eval_sizes[:T], self.scenario.kind, before)
        aware = self.results.get(f"{prefix}acc_matrix_task_aware")
        if aware is not None and aware[T - 1][0] is not None:
            # task-incremental accuracy (task identity given at test time), beside the class-incremental one
            aware = [row[:T] for row in aware[:T]]
            m["final_acc_task_aware"] = round(final_acc_task_avg(aware), 4)
            la = learning_acc(aware)  # None where tasks are not scored one by one as learned (joint)
            m["learning_acc_task_aware"] = None if la is None else round(la, 4)
        if prefix:  # validation: the accuracy matrix's metrics only
            return m
        if self.results.get("final_acc_ncm") is not None:
            m["final_acc_ncm"] = self.results["final_acc_ncm"]
        if self.results["retention"] is not None:
            per = [v for v in self.results["retention"]["per_task"] if v is not None]
            m["pretrained_retention"] = per[-1] if per else None
            m["pretrained_retention_initial"] = self.results["retention"]["initial"]
        return m

    def progress_line(self, t: int, name: str, seconds: float, joint: bool) -> str:
        T = len(self.scenario)
        row = self.results["acc_matrix"][t]
        seen = [v for v in row[: t + 1] if v is not None]
        msg = f"task {t + 1}/{T} '{name}': {seconds:.1f}s"
        if seen:
            msg += f", mean acc on tasks so far {sum(seen) / len(seen):.2f}%"
        ret = self.results["retention"]
        if ret is not None and ret["per_task"][t] is not None:
            msg += f", pretrained retention {ret['per_task'][t]:.2f}%"
        done = [x for x in self.results["cost"]["train_seconds_per_task"] if x]
        left = sum(1 for k in range(t + 1, T) if not joint)
        if left and done:
            msg += f"; about {left * sum(done) / len(done) / 60:.1f} min of training left"
        return msg

    def _peak_memory(self):
        if self.device.type == "cuda":
            return int(torch.cuda.max_memory_allocated()), "cuda_max_allocated"
        return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024), "cpu_max_rss"

    def write(self) -> None:
        if dist.is_main():
            write_file(self.out / "results.json", json.dumps(self.results, indent=1), root=self.out)

    # ---- tensorboard ---------------------------------------------------------------------------------
    def open_tensorboard(self) -> None:
        if not (self.cfg.tensorboard and dist.is_main()):
            return
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise ConfigError("tensorboard: true needs the tensorboard package (pip install loracl[tensorboard])") from None
        self._tb = SummaryWriter(str(self.out / "tensorboard"))

    def scalar(self, tag: str, value_fn, step: int) -> None:
        """Log a scalar (value_fn() is only evaluated, a host sync, when tensorboard is on)."""
        if self._tb is not None:
            self._tb.add_scalar(tag, value_fn(), step)

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
