"""`loracl sweep --backend submitit`: the sweep's runs as one SLURM job array through submitit.

Each job runs one point's `loracl run` (a child process writing the point's `run.log`). A job that is pre-empted
or reaches its time limit gets submitit's signal; `checkpoint` then stops the run as Ctrl-C would (every finished
task saved, and with `train.checkpoint_every` the steps too) and submitit requeues the job, which continues the
run with `--resume`. Without SLURM, submitit's local executor runs the same jobs here, the same code path (the
tests use it, a job interrupted mid-run included). Multi-node single runs stay on torchrun (README).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from ..errors import ConfigError
from .points import Point, Progress, last_line, state_of


def _submitit():
    try:
        import submitit
    except ImportError:
        raise ConfigError("sweep --backend submitit needs the submitit package: pip install 'loracl[cluster]'") \
            from None
    return submitit


class SweepJob:
    """One point of a sweep as a submitit job: requeued with its state when its time is up."""

    def __init__(self, point: Point, root: Path, threads: int | None):
        self.point, self.root, self.threads = point, Path(root), threads
        self._child: subprocess.Popen | None = None

    def __getstate__(self):  # the child process is not part of what is requeued
        return {k: v for k, v in self.__dict__.items() if k != "_child"} | {"_child": None}

    def __call__(self) -> int:
        out = self.point.out(self.root)
        if state_of(out) == "complete":
            return 0
        out.mkdir(parents=True, exist_ok=True)
        env = dict(os.environ)
        if self.threads:
            env["OMP_NUM_THREADS"] = str(self.threads)
        argv = self.point.argv(self.root, state_of(out) == "partial", self.threads)
        with open(out / "run.log", "ab") as f:
            self._child = subprocess.Popen([sys.executable, "-m", "loracl", *argv], stdout=f,
                                           stderr=subprocess.STDOUT, env=env)
            rc = self._child.wait()
        if rc != 0:
            raise RuntimeError(f"loracl run failed ({rc}): {last_line(out / 'run.log')}")
        return rc

    def checkpoint(self, *args, **kwargs):
        """submitit's pre-emption / time-limit hook: stop the run cleanly, then requeue this job (it resumes).
        It runs in a signal handler that may have interrupted Popen.wait, whose lock it would wait on forever: the
        child is reaped with os.waitpid instead."""
        submitit = _submitit()
        if self._child is not None:
            try:
                os.kill(self._child.pid, signal.SIGTERM)  # loracl run stops as on Ctrl-C: finished work saved
                os.waitpid(self._child.pid, 0)
            except (ProcessLookupError, ChildProcessError):
                pass  # it had already ended
        return submitit.helpers.DelayedSubmission(SweepJob(self.point, self.root, self.threads))


def executor(root: Path, spec, cluster: str | None = None):
    submitit = _submitit()
    ex = submitit.AutoExecutor(folder=str(root / ".submitit"), cluster=cluster)
    c = spec.cluster
    params = {"timeout_min": int(c.get("timeout_min", 60 * 24)), "slurm_array_parallelism": int(
        c.get("array_parallelism", spec.jobs))}
    if c.get("partition"):
        params["slurm_partition"] = c["partition"]
    if c.get("gpus_per_job") is not None:
        params["gpus_per_node"] = int(c["gpus_per_job"])
    if c.get("cpus_per_job") is not None:
        params["cpus_per_task"] = int(c["cpus_per_job"])
    ex.update_parameters(**params)
    return ex


def run_submitit(points: list[Point], root: Path, spec, cluster: str | None = None, log=print,
                 on_submit=None) -> dict[Point, str | None]:
    """Submit the points not yet complete as a job array and follow them; returns {point: None or the failure's
    last line}. Without SLURM (submitit's local executor) at most `--jobs` run at once, in waves."""
    ex = executor(root, spec, cluster)
    threads = spec.cluster.get("cpus_per_job")
    if ex.cluster == "local":
        threads = threads or max(1, (os.cpu_count() or 1) // spec.jobs)
    todo = [p for p in points if state_of(p.out(root)) != "complete"]
    outcome: dict[Point, str | None] = {p: None for p in points if p not in todo}
    progress = Progress(len(points), spec.jobs, log)
    wave = len(todo) if ex.cluster != "local" else spec.jobs
    log(f"sweep: submitit ({ex.cluster}), job folder {root / '.submitit'}")
    while todo:
        batch, todo = todo[:wave], todo[wave:]
        with ex.batch():  # one job array
            jobs = [(p, ex.submit(SweepJob(p, root, threads))) for p in batch]
        if on_submit is not None:
            on_submit(jobs)
        t0 = time.time()
        while jobs:
            for p, job in list(jobs):
                if job.done():
                    jobs.remove((p, job))
                    try:
                        job.result()
                        outcome[p] = None
                        progress.durations.append(time.time() - t0)
                    except Exception as e:  # the job's error: the run's last log line, or submitit's
                        outcome[p] = str(e).strip().splitlines()[-1][:200] if str(e).strip() else type(e).__name__
            failed = sum(1 for v in outcome.values() if v is not None)
            progress.show(len(outcome) - failed, len(jobs), failed)
            time.sleep(0.5)
    return outcome
