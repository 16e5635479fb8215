"""The official codes' forward, for the bench's naive reference only: every branch of a weight summed into one
dense d_out x d_in matrix in each forward (the official InfLoRA code), a cost that grows with the branches."""

from __future__ import annotations

import contextlib

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..models.branches import branch_from_spec, branch_kind


@branch_kind
class DenseSum(nn.Module):
    """Several branches applied as one dense matrix formed in every forward (sum of B_k A_k, then x W^T)."""

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

    def freeze(self) -> None:
        for br in self.parts:
            br.freeze()

    def spec(self) -> dict:
        return {"kind": self.kind, "parts": [br.spec() for br in self.parts]}

    @classmethod
    def from_spec(cls, sp: dict, shared=None) -> "DenseSum":
        return cls([branch_from_spec(p, shared) for p in sp["parts"]])


@contextlib.contextmanager
def dense_sums(adapter):
    """Within the block, each slice's branches are applied as one `DenseSum`; put back as they were after."""
    saved = []
    for layer in adapter.layers:
        for name, branches in layer.branches.items():
            if len(branches):
                saved.append((layer, name, branches))
                layer.branches[name] = nn.ModuleDict({"dense": DenseSum(list(branches.values()))})
    try:
        yield
    finally:
        for layer, name, branches in saved:
            layer.branches[name] = branches
