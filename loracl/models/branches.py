"""Kinds of LoRA branch, and the one initialiser of a new trainable branch.

A branch is a module with `forward(x)` (its output on input x), `delta_weight()` (the same as a d_out x d_in
matrix, for merges; a parallel adapter has none), `dtype`, `restore_trainable()` (sets its requires_grad flags
as it declares them), `freeze()` (declares it frozen for good) and `spec()` (a dict naming its `kind` and
shapes) from which `BRANCH_KINDS[kind].from_spec(spec, shared)` rebuilds an empty one before a checkpoint is
loaded; `shared` maps names to modules the model owns, for kinds whose scale is a parameter shared across
layers (SD-LoRA's magnitudes). A new kind is a class decorated with `@branch_kind`.
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

    def freeze(self) -> None:
        self.train_down = self.train_up = False
        self.restore_trainable()

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
class WeightedBranch(Branch):
    """A LoRA branch times a trainable scalar: weight * scale * up @ down (CL-LoRA's block weights)."""

    kind = "weighted"

    def __init__(self, down: torch.Tensor, up: torch.Tensor, scale: float = 1.0, train_down: bool = True,
                 train_up: bool = True, weight: float = 1.0, train_weight: bool = True):
        super().__init__(down, up, scale, train_down, train_up)
        self.weight = nn.Parameter(torch.tensor(float(weight)), requires_grad=train_weight)
        self.train_weight = train_weight

    def delta_weight(self) -> torch.Tensor:
        return self.weight * super().delta_weight()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.weight.to(x.dtype) * super().forward(x)

    def restore_trainable(self) -> None:
        super().restore_trainable()
        self.weight.requires_grad_(self.train_weight)

    def freeze(self) -> None:
        self.train_weight = False
        super().freeze()

    def spec(self) -> dict:
        return {**super().spec(), "train_weight": self.train_weight}

    @classmethod
    def from_spec(cls, sp: dict, shared=None) -> "WeightedBranch":
        return cls(torch.zeros(sp["rank"], sp["d_in"]), torch.zeros(sp["d_out"], sp["rank"]), sp["scale"],
                   sp["train_down"], sp["train_up"], 1.0, sp["train_weight"])


def branch_from_spec(sp: dict, shared=None) -> nn.Module:
    """An empty branch of the kind and shapes `sp` describes (checkpoints before kinds existed: plain LoRA)."""
    kind = sp.get("kind", "lora")
    if kind not in BRANCH_KINDS:
        raise ValueError(f"checkpoint names an unknown LoRA branch kind '{kind}'")
    return BRANCH_KINDS[kind].from_spec(sp, shared)


# --------------------------------------------------------------------------------------------------
# Branches scaled by magnitudes shared across layers (SD-LoRA): one trainable scalar per task, the same for
# every adapted layer, owned by the model (`ContinualModel.own`) and found by name when a checkpoint rebuilds.


class Magnitudes(nn.Module):
    """One magnitude per task, shared by every layer's directions: `alpha[k]` scales task k's direction.
    Its whole effect is in the branches' delta weights, so a model whose branches are merged no longer needs it
    (`folds_into_branches`: `loracl export` merges and drops it)."""

    kind = "magnitudes"
    group = "backbone"  # the optimiser group it trains in
    folds_into_branches = True

    def __init__(self, n: int, init: float = 1.0):
        super().__init__()
        self.alpha = nn.Parameter(torch.full((n,), float(init)))
        self.learning = False  # every magnitude trains while a task is learned

    def trainable(self) -> list[nn.Parameter]:
        return [self.alpha] if self.learning else []

    def structure(self) -> dict:
        return {"kind": self.kind, "n": self.alpha.numel()}

    def rebuild(self, structure: dict) -> None:
        if structure["n"] != self.alpha.numel():
            raise ValueError(f"checkpoint has {structure['n']} magnitudes, this run {self.alpha.numel()}")


def direction_norm(down: torch.Tensor, up: torch.Tensor, how: str) -> torch.Tensor:
    """The normaliser of the direction up @ down: 'factors' ||up||_F ||down||_F (SD-LoRA's official code),
    'product' ||up @ down||_F (its paper), 'none' 1."""
    if how == "factors":
        return up.norm() * down.norm()
    if how == "product":
        return (up @ down).norm()
    return down.new_ones(())


@branch_kind
class ScaledBranch(nn.Module):
    """alpha[index] * up @ down / norm(up @ down): a trainable direction whose scale is a shared magnitude
    (SD-LoRA's current task; the official code leaves it unnormalised, norm 'none')."""

    kind = "scaled"

    def __init__(self, down: torch.Tensor, up: torch.Tensor, magnitudes: Magnitudes, name: str, index: int,
                 norm: str = "none"):
        super().__init__()
        self.down = nn.Parameter(down.detach().clone().float())
        self.up = nn.Parameter(up.detach().clone().float())
        self.__dict__["magnitudes"] = magnitudes  # shared, owned by the model: not a child of every branch
        self.magnitudes_name, self.index, self.norm = name, int(index), norm

    @property
    def dtype(self) -> torch.dtype:
        return self.down.dtype

    @property
    def rank(self) -> int:
        return self.down.shape[0]

    def coefficient(self) -> torch.Tensor:
        return self.magnitudes.alpha[self.index] / direction_norm(self.down, self.up, self.norm)

    def delta_weight(self) -> torch.Tensor:
        return self.coefficient() * (self.up @ self.down)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.coefficient().to(x.dtype) * F.linear(F.linear(x, self.down), self.up)

    def restore_trainable(self) -> None:
        self.down.requires_grad_(True)
        self.up.requires_grad_(True)

    def freeze(self) -> None:
        raise TypeError("a scaled branch is frozen by moving it into the frozen directions (FrozenDirections.add)")

    def spec(self) -> dict:
        return {"kind": self.kind, "d_in": self.down.shape[1], "d_out": self.up.shape[0], "rank": self.rank,
                "magnitudes": self.magnitudes_name, "index": self.index, "norm": self.norm}

    @classmethod
    def from_spec(cls, sp: dict, shared=None) -> "ScaledBranch":
        return cls(torch.zeros(sp["rank"], sp["d_in"]), torch.zeros(sp["d_out"], sp["rank"]),
                   shared[sp["magnitudes"]], sp["magnitudes"], sp["index"], sp["norm"])


@branch_kind
class FrozenDirections(nn.Module):
    """Every earlier task's direction of one weight, frozen and normalised, each scaled by its task's shared
    magnitude: sum_k alpha[task_k] up_k @ down_k / norm_k, held as one stacked factor pair. Its forward runs low
    rank ((d_in + d_out) R per token for R stacked ranks) or as the dense sum (d_in d_out), whichever costs less
    (`low_rank_cheaper`, which counts the backward while the magnitudes train), so the cost stops growing with
    the task count once the dense sum is cheaper; without gradients the dense sum is kept until a magnitude
    changes."""

    kind = "frozen-directions"

    def __init__(self, d_in: int, d_out: int, magnitudes: Magnitudes, name: str):
        super().__init__()
        self.register_buffer("down", torch.zeros(0, d_in))
        self.register_buffer("up", torch.zeros(d_out, 0))
        self.register_buffer("inv_norm", torch.zeros(0))  # per stacked rank: 1 / its task's norm
        self.register_buffer("task", torch.zeros(0, dtype=torch.long))  # per stacked rank: its task
        self.__dict__["magnitudes"] = magnitudes
        self.magnitudes_name = name
        self._cache = None  # (alpha version, dense delta) while no gradient is wanted

    @property
    def dtype(self) -> torch.dtype:
        return self.down.dtype

    @property
    def ranks(self) -> list[int]:
        return torch.bincount(self.task).tolist() if len(self.task) else []

    @torch.no_grad()
    def add(self, down: torch.Tensor, up: torch.Tensor, task: int, norm: str) -> None:
        """Freeze one more direction (up @ down of task `task`, normalised as `norm` says)."""
        r, dev = down.shape[0], self.down.device
        n = direction_norm(down.float(), up.float(), norm).to(dev)
        self.down = torch.cat([self.down, down.detach().float().to(dev)])
        self.up = torch.cat([self.up, up.detach().float().to(dev)], dim=1)
        self.inv_norm = torch.cat([self.inv_norm, (1.0 / n).expand(r)])
        self.task = torch.cat([self.task, torch.full((r,), int(task), dtype=torch.long, device=dev)])
        self._cache = None

    def coefficients(self) -> torch.Tensor:
        return self.magnitudes.alpha[self.task] * self.inv_norm

    def direction(self, k: int) -> torch.Tensor:
        """Task k's frozen direction, normalised, without its magnitude: up_k @ down_k / norm_k (d_out x d_in)."""
        return (self.up * (self.inv_norm * (self.task == k))) @ self.down

    def delta_weight(self) -> torch.Tensor:
        return (self.up * self.coefficients()) @ self.down

    def low_rank_cheaper(self, training: bool, input_grad: bool, tokens: int) -> bool:
        """Multiply-adds per token: low rank R (d_in + d_out) against the dense d_in d_out. While the magnitudes
        train, the low-rank path adds the gradient through `up` (R d_out) and the dense path the weight's
        gradient (d_in d_out) and the dense sum's forming and its backward (2 R d_in d_out per batch of
        `tokens`); both add the input's gradient if it is wanted."""
        d_out, d_in, R = self.up.shape[0], self.down.shape[1], self.down.shape[0]
        low, dense = R * (d_in + d_out), d_in * d_out
        if not training:
            return low <= dense
        low, dense = low + R * d_out, 2 * dense + 2 * R * d_in * d_out / max(tokens, 1)
        if input_grad:
            low, dense = low + R * d_in, dense + d_in * d_out
        return low <= dense

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        alpha = self.magnitudes.alpha
        training = torch.is_grad_enabled() and alpha.requires_grad
        if self.low_rank_cheaper(training, training and x.requires_grad, x.numel() // max(x.shape[-1], 1)):
            return F.linear(F.linear(x, self.down) * self.coefficients().to(x.dtype), self.up)
        if training:
            return F.linear(x, self.delta_weight().to(x.dtype))
        if self._cache is None or self._cache[0] != alpha._version or self._cache[1].device != x.device:
            self._cache = (alpha._version, self.delta_weight().detach())
        return F.linear(x, self._cache[1].to(x.dtype))

    def restore_trainable(self) -> None:
        pass  # frozen: only the shared magnitudes train

    def freeze(self) -> None:
        pass

    def spec(self) -> dict:
        return {"kind": self.kind, "d_in": self.down.shape[1], "d_out": self.up.shape[0], "ranks": self.ranks,
                "magnitudes": self.magnitudes_name}

    @classmethod
    def from_spec(cls, sp: dict, shared=None) -> "FrozenDirections":
        fd = cls(sp["d_in"], sp["d_out"], shared[sp["magnitudes"]], sp["magnitudes"])
        R = sum(sp["ranks"])  # shapes only: the state dict brings the values
        fd.down, fd.up = torch.zeros(R, sp["d_in"]), torch.zeros(sp["d_out"], R)
        fd.inv_norm = torch.zeros(R)
        fd.task = torch.cat([torch.full((r,), k, dtype=torch.long) for k, r in enumerate(sp["ranks"])]) \
            if R else torch.zeros(0, dtype=torch.long)
        return fd


@branch_kind
class Adapter(nn.Module):
    """A parallel bottleneck adapter (AdaptFormer): scale * up(dropout(relu(down(x)))), beside a block's MLP on its
    input; `up` starts at zero, so a new adapter changes nothing. Not linear in x: it cannot be merged into a
    weight."""

    kind = "adapter"

    def __init__(self, d_in: int, d_out: int, width: int, scale: float = 0.1, trainable: bool = True,
                 dropout: float = 0.0):
        super().__init__()
        self.down = nn.Linear(d_in, width)
        self.up = nn.Linear(width, d_out)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)
        self.scale, self.trainable, self.dropout = float(scale), trainable, float(dropout)

    @property
    def dtype(self) -> torch.dtype:
        return self.down.weight.dtype

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.scale * self.up(F.dropout(F.relu(self.down(x)), self.dropout, self.training))

    def delta_weight(self) -> torch.Tensor:
        raise TypeError("a parallel adapter is not linear in its input: it cannot be merged into a weight")

    def restore_trainable(self) -> None:
        for p in self.parameters():
            p.requires_grad_(self.trainable)

    def freeze(self) -> None:
        self.trainable = False
        self.restore_trainable()

    def spec(self) -> dict:
        return {"kind": self.kind, "d_in": self.down.in_features, "d_out": self.up.out_features,
                "width": self.down.out_features, "scale": self.scale, "trainable": self.trainable,
                "dropout": self.dropout}

    @classmethod
    def from_spec(cls, sp: dict, shared=None) -> "Adapter":
        return cls(sp["d_in"], sp["d_out"], sp["width"], sp["scale"], sp["trainable"], sp.get("dropout", 0.0))
