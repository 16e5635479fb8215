"""LoRA injected into existing timm / open_clip modules, never into a copy of them.

Notation (one convention for the whole project): an adapted weight computes `y = W x` with `W` of shape
`d_out x d_in`; a branch adds `scale * up @ down` where `down` is `r x d_in` and `up` is `d_out x r`.
InfLoRA's paper calls `down` B_t and `up` A_t; PEFT calls them lora_A and lora_B.

A `LoRALayer` owns every branch on one weight matrix. A fused projection (timm's `qkv`, CLIP's
`in_proj_weight`) is one layer with row slices `q`, `k`, `v`, so each slice has its own branches and they
all see the same input. Layers call their *taps* with the layer input on every forward: this is how the
token statistics of InfLoRA and KeepLoRA are collected without touching the model code. A layer can also
sit on a module without a weight of its own (a block's MLP): its branches are then parallel adapters, which
add to the module's output and cannot be merged.

Branches are named, never addressed by position: each has a tag (`task3`, `frozen`, ...) unique on its slice,
and methods add, pop, freeze and merge them by tag (`Site`, `LoRAAdapter`). The tag is the branch's key in the
state dict (`...lora.branches.q.task3.down`); checkpoints written before tags existed name them by position.

The layer is a child of the module that owns the weight (`attn.qkv.lora`, `attn.lora_in`), so the
model's state dict holds the branches and the weights keep their original names.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn as nn

from .branches import Branch, branch_from_spec, new_branch_factors


def task_tag(t: int) -> str:
    """The tag of the branch a method adds for task t."""
    return f"task{t}"


class LoRALayer(nn.Module):
    """All branches on one weight matrix, keyed by row slice (`q`, `k`, `v` of a fused projection, or `all`),
    then by tag. `weight_name` None: a layer on a module without a weight (parallel adapters, `dims` given)."""

    def __init__(self, host: nn.Module, weight_name: str | None, slices: dict[str, tuple[int, int]],
                 dims: tuple[int, int] | None = None):
        super().__init__()
        self.__dict__["_host"] = host  # plain attribute: the host owns us, not the other way round
        self.weight_name = weight_name
        self.dims = dims
        self.slices = dict(slices)
        self.branches = nn.ModuleDict({name: nn.ModuleDict() for name in slices})
        self.taps: dict[int, Callable[[torch.Tensor], None]] = {}
        self.active = True  # False: branches are skipped (the weight alone is used)
        self.selected: frozenset[str] | None = None  # tags summed in a forward (None: every branch)
        self._next_tap = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Identity: a layer of parallel adapters is a child of its host, and a host that is an nn.Sequential
        (open_clip's MLP) calls it as its last step; the branches are added by the host's hook."""
        return x

    @property
    def weight(self) -> nn.Parameter:
        if self.weight_name is None:
            raise TypeError("this LoRA layer sits on a module without a weight (parallel adapters)")
        return getattr(self._host, self.weight_name)

    @property
    def device(self) -> torch.device:
        return next(self._host.parameters()).device

    @property
    def d_in(self) -> int:
        return self.weight.shape[1] if self.weight_name is not None else self.dims[0]

    def slice_weight(self, name: str) -> torch.Tensor:
        """A view of the rows of W that `name` covers (writes go to W)."""
        a, b = self.slices[name]
        return self.weight[a:b]

    def add(self, name: str, branch: nn.Module, tag: str) -> nn.Module:
        """Add a branch of any kind to slice `name` under `tag` (on the layer's device)."""
        if tag in self.branches[name]:
            raise ValueError(f"slice {name} already holds a branch tagged '{tag}'")
        self.branches[name][tag] = branch.to(self.device)
        return branch

    def add_tap(self, fn: Callable[[torch.Tensor], None]) -> int:
        self._next_tap += 1
        self.taps[self._next_tap] = fn
        return self._next_tap

    def remove_tap(self, handle: int) -> None:
        self.taps.pop(handle, None)

    def branch_delta(self, branches, x: torch.Tensor) -> torch.Tensor:
        """The summed output of `branches` (in the order they were added) on input x."""
        branches = list(branches)
        xin = x.to(branches[0].dtype) if not torch.is_autocast_enabled() else x
        delta = branches[0](xin)
        for br in branches[1:]:
            delta = delta + br(xin)
        return delta

    def apply_branches(self, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """Add every live branch's contribution to the host's output `out` (computed from input `x`)."""
        for tap in list(self.taps.values()):
            tap(x)
        if not self.active:
            return out
        for name, branches in self.branches.items():
            live = [br for t, br in branches.items() if self.selected is None or t in self.selected]
            if not live:
                continue
            a, b = self.slices[name]
            delta = self.branch_delta(live, x).to(out.dtype)
            if a == 0 and b == out.shape[-1]:
                out = out + delta
            else:
                out = torch.cat([out[..., :a], out[..., a:b] + delta, out[..., b:]], dim=-1)
        return out

    @torch.no_grad()
    def add_to_weight(self, name: str, delta: torch.Tensor) -> None:
        w = self.slice_weight(name)
        w.add_(delta.to(w.device, w.dtype))

    @torch.no_grad()
    def merge(self, name: str, tag: str) -> nn.Module:
        """Fold branch `tag` of slice `name` into W and remove it; returns it (for `unmerge`). A branch
        whose weights are not finite is refused: merging it would poison the weight for every later task."""
        br = self.branches[name][tag]
        delta = br.delta_weight()
        if not bool(torch.isfinite(delta).all()):
            raise FloatingPointError(f"refusing to merge a LoRA branch with non-finite weights into "
                                     f"{self.weight_name} (slice {name}): the weight is left as it was")
        self.add_to_weight(name, delta)
        del self.branches[name][tag]
        return br

    @torch.no_grad()
    def unmerge(self, name: str, branch: nn.Module, tag: str) -> None:
        """Take a merged branch back out of W and make it live again."""
        self.add_to_weight(name, -branch.delta_weight())
        self.add(name, branch, tag)

    def extra_repr(self) -> str:
        return f"{self.weight_name or 'parallel'}, slices={list(self.slices)}"


@dataclass(frozen=True, eq=False)
class Site:
    """One adapted projection: a row slice of one weight in one block of one encoder, and its named branches."""

    encoder: str
    block: int
    kind: str  # q, k, v, out, fc1, fc2; mlp (parallel adapters beside a block's MLP)
    layer: LoRALayer
    slice: str

    @property
    def name(self) -> str:
        return f"{self.encoder}.{self.block}.{self.kind}"

    @property
    def d_in(self) -> int:
        return self.layer.d_in

    @property
    def d_out(self) -> int:
        a, b = self.layer.slices[self.slice]
        return b - a

    def weight(self) -> torch.Tensor:
        return self.layer.slice_weight(self.slice)

    @property
    def branches(self) -> nn.ModuleDict:
        """tag -> branch, in the order they were added (read it; change it with the verbs below)."""
        return self.layer.branches[self.slice]

    def get(self, tag: str) -> nn.Module | None:
        return self.branches[tag] if tag in self.branches else None

    def add(self, branch: nn.Module, tag: str) -> nn.Module:
        return self.layer.add(self.slice, branch, tag)

    def add_lora(self, down, up, *, tag: str, scale: float = 1.0, train_down: bool = True,
                 train_up: bool = True) -> Branch:
        """A plain LoRA branch scale * up @ down, its factors' trainability declared."""
        if up.shape[0] != self.d_out or down.shape[1] != self.d_in:
            raise ValueError(f"branch for {self.name} must be ({self.d_out} x r) @ (r x {self.d_in}); "
                             f"got up {tuple(up.shape)}, down {tuple(down.shape)}")
        return self.add(Branch(down.float(), up.float(), scale, train_down, train_up), tag)

    def add_fresh(self, rank: int, scale: float, tag: str) -> Branch:
        """A new trainable branch that starts at zero output (`new_branch_factors`)."""
        return self.add_lora(*new_branch_factors(rank, self.d_in, self.d_out), tag=tag, scale=scale)

    def pop(self, tag: str) -> nn.Module:
        br = self.branches[tag]
        del self.branches[tag]
        return br

    def freeze(self, tag: str) -> None:
        """Branch `tag` stops training for good (its declared flags say so, in checkpoints too)."""
        self.branches[tag].freeze()

    def merge(self, tag: str) -> nn.Module:
        return self.layer.merge(self.slice, tag)

    def add_to_weight(self, delta: torch.Tensor) -> None:
        self.layer.add_to_weight(self.slice, delta)


def _linear_hook(module: nn.Module, args, output):
    return module.lora.apply_branches(args[0], output)


def _extend(layer: LoRALayer, slices: dict[str, tuple[int, int]]) -> LoRALayer:
    for name, rows in slices.items():
        if name not in layer.slices:
            layer.slices[name] = rows
            layer.branches[name] = nn.ModuleDict()
    return layer


def attach_linear(linear: nn.Linear, slices: dict[str, tuple[int, int]]) -> LoRALayer:
    """Attach (or extend) the LoRA layer of an nn.Linear."""
    if not hasattr(linear, "lora"):
        linear.lora = LoRALayer(linear, "weight", {})
        linear._lora_hook = linear.register_forward_hook(_linear_hook)
    return _extend(linear.lora, slices)


def attach_parallel(module: nn.Module, d_in: int, d_out: int) -> LoRALayer:
    """Attach the layer of parallel adapters beside `module` (a block's MLP): its branches see the module's input
    and add to its output (AdaptFormer; MoE-Adapters' experts)."""
    if not hasattr(module, "lora"):
        module.lora = LoRALayer(module, None, {"mlp": (0, d_out)}, dims=(d_in, d_out))
        module._lora_hook = module.register_forward_hook(_linear_hook)
    return module.lora


class LoRAAdapter:
    """The adapted sites of a model, with the operations every method needs on all of them."""

    def __init__(self, sites: list[Site]):
        self.sites = sites

    @property
    def layers(self) -> list[LoRALayer]:
        seen, out = set(), []
        for s in self.sites:
            if id(s.layer) not in seen:
                seen.add(id(s.layer))
                out.append(s.layer)
        return out

    def sites_of(self, layer: LoRALayer) -> list[Site]:
        return [s for s in self.sites if s.layer is layer]

    def branch_parameters(self, trainable_only: bool = True) -> list[nn.Parameter]:
        out = []
        for layer in self.layers:
            for p in layer.parameters():
                if p.requires_grad or not trainable_only:
                    out.append(p)
        return out

    def live_branches(self) -> int:
        return sum(len(s.branches) for s in self.sites)

    # ---- every site at once, by tag ----------------------------------------------------------------
    def add_fresh(self, rank: int, scale: float, tag: str) -> None:
        """A new zero-output trainable branch `tag` on every site (PEFT's init: kaiming-uniform down, zero up)."""
        for s in self.sites:
            s.add_fresh(rank, scale, tag)

    def branches(self, tag: str) -> list[nn.Module]:
        """Branch `tag` of every site that holds one, in site order."""
        return [s.branches[tag] for s in self.sites if tag in s.branches]

    def freeze(self, tag: str) -> None:
        for s in self.sites:
            if tag in s.branches:
                s.freeze(tag)

    def pop(self, tag: str) -> list[nn.Module]:
        """Remove branch `tag` from every site; returns them in site order."""
        return [s.pop(tag) for s in self.sites if tag in s.branches]

    def merge_all(self) -> None:
        """Fold every live branch into its weight, in the order they were added."""
        for s in self.sites:
            for tag in list(s.branches):
                s.merge(tag)

    def clear(self) -> None:
        for layer in self.layers:
            for name in layer.branches:
                layer.branches[name] = nn.ModuleDict()

    @contextlib.contextmanager
    def inactive(self):
        """Temporarily compute the model without its live branches."""
        old = [layer.active for layer in self.layers]
        for layer in self.layers:
            layer.active = False
        try:
            yield
        finally:
            for layer, a in zip(self.layers, old):
                layer.active = a

    def select(self, tags) -> None:
        """From now on every layer sums only the branches tagged in `tags` (None: all); the others stay stored,
        unused (CL-LoRA runs one task's branches per forward). Not saved: a method sets it again in `restore`."""
        for layer in self.layers:
            layer.selected = None if tags is None else frozenset(tags)

    @contextlib.contextmanager
    def selected(self, tags):
        """`select(tags)` within the block only."""
        old = [layer.selected for layer in self.layers]
        self.select(tags)
        try:
            yield
        finally:
            for layer, sel in zip(self.layers, old):
                layer.selected = sel

    def structure(self) -> list[list[dict]]:
        return [[{**br.spec(), "tag": tag} for tag, br in s.branches.items()] for s in self.sites]

    def rebuild(self, structure: list[list[dict]], shared=None) -> None:
        """Recreate empty branches of the given kinds, shapes and tags (before loading a state dict); `shared`:
        the modules the model owns, for kinds that share a parameter across layers."""
        if len(structure) != len(self.sites):
            raise ValueError("checkpoint LoRA structure does not match the model's adapted sites")
        self.clear()
        for site, specs in zip(self.sites, structure):
            for i, sp in enumerate(specs):
                site.add(branch_from_spec(sp, shared), str(sp.get("tag", i)))  # untagged: by position (older)
