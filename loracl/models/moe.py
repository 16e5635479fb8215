"""A mixture of parallel adapters routed per sample (MoE-Adapters, Yu et al., CVPR 2024), as one branch kind on a
block's `mlp` site, and an autoencoder bank that says which router an image belongs to (its DDAS).

Gating (Shazeer et al., 2017, as the official `mtil/clip/model.py` computes it): on a sample's first token h,

    clean = h W_gate[t],   noisy = clean + eps * (softplus(h W_noise[t]) + 1e-2),  eps ~ N(0, 1), while training
    the top k of (noisy or clean) get softmax weights over those k logits, the others 0
    importance = sum over the batch of the gates;  load = sum over the batch of P(expert in the top k)
    balance loss = cv^2(importance) + cv^2(load),  cv^2(v) = var(v) / (mean(v)^2 + 1e-10)

`t` is the router in use (one per task). The branch adds sum_e gate_e * expert_e(x) to the MLP's output, each
expert run only on the samples routed to it.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .. import dist
from .branches import Adapter, branch_kind


def cv_squared(v: torch.Tensor) -> torch.Tensor:
    """The squared coefficient of variation of a vector (0 for one element): small when v is uniform."""
    v = v.float()
    if v.numel() == 1:
        return v.new_zeros(())
    return v.var() / (v.mean() ** 2 + 1e-10)


def noisy_top_k(h: torch.Tensor, w_gate: torch.Tensor, w_noise: torch.Tensor, k: int, noisy: bool,
                noise_eps: float = 1e-2, split: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Gates (n x E, k non-zero per row, summing to 1) and the load per expert (differentiable when noisy).
    `split`: h is this process's share of a global batch; the noise is drawn for the global batch (every
    process draws it alike) and this share's rows are taken, as one process would draw them."""
    clean = h @ w_gate.to(h)
    n_exp = clean.shape[1]
    if noisy:
        std = F.softplus(h @ w_noise.to(h)) + noise_eps
        lo, total = dist.batch_offset(len(h), h.device) if split else (0, len(h))
        noise = torch.randn(total, n_exp, device=h.device, dtype=clean.dtype)[lo:lo + len(h)]
        logits = clean + noise * std
    else:
        logits = clean
    top, idx = logits.topk(min(k + 1, n_exp), dim=1)
    gates = torch.zeros_like(logits).scatter(1, idx[:, :k], torch.softmax(top[:, :k], dim=1))
    if not (noisy and k < n_exp):
        return gates, (gates > 0).sum(0).to(gates.dtype)
    # the probability that each expert stays in the top k under fresh noise (the k-th and k+1-th noisy values
    # are the thresholds for experts in and out of the top k)
    normal = torch.distributions.Normal(torch.zeros((), device=h.device), torch.ones((), device=h.device))
    thr_in, thr_out = top[:, k:k + 1], top[:, k - 1:k]
    is_in = logits > thr_in
    prob = torch.where(is_in, normal.cdf((clean - thr_in) / std), normal.cdf((clean - thr_out) / std))
    return gates, prob.sum(0)


@branch_kind
class ExpertMixture(nn.Module):
    """`experts` parallel adapters (AdaptFormer, with dropout) and one noisy top-k router per task. `route`
    (a buffer, so that a change is seen by the text head's cache) names the router in use; `learning` the one
    that trains; `frozen` the experts that no longer train. While training it counts how often each expert is
    chosen (`counts`, not a buffer: the method sums it over processes) and keeps the balance loss (`aux`).
    `split`: its inputs are shares of a global batch under torchrun (the image encoder's, not the class prompts'
    that every process encodes whole): the gate noise and the balance loss's sums are the global batch's."""

    kind = "moe"

    def __init__(self, d: int, experts: int, width: int, scale: float, dropout: float, routers: int, top_k: int,
                 batch_first: bool = True, frozen=(), learning: int = 0, split: bool = False):
        super().__init__()
        self.experts = nn.ModuleList(Adapter(d, d, width, scale, dropout=dropout) for _ in range(experts))
        for e in self.experts:  # the official init: down kaiming-uniform (nn.Linear's), biases zero, up zero
            nn.init.zeros_(e.down.bias)
        self.w_gate = nn.ParameterList(nn.Parameter(torch.zeros(d, experts)) for _ in range(routers))
        self.w_noise = nn.ParameterList(nn.Parameter(torch.zeros(d, experts)) for _ in range(routers))
        self.register_buffer("route", torch.tensor(int(learning)))
        self.top_k, self.batch_first, self.split = int(top_k), bool(batch_first), bool(split)
        self.frozen, self.learning = sorted(int(e) for e in frozen), int(learning)
        self.counts = torch.zeros(experts, dtype=torch.float64)
        self.aux: list[torch.Tensor] = []

    @property
    def dtype(self) -> torch.dtype:
        return self.w_gate[0].dtype

    def set_route(self, t: int) -> None:
        if int(self.route) != t:
            self.route.fill_(t)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xs = x if self.batch_first else x.transpose(0, 1)  # samples first
        t = int(self.route)
        gates, load = noisy_top_k(xs[:, 0], self.w_gate[t], self.w_noise[t], self.top_k, self.training,
                                  split=self.split)
        if self.training and torch.is_grad_enabled():
            importance = gates.sum(0)
            if self.split:  # the global batch's statistics, as one process has them
                importance, load = dist.sum_with_grad(torch.stack([importance, load.to(importance)])).unbind(0)
            self.aux.append(cv_squared(importance) + cv_squared(load))
            self.counts += (gates > 0).sum(0).to(self.counts)
        out = torch.zeros_like(xs)
        for e in torch.nonzero(gates.sum(0)).flatten().tolist():
            rows = torch.nonzero(gates[:, e]).flatten()
            y = self.experts[e](xs.index_select(0, rows)) * gates.index_select(0, rows)[:, e, None, None].to(x)
            out = out.index_add(0, rows, y.to(out.dtype))
        return out if self.batch_first else out.transpose(0, 1)

    def delta_weight(self) -> torch.Tensor:
        raise TypeError("a mixture of adapters is not linear in its input: it cannot be merged into a weight")

    def restore_trainable(self) -> None:
        """While a router learns, every expert takes part in autograd, the frozen ones too, so that a step's
        cost does not depend on how many samples the router sends to frozen experts (the run's FLOPs are one
        step's, extrapolated); the method leaves `frozen_parameters()` out of the optimiser and drops their
        gradients before each step."""
        for p in self.experts.parameters():
            p.requires_grad_(self.learning >= 0)
        for t, (g, n) in enumerate(zip(self.w_gate, self.w_noise)):
            g.requires_grad_(t == self.learning)
            n.requires_grad_(t == self.learning)

    def frozen_parameters(self) -> list[nn.Parameter]:
        return [p for e in self.frozen for p in self.experts[e].parameters()]

    def freeze(self) -> None:
        self.frozen = list(range(len(self.experts)))
        self.learning = -1
        self.restore_trainable()

    def spec(self) -> dict:
        ex = self.experts[0]
        return {"kind": self.kind, "d": ex.down.in_features, "experts": len(self.experts),
                "width": ex.down.out_features, "scale": ex.scale, "dropout": ex.dropout, "routers": len(self.w_gate),
                "top_k": self.top_k, "batch_first": self.batch_first, "frozen": list(self.frozen),
                "learning": self.learning, "split": self.split}

    @classmethod
    def from_spec(cls, sp: dict, shared=None) -> "ExpertMixture":
        return cls(sp["d"], sp["experts"], sp["width"], sp["scale"], sp["dropout"], sp["routers"], sp["top_k"],
                   sp["batch_first"], sp["frozen"], sp["learning"], sp.get("split", False))


class AutoencoderBank(nn.Module):
    """DDAS's task selector: one autoencoder per slot (slot 0: the reference images, slot t + 1: task t), each
    Linear(d, code) + ReLU, Linear(code, d) + sigmoid on sigmoid(CLIP image feature); `trained` marks the slots
    in use. `errors(f)` is each trained slot's reconstruction MSE per image (inf for the others)."""

    group = "ddas"

    def __init__(self, d: int, slots: int, code: int = 100):
        super().__init__()
        self.aes = nn.ModuleList(nn.Sequential(nn.Linear(d, code), nn.ReLU(), nn.Linear(code, d), nn.Sigmoid())
                                 for _ in range(slots))
        self.register_buffer("trained", torch.zeros(slots, dtype=torch.bool))

    def trainable(self) -> list[nn.Parameter]:
        return []  # trained by the method's own loop, never by the task's optimiser

    def reconstruction_error(self, slot: int, feats: torch.Tensor) -> torch.Tensor:
        target = torch.sigmoid(feats.float())
        return (self.aes[slot](target) - target).pow(2).mean(-1)

    def errors(self, feats: torch.Tensor) -> torch.Tensor:
        out = torch.full((len(feats), len(self.aes)), float("inf"), device=feats.device)
        for s in torch.nonzero(self.trained).flatten().tolist():
            out[:, s] = self.reconstruction_error(s, feats)
        return out
