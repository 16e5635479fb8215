"""Kinds of LoRA branch, and the one initialiser of a new trainable branch.

A branch is a module with `forward(x)` (its output on input x), `delta_weight()` (the same as a d_out x d_in
matrix, for merges), `dtype`, `restore_trainable()` (its own requires_grad flags) and `spec()` (a dict naming
its `kind` and shapes) from which `BRANCH_KINDS[kind].from_spec(spec, shared)` rebuilds an empty one before a
checkpoint is loaded; `shared` maps names to modules the model owns, for kinds whose scale is a parameter
shared across layers (SD-LoRA's magnitudes). A new kind is a class decorated with `@branch_kind`.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

BRANCH_KINDS: dict[str, type[nn.Module]] = {}


def branch_kind(cls):
    if cls.kind in BRANCH_KINDS:
        raise ValueError(f"branch kind '{cls.kind}' is registered twice")
    BRANCH_KINDS[cls.kind] = cls
    return cls


def new_branch_factors(rank: int, d_in: int, d_out: int) -> tuple[torch.Tensor, torch.Tensor]:
    """PEFT's default LoRA init: down kaiming-uniform (a = sqrt 5), up zero, so a new branch adds nothing."""
    down = torch.empty(rank, d_in)
    torch.nn.init.kaiming_uniform_(down, a=math.sqrt(5))
    return down, torch.zeros(d_out, rank)


@branch_kind
class Branch(nn.Module):
    """One low-rank branch: delta W = scale * up @ down."""

    kind = "lora"

    def __init__(self, down: torch.Tensor, up: torch.Tensor, scale: float = 1.0,
                 train_down: bool = True, train_up: bool = True):
        super().__init__()
        if down.shape[0] != up.shape[1]:
            raise ValueError(f"rank mismatch: down {tuple(down.shape)} vs up {tuple(up.shape)}")
        self.down = nn.Parameter(down.detach().clone(), requires_grad=train_down)
        self.up = nn.Parameter(up.detach().clone(), requires_grad=train_up)
        self.scale = float(scale)
        self.train_down, self.train_up = train_down, train_up

    @property
    def rank(self) -> int:
        return self.down.shape[0]

    @property
    def dtype(self) -> torch.dtype:
        return self.down.dtype

    def delta_weight(self) -> torch.Tensor:
        return self.scale * (self.up @ self.down)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.scale * F.linear(F.linear(x, self.down), self.up)

    def restore_trainable(self) -> None:
        self.down.requires_grad_(self.train_down)
        self.up.requires_grad_(self.train_up)

    def spec(self) -> dict:
        return {"kind": self.kind, "d_in": self.down.shape[1], "d_out": self.up.shape[0], "rank": self.rank,
                "scale": self.scale, "train_down": self.train_down, "train_up": self.train_up}

    @classmethod
    def from_spec(cls, sp: dict, shared=None) -> "Branch":
        return cls(torch.zeros(sp["rank"], sp["d_in"]), torch.zeros(sp["d_out"], sp["rank"]), sp["scale"],
                   sp["train_down"], sp["train_up"])

    def extra_repr(self) -> str:
        return f"rank={self.rank}, scale={self.scale:g}"


@branch_kind
class DenseSum(nn.Module):
    """Several branches applied as one dense matrix formed in every forward (sum of B_k A_k, then x W^T), as
    the official InfLoRA code does: the cost grows with the number of branches and is d_out x d_in per token.
    loracl's reference loop in `loracl bench` uses it (`LoRAAdapter.dense_sums`); runs never do."""

    kind = "dense-sum"

    def __init__(self, branches):
        super().__init__()
        self.parts = nn.ModuleList(branches)

    @property
    def dtype(self) -> torch.dtype:
        return self.parts[0].dtype

    def delta_weight(self) -> torch.Tensor:
        return sum(br.delta_weight() for br in self.parts)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.delta_weight())

    def restore_trainable(self) -> None:
        for br in self.parts:
            br.restore_trainable()

    def spec(self) -> dict:
        return {"kind": self.kind, "parts": [br.spec() for br in self.parts]}

    @classmethod
    def from_spec(cls, sp: dict, shared=None) -> "DenseSum":
        return cls([branch_from_spec(p, shared) for p in sp["parts"]])


def branch_from_spec(sp: dict, shared=None) -> nn.Module:
    """An empty branch of the kind and shapes `sp` describes (checkpoints before kinds existed: plain LoRA)."""
    kind = sp.get("kind", "lora")
    if kind not in BRANCH_KINDS:
        raise ValueError(f"checkpoint names an unknown LoRA branch kind '{kind}'")
    return BRANCH_KINDS[kind].from_spec(sp, shared)
