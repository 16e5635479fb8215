"""Data-parallel helpers over torch.distributed (launched with torchrun); no-ops in a single process."""

from __future__ import annotations

import os

import torch
import torch.distributed as dist


def is_dist() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if is_dist() else 0


def world_size() -> int:
    return dist.get_world_size() if is_dist() else 1


def is_main() -> bool:
    return rank() == 0


def init_from_env(device: torch.device) -> None:
    """Join the process group when started by torchrun (WORLD_SIZE > 1)."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not is_dist():
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend)
        if device.type == "cuda":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))


def share(n: int) -> slice:
    """This process's contiguous share of n items split over the processes (the last shares may be short)."""
    k = (n + world_size() - 1) // world_size()
    return slice(min(rank() * k, n), min((rank() + 1) * k, n))


def all_gather_objects(obj) -> list:
    """Every process's `obj` (picklable), in rank order."""
    if not is_dist():
        return [obj]
    out = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def all_reduce_sum_(t: torch.Tensor) -> torch.Tensor:
    """Sum a tensor over processes in place (statistics must be summed before any SVD)."""
    if is_dist():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def all_reduce_min_(t: torch.Tensor) -> torch.Tensor:
    if is_dist():
        dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return t


def batch_offset(n: int, device: torch.device | str = "cpu") -> tuple[int, int]:
    """Where this process's n rows start in the global batch (the processes' rows in rank order), and its size;
    `device`: where the backend exchanges tensors (CUDA under NCCL)."""
    if not is_dist():
        return 0, n
    sizes = [torch.zeros((), dtype=torch.long, device=device) for _ in range(world_size())]
    dist.all_gather(sizes, torch.tensor(n, device=device))
    return int(sum(sizes[:rank()])), int(sum(sizes))


class _SumOverProcesses(torch.autograd.Function):
    """All-reduce (sum) whose backward sums the gradients too: every process holds the same total and computes the
    same loss from it, so each of its inputs gets the sum of the processes' (equal) gradients, world-size times the
    one-process gradient, which DDP's averaging turns back into it."""

    @staticmethod
    def forward(ctx, t):
        t = t.clone()
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return t

    @staticmethod
    def backward(ctx, g):
        g = g.clone()
        dist.all_reduce(g, op=dist.ReduceOp.SUM)
        return g


def sum_with_grad(t: torch.Tensor) -> torch.Tensor:
    """The sum of `t` over processes, differentiable (a batch statistic of the global batch inside a loss)."""
    return _SumOverProcesses.apply(t) if is_dist() else t


def cat_with_grad(t: torch.Tensor) -> torch.Tensor:
    """Every process's rows of `t` in rank order (the global batch), differentiable: a loss that couples the rows
    of a batch (a softmax over images) sees under torchrun what it sees in one process."""
    if not is_dist():
        return t
    lo, total = batch_offset(len(t), t.device)
    pad = t.shape[1:]
    return sum_with_grad(torch.cat([t.new_zeros(lo, *pad), t, t.new_zeros(total - lo - len(t), *pad)]))


def broadcast_(t: torch.Tensor, src: int = 0) -> torch.Tensor:
    if is_dist():
        dist.broadcast(t, src)
    return t


def barrier() -> None:
    if is_dist():
        dist.barrier()


def finish() -> None:
    """Wait for every process, then leave the process group (the end of a run under torchrun)."""
    if is_dist():
        dist.barrier()
        dist.destroy_process_group()
