"""SD-LoRA: scalable decoupled LoRA (Wu et al., ICLR 2025; BASELINES.md section 2).

Every adapted weight computes  W0 + sum_{k<t} alpha_k up_k down_k / n_k + alpha_t up_t down_t / n_t : the
earlier tasks' directions frozen and normalised, the current one (down_t, up_t) trained, and one magnitude per
task, shared by every adapted layer (q and v alike), all of them trained and re-initialised at the start of
every task. No task identity at test time.

- `variant: official` (the authors' code): n_k = ||up_k||_F ||down_k||_F for old directions, the current one
  unnormalised (n_t = 1) until it is frozen, magnitudes start at 0.8.
- `variant: paper`: n_k = ||up_k down_k||_F for every direction, the current one included; magnitudes start at 1.
- `sd-lora-rr` (a named configuration): rank 10 for tasks 0-3, 8 for tasks 4-7, 6 from task 8 on (the paper's
  rank reduction).
- `sd-lora-kd` (a named configuration): after each task, least squares of the new normalised direction on the old ones (jointly over
  every layer, since the magnitudes are shared); if the relative residual is below `kd_threshold` the new
  direction is dropped and alpha_t d_k is added to the old magnitudes (the paper's knowledge absorption).

The earlier directions of one weight are one `FrozenDirections` branch tagged `frozen` (models/branches.py): a
per-step cost that stops growing with the task count, where the official code sums every earlier branch in each
forward. The current direction is the branch tagged `current`.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field

from ..models.branches import (
    FrozenDirections,
    Magnitudes,
    ScaledBranch,
    direction_norm,
    new_branch_factors,
)
from . import register
from .base import Capabilities, LoRAOptions, Method, Variant

NAME = "sd-lora magnitudes"
CURRENT, FROZEN = "current", "frozen"


class SDLoRAConfig(LoRAOptions):
    rank: int = Field(10, ge=1)
    variant: Literal["official", "paper"] = "official"
    magnitude_init: float | None = Field(None, description="None: 0.8 (official) or 1.0 (paper)")
    rank_schedule: list[list[int]] | None = Field(None, description="[[first task, rank], ...] (sd-lora-rr)")
    absorb: bool = Field(False, description="knowledge absorption after each task (sd-lora-kd)")
    kd_threshold: float = Field(9e-4, gt=0, description="relative residual below which a direction is absorbed")


def rank_for_task(t: int, base: int, schedule: list[list[int]] | None) -> int:
    """The rank of task t's direction: the last schedule entry whose first task is <= t (else `base`)."""
    rank = base
    for first, r in sorted(schedule or []):
        if t >= first:
            rank = r
    return rank


def absorption_coefficients(old: torch.Tensor, new: torch.Tensor) -> tuple[torch.Tensor, float]:
    """Least squares d = argmin ||new - old^T d|| for stacked vectorised directions `old` (k x D) and `new` (D);
    returns d and the relative squared residual ||new - old^T d||^2 / ||new||^2."""
    d = torch.linalg.lstsq(old.double().t(), new.double()[:, None]).solution[:, 0]
    res = (new.double() - old.double().t() @ d).pow(2).sum() / new.double().pow(2).sum().clamp_min(1e-30)
    return d, float(res)


@register
class SDLoRA(Method):
    """SD-LoRA (ICLR 2025): frozen normalised directions of earlier tasks, shared per-task magnitudes re-learned."""

    name = "sd-lora"
    Config = SDLoRAConfig
    caps = Capabilities(lora=True, all_params_every_step=True)
    variants = {
        "sd-lora-rr": Variant("SD-LoRA-RR: SD-LoRA with the paper's rank reduction (10, then 8 from task 4, 6 from "
                              "task 8).", settings={"rank_schedule": [[0, 10], [4, 8], [8, 6]]}),
        "sd-lora-kd": Variant("SD-LoRA-KD: SD-LoRA with knowledge absorption of new directions that the old ones "
                              "already span.", settings={"absorb": True}),
    }

    @property
    def init(self) -> float:
        if self.cfg.magnitude_init is not None:
            return self.cfg.magnitude_init
        return 0.8 if self.cfg.variant == "official" else 1.0

    @property
    def norm(self) -> str:
        return "factors" if self.cfg.variant == "official" else "product"

    def setup(self):
        self.model.inject_lora(self.cfg)
        self.magnitudes = self.model.own(NAME, Magnitudes(len(self.run.scenario), self.init))

    def begin_task(self, task):
        self.add_task_classes(task)
        t, rank = task.index, rank_for_task(task.index, self.cfg.rank, self.cfg.rank_schedule)
        with torch.no_grad():
            self.magnitudes.alpha.fill_(self.init)  # every magnitude re-learned from its initial value
        current = "none" if self.cfg.variant == "official" else "product"
        for s in self.model.adapter.sites:
            down, up = new_branch_factors(rank, s.d_in, s.d_out)
            s.add(ScaledBranch(down, up, self.magnitudes, NAME, t, current), CURRENT)
        self.magnitudes.learning = True
        self.model.set_trainable("lora+head+owned")

    @torch.no_grad()
    def end_task(self, task):
        self.magnitudes.learning = False
        self.model.set_trainable("none")
        new = self.model.adapter.pop(CURRENT)
        if self.cfg.absorb and task.index > 0 and self.absorb(task.index, new):
            return
        for s, br in zip(self.model.adapter.sites, new):
            if s.get(FROZEN) is None:  # the first task: the frozen sum of this weight starts
                s.add(FrozenDirections(s.d_in, s.d_out, self.magnitudes, NAME), FROZEN)
            s.get(FROZEN).add(br.down, br.up, task.index, self.norm)

    def absorb(self, t: int, new: list[ScaledBranch]) -> bool:
        """SD-LoRA-KD: least squares of the new direction's contribution on the old normalised directions,
        all layers at once (the magnitudes are shared); absorbed when the relative residual is small."""
        olds, cur = [], []
        for s, br in zip(self.model.adapter.sites, new):
            fd = s.get(FROZEN)
            olds.append(torch.stack([fd.direction(k).flatten() for k in range(t)]))
            cur.append((br.up @ br.down / direction_norm(br.down, br.up, br.norm)).flatten())
        d, residual = absorption_coefficients(torch.cat(olds, 1), torch.cat(cur))
        absorbed = residual < self.cfg.kd_threshold
        self.run.log(f"  sd-lora-kd: task {t} relative residual {residual:.2e}: "
                     f"{'absorbed into the earlier magnitudes' if absorbed else 'kept'}")
        if absorbed:  # alpha_t C ~ alpha_t sum_k d_k N_k: the old magnitudes take the new direction over
            a = self.magnitudes.alpha
            a[:t] += a[t] * d.to(a.dtype)
        return absorbed
