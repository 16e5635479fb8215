"""CODA-Prompt: continual decomposed attention-based prompting (Smith et al., CVPR 2023), as in its code.

In each of blocks 0-4, a pool of M = 100 prompt components P_m (length 8), keys K_m and attention vectors A_m,
split evenly over the T tasks (M / T components each). For an image x after task t has begun:

    q       = final-norm CLS of the frozen pretrained ViT (no prompts, no gradient)
    alpha_m = cos(q * A_m, K_m)                      for the components of tasks 0..t   (eq. 3-4)
    p       = sum_m alpha_m P_m                     prefixed to the block's attention (L/2 keys, L/2 values)

- Task t trains only its own components (and its head chunk); earlier ones are frozen and get no gradient.
- At the start of task t its components are drawn at random and Gram-Schmidt orthogonalised against the
  earlier tasks' components (P flattened over its tokens), so new knowledge goes into new directions.
- The orthogonality penalty ||X X^T - I||^2 on K, A and P (eq. 6) has weight 0 by default: InfLoRA's
  re-implementation never adds it.

Where loracl differs from the code: the official Gram-Schmidt subtracts a new vector's projection on each
earlier component separately; earlier components are trained and no longer orthogonal to each other, so the
new ones come out only nearly orthogonal to them. loracl projects them off the span of the earlier
components, so they are exactly orthogonal (`models.prompts.gram_schmidt`).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from pydantic import Field

from ..config import MethodConfig
from ..errors import ConfigError
from ..models.attention import prefix_dim, prefix_slots
from ..models.prompts import PromptModule, gram_schmidt, split_prefix
from . import register
from .prompting import PromptMethod


class CodaPromptConfig(MethodConfig):
    pool: int = Field(100, ge=1, description="components per block (M), split evenly over the tasks")
    length: int = Field(8, ge=2, description="tokens per component: L/2 keys and L/2 values")
    blocks: list[int] = Field(default_factory=lambda: [0, 1, 2, 3, 4], description="prompted blocks")
    ortho_weight: float = Field(0.0, ge=0, description="weight of the orthogonality penalty (eq. 6)")


def ortho_penalty(x: torch.Tensor) -> torch.Tensor:
    """||X X^T - I||^2 (mean over entries, as the code) for the rows of X."""
    x = x.flatten(1)
    return ((x @ x.t() - torch.eye(len(x), device=x.device)) ** 2).mean()


def component_weights(q: torch.Tensor, K: torch.Tensor, A: torch.Tensor) -> torch.Tensor:
    """alpha (B x n): the cosine of each attended query q * A_i with its key K_i."""
    return F.cosine_similarity(q[:, None, :] * A[None], K[None], dim=-1)


class CodaComponents(nn.Module):
    """One block's components, keys and attention vectors: [task] -> (n, L, C), (n, d), (n, d)."""

    def __init__(self, n_tasks: int, per_task: int, length: int, dim: int, key_dim: int):
        super().__init__()
        self.P = nn.ParameterList([nn.Parameter(torch.zeros(per_task, length, dim)) for _ in range(n_tasks)])
        self.K = nn.ParameterList([nn.Parameter(torch.zeros(per_task, key_dim)) for _ in range(n_tasks)])
        self.A = nn.ParameterList([nn.Parameter(torch.zeros(per_task, key_dim)) for _ in range(n_tasks)])

    @torch.no_grad()
    def init_task(self, t: int) -> None:
        for X in (self.P, self.K, self.A):  # drawn on the CPU: the same components on any device
            old = torch.cat([x.flatten(1) for x in X[:t]]).cpu() if t else None
            new = gram_schmidt(torch.randn(X[t].flatten(1).shape), old)
            X[t].copy_(new.view_as(X[t]))

    def upto(self, t: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Components of tasks 0..t; the earlier tasks' detached (frozen, as the code's `.detach().clone()`)."""
        return tuple(torch.cat([x if i == t else x.detach() for i, x in enumerate(X[: t + 1])])
                     for X in (self.P, self.K, self.A))

    def prompt(self, q: torch.Tensor, t: int) -> torch.Tensor:
        P, K, A = self.upto(t)
        return torch.einsum("bn,nlc->blc", component_weights(q, K, A), P)


class CodaPrompts(PromptModule):
    def __init__(self, cfg: CodaPromptConfig, n_tasks: int, dims: dict[int, int], key_dim: int):
        super().__init__(cfg.blocks)
        per_task = cfg.pool // n_tasks  # the code's int(pool / n_tasks)
        if per_task == 0:
            raise ConfigError(f"coda-prompt: method.pool {cfg.pool} has fewer components than the {n_tasks} tasks")
        if cfg.length % 2:
            raise ConfigError(f"coda-prompt: a prefix splits into L/2 keys and L/2 values; method.length {cfg.length} is odd")
        self.ortho_weight = cfg.ortho_weight
        self.components = nn.ModuleList([CodaComponents(n_tasks, per_task, cfg.length, dims[b], key_dim)
                                         for b in self.blocks])

    def begin(self, task):
        super().begin(task)
        for c in self.components:
            c.init_task(task)

    def prefixes(self, q):
        out = {b: split_prefix(c.prompt(q, self.task)) for b, c in zip(self.blocks, self.components)}
        loss = None
        if self.learning and self.ortho_weight > 0:
            loss = self.ortho_weight * sum(ortho_penalty(X) for c in self.components for X in c.upto(self.task))
        return out, loss

    def trainable(self):
        t = self.task
        return [X[t] for c in self.components for X in (c.P, c.K, c.A)]


@register
class CodaPrompt(PromptMethod):
    """CODA-Prompt (CVPR 2023): attention-weighted prompt components, earlier ones frozen, new ones orthogonal."""

    name = "coda-prompt"
    Config = CodaPromptConfig

    def make_prompts(self):
        slots = prefix_slots(self.model.backbone, self.cfg.blocks)
        return CodaPrompts(self.cfg, len(self.run.scenario), {b: prefix_dim(a) for b, a in slots.items()},
                           self.model.backbone.feature_dim)
