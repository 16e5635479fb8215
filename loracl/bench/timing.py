"""Timers and meters of `loracl bench`: medians of synchronised steps, images instead of FLOPs, peak memory."""

from __future__ import annotations

import resource
import statistics
import time

import numpy as np
import torch

from ..engine.flops import FlopMeter


def sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def median_seconds(device, fn, steps: int, warmup: int) -> float:
    """Median seconds of fn() over `steps` calls after `warmup` untimed ones (CUDA synchronised around each)."""
    times = []
    for i in range(warmup + steps):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def time_steps(run, task, batch, params, steps: int, warmup: int) -> float:
    """Median seconds of one training step (forward, backward, Adam step) of the method's own loss on a fixed
    batch, under the run's precision."""
    opt = torch.optim.Adam(params, lr=1e-4)

    def step():
        opt.zero_grad(set_to_none=True)
        with run.precision.context():
            loss = run.method.loss(run.model, batch, task)
        loss.backward()
        opt.step()

    return median_seconds(run.device, step, steps, warmup)


def first(images, n: int):
    """The first n images of a set."""
    return images.subset(np.arange(min(n, len(images))))


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


def reset_peak(device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
