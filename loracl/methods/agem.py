"""Averaged gradient episodic memory, A-GEM (Chaudhry et al., ICLR 2019, "Efficient lifelong learning with A-GEM").

Each step computes the gradient g of the current batch and a reference gradient g_ref of a random sample of
the episodic memory (every earlier task's patterns), and updates with (eq. 11 of the paper)

    g~ = g                                          if g . g_ref >= 0
    g~ = g - (g . g_ref / g_ref . g_ref) g_ref      otherwise

so the loss on the memory sample does not increase to first order. Memory: `patterns_per_task` (100, as in the
task-arithmetic paper) random training samples of each finished task; reference sample `sample_size`
(64, Avalanche's default). Losses are over every class seen (one growing head, no task id).
"""

from __future__ import annotations

import torch
from pydantic import Field

from .. import dist
from . import register
from .rehearsal import RehearsalMethod, RehearsalOptions


def agem_project(g: torch.Tensor, g_ref: torch.Tensor) -> torch.Tensor:
    """A-GEM's projected gradient (flat vectors): unchanged when g . g_ref >= 0, else g minus its component
    along g_ref, which leaves g~ . g_ref = 0."""
    dot = torch.dot(g, g_ref)
    coef = dot.clamp(max=0) / torch.dot(g_ref, g_ref).clamp_min(torch.finfo(g.dtype).tiny)
    return g - coef * g_ref


class AGEMConfig(RehearsalOptions):
    patterns_per_task: int = Field(100, ge=0, description="memory patterns kept from each task")
    sample_size: int = Field(64, ge=1, description="memory patterns of each reference gradient")


@register
class AGEM(RehearsalMethod):
    """A-GEM: gradient projected so that the loss on an episodic-memory sample does not increase."""

    name = "agem"
    Config = AGEMConfig

    def begin_task(self, task):
        super().begin_task(task)
        self.g_ref = None
        self.restore(task)

    def restore(self, task):
        """The trained tensors, in a fixed order (a mid-task resume rebuilds the branches and head chunks)."""
        self.params = [p for ps in self.param_groups(task).values() for p in ps if p.requires_grad]

    def loss(self, net, batch, task):
        # the reference gradient is taken here, inside the counted training step, so its FLOPs are counted
        self.g_ref = None
        if len(self.memory):
            self.g_ref = self.reference_gradient(self.memory.sample(self.cfg.sample_size))
        return self.seen_loss(net, batch)

    def reference_gradient(self, rows) -> torch.Tensor:
        """g_ref: the gradient of the mean loss over the memory sample `rows` (flat, fp32).

        Under torchrun every process draws the same sample and takes the gradient of its contiguous share's
        summed loss over the sample size; the sum over processes is then the single-process g_ref, at 1/world
        of its cost. It runs on the bare model, not through DDP, whose reducer serves the step's own backward."""
        ref = self.run.memory_batch(self.memory, rows, keep=dist.share(len(rows)))
        if len(ref.y):
            logits = self.model(ref.x, self.seen)
            loss = self.cross_entropy(logits, ref.y, self.seen, reduction="sum") / len(rows)
            grads = torch.autograd.grad(loss, self.params, allow_unused=True)
        else:  # fewer memory rows than processes: this one holds none
            grads = [None] * len(self.params)
        g = torch.cat([(g if g is not None else torch.zeros_like(p)).reshape(-1).float()
                       for g, p in zip(grads, self.params)])
        return dist.all_reduce_sum_(g)

    @torch.no_grad()
    def after_backward(self, task):
        if self.g_ref is None:
            return
        g = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1).float()
                       for p in self.params])
        g = agem_project(g, self.g_ref)
        k = 0
        for p in self.params:
            n = p.numel()
            p.grad = g[k:k + n].view_as(p).to(p.dtype)
            k += n

    def end_task(self, task):
        super().end_task(task)
        self.memory.add_random(task, self.cfg.patterns_per_task, seed=self.run.seed("memory", task.index))
