"""Task arithmetic (Ilharco et al. 2023) on low-rank task vectors, written on plain tensors.

A task vector is `tau_i = theta_i - theta_pre`. When task i was learned by a LoRA branch, `tau_i` is zero
everywhere except on the adapted weights, where it is the branch's product `scale * up @ down`; so it is
stored as those factors (`LowRankDelta`, r x (d_in + d_out) numbers per weight instead of d_in x d_out).
The combined model is

    theta = theta_pre + lam * sum_i tau_i                          (Chitale et al. 2023, section 3)

and, per weight, `lam * sum_i scale_i up_i down_i = [lam scale_i up_i]_i @ [down_i]_i`: one matrix product
of the stacked factors, without forming any dense task vector.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class LowRankDelta:
    """delta W = scale * up @ down, with `down` r x d_in and `up` d_out x r (the project's LoRA convention)."""

    down: torch.Tensor
    up: torch.Tensor
    scale: float = 1.0

    def dense(self) -> torch.Tensor:
        return self.scale * (self.up @ self.down)

    def state(self) -> dict:
        return {"down": self.down, "up": self.up, "scale": self.scale}

    @classmethod
    def from_state(cls, s: dict) -> "LowRankDelta":
        return cls(s["down"], s["up"], float(s["scale"]))


TaskVector = dict[str, LowRankDelta]  # adapted weight (site name) -> its low-rank difference


def task_vector(theta_i: dict[str, torch.Tensor], theta_pre: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The dense task vector tau_i = theta_i - theta_pre, weight by weight (the reference form; the compact
    one is `task_vector_of_branches`)."""
    return {k: theta_i[k] - theta_pre[k] for k in theta_pre}


def task_vector_of_branches(sites, tag: str) -> TaskVector:
    """The task vector a set of LoRA sites holds in their branch `tag`, as factors (copied to CPU)."""
    out = {}
    for s in sites:
        br = s.get(tag)
        if br is None:
            raise ValueError(f"site {s.name} holds no branch '{tag}'")
        out[s.name] = LowRankDelta(br.down.detach().float().cpu().clone(), br.up.detach().float().cpu().clone(),
                                   br.scale)
    return out


def combined_delta(deltas: list[LowRankDelta], lam: float) -> torch.Tensor:
    """lam * sum_i scale_i up_i @ down_i, as one product of stacked factors."""
    up = torch.cat([d.scale * d.up for d in deltas], dim=1)
    down = torch.cat([d.down for d in deltas], dim=0)
    return lam * (up @ down)


def combine(theta_pre: dict[str, torch.Tensor], vectors: list[TaskVector], lam: float) -> dict[str, torch.Tensor]:
    """theta_pre + lam * sum_i tau_i for every weight that some task vector touches (others: theta_pre)."""
    out = {}
    for name, w in theta_pre.items():
        deltas = [v[name] for v in vectors if name in v]
        out[name] = w + combined_delta(deltas, lam).to(w) if deltas else w.clone()
    return out


def combine_dense(theta_pre: dict[str, torch.Tensor], taus: list[dict[str, torch.Tensor]],
                  lam: float) -> dict[str, torch.Tensor]:
    """The same combination from dense task vectors (the reference form)."""
    return {k: w + lam * sum(t[k] for t in taus) for k, w in theta_pre.items()}


def resolve_lambda(lam: float | str, n_tasks: int) -> float:
    """A scaling coefficient: a number, or '1/N' (the mean of the N task vectors so far)."""
    if isinstance(lam, str):
        if lam.replace(" ", "") != "1/N":
            raise ValueError(f"lambda must be a number or '1/N', got {lam!r}")
        return 1.0 / n_tasks
    return float(lam)
