"""LoRA injected into existing timm / open_clip modules, never into a copy of them.

Notation (one convention for the whole project): an adapted weight computes `y = W x` with `W` of shape
`d_out x d_in`; a branch adds `scale * up @ down` where `down` is `r x d_in` and `up` is `d_out x r`.
InfLoRA's paper calls `down` B_t and `up` A_t; PEFT calls them lora_A and lora_B.

A `LoRALayer` owns every branch on one weight matrix. A fused projection (timm's `qkv`, CLIP's
`in_proj_weight`) is one layer with row slices `q`, `k`, `v`, so each slice has its own branches and they
all see the same input. Layers call their *taps* with the layer input on every forward: this is how the
token statistics of InfLoRA and KeepLoRA are collected without touching the model code.

The layer is a child of the module that owns the weight (`attn.qkv.lora`, `attn.lora_in`), so the
model's state dict holds the branches and the weights keep their original names.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable, Iterable

import torch
import torch.nn as nn
import torch.nn.functional as F

from .branches import Branch, DenseSum, branch_from_spec, new_branch_factors


class LoRALayer(nn.Module):
    """All branches on one weight matrix, keyed by row slice (`q`, `k`, `v` of a fused projection, or `all`)."""

    def __init__(self, host: nn.Module, weight_name: str, slices: dict[str, tuple[int, int]]):
        super().__init__()
        self.__dict__["_host"] = host  # plain attribute: the host owns us, not the other way round
        self.weight_name = weight_name
        self.slices = dict(slices)
        self.branches = nn.ModuleDict({name: nn.ModuleList() for name in slices})
        self.taps: dict[int, Callable[[torch.Tensor], None]] = {}
        self.active = True  # False: branches are skipped (the weight alone is used)
        self._next_tap = 0

    @property
    def weight(self) -> nn.Parameter:
        return getattr(self._host, self.weight_name)

    @property
    def d_in(self) -> int:
        return self.weight.shape[1]

    def slice_weight(self, name: str) -> torch.Tensor:
        """A view of the rows of W that `name` covers (writes go to W)."""
        a, b = self.slices[name]
        return self.weight[a:b]

    def add_branch(self, name: str, down: torch.Tensor, up: torch.Tensor, scale: float = 1.0,
                   train_down: bool = True, train_up: bool = True) -> Branch:
        a, b = self.slices[name]
        if up.shape[0] != b - a or down.shape[1] != self.d_in:
            raise ValueError(f"branch for slice {name} must be ({b - a} x r) @ (r x {self.d_in}); "
                             f"got up {tuple(up.shape)}, down {tuple(down.shape)}")
        w = self.weight
        return self.append(name, Branch(down.to(w.device, torch.float32), up.to(w.device, torch.float32), scale,
                                        train_down, train_up))

    def append(self, name: str, branch: nn.Module) -> nn.Module:
        """Add a branch of any kind to slice `name` (on the weight's device)."""
        self.branches[name].append(branch.to(self.weight.device))
        return branch

    def add_tap(self, fn: Callable[[torch.Tensor], None]) -> int:
        self._next_tap += 1
        self.taps[self._next_tap] = fn
        return self._next_tap

    def remove_tap(self, handle: int) -> None:
        self.taps.pop(handle, None)

    def branch_delta(self, branches, x: torch.Tensor) -> torch.Tensor:
        """The summed output of `branches` on input x, each branch low-rank (down, then up)."""
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
            if len(branches) == 0:
                continue
            a, b = self.slices[name]
            delta = self.branch_delta(branches, x).to(out.dtype)
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
    def merge(self, name: str, index: int = -1) -> nn.Module:
        """Fold branch `index` of slice `name` into W and remove it; returns it (for `unmerge`). A branch
        whose weights are not finite is refused: merging it would poison the weight for every later task."""
        br = self.branches[name][index]
        delta = br.delta_weight()
        if not bool(torch.isfinite(delta).all()):
            raise FloatingPointError(f"refusing to merge a LoRA branch with non-finite weights into "
                                     f"{self.weight_name} (slice {name}): the weight is left as it was")
        self.add_to_weight(name, delta)
        keep = [b for i, b in enumerate(self.branches[name]) if i != index % len(self.branches[name])]
        self.branches[name] = nn.ModuleList(keep)
        return br

    @torch.no_grad()
    def unmerge(self, name: str, branch: Branch) -> None:
        """Take a merged branch back out of W and make it live again."""
        self.add_to_weight(name, -branch.delta_weight())
        self.branches[name].append(branch)

    def extra_repr(self) -> str:
        return f"{self.weight_name}, slices={list(self.slices)}"


@dataclass(frozen=True, eq=False)
class Site:
    """One adapted projection: a row slice of one weight in one block of one encoder."""

    encoder: str
    block: int
    kind: str  # q, k, v, out, fc1, fc2
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
    def branches(self) -> nn.ModuleList:
        return self.layer.branches[self.slice]

    def add_branch(self, down, up, scale=1.0, train_down=True, train_up=True) -> Branch:
        return self.layer.add_branch(self.slice, down, up, scale, train_down, train_up)

    def add_fresh_branch(self, rank: int, scale: float = 1.0) -> Branch:
        """A new trainable branch that starts at zero output (`new_branch_factors`)."""
        return self.add_branch(*new_branch_factors(rank, self.d_in, self.d_out), scale)

    def merge(self, index: int = -1) -> Branch:
        return self.layer.merge(self.slice, index)

    def add_to_weight(self, delta: torch.Tensor) -> None:
        self.layer.add_to_weight(self.slice, delta)


# --------------------------------------------------------------------------------------------------
# nn.MultiheadAttention computes q, k, v from `in_proj_weight` inside a functional call, so no module
# hook can see them. `LoRAMultiheadAttention` is the same module (same parameters, same state dict)
# with a forward that routes the fused projection through its LoRA layer and calls `out_proj` as a
# module, so the out-projection's LoRA layer (a normal Linear hook) fires too.


class LoRAMultiheadAttention(nn.MultiheadAttention):
    lora_in: LoRALayer

    def forward(self, query, key, value, key_padding_mask=None, need_weights=True, attn_mask=None,
                average_attn_weights=True, is_causal=False):
        if not self.batch_first:
            query, key, value = (t.transpose(0, 1) for t in (query, key, value))
        E, H = self.embed_dim, self.num_heads
        w, bias = self.in_proj_weight, self.in_proj_bias
        if query is key and key is value:
            qkv = self.lora_in.apply_branches(query, F.linear(query, w, bias))
            q, k, v = qkv.split(E, dim=-1)
        else:  # cross-attention: each slice sees its own input
            parts = []
            for (name, (a, b)), x in zip((("q", (0, E)), ("k", (E, 2 * E)), ("v", (2 * E, 3 * E))),
                                         (query, key, value)):
                y = F.linear(x, w[a:b], None if bias is None else bias[a:b])
                if name in self.lora_in.slices:
                    for br in self.lora_in.branches[name]:
                        y = y + br(x).to(y.dtype)
                parts.append(y)
            q, k, v = parts
        B, L, _ = q.shape
        S = k.shape[1]
        prefix = getattr(self, "prefix", None)  # prompt methods: per-sample (keys, values), B x P x E each
        if prefix is not None:
            k, v = torch.cat([prefix[0].to(k.dtype), k], 1), torch.cat([prefix[1].to(v.dtype), v], 1)
        q = q.view(B, L, H, E // H).transpose(1, 2)
        k = k.view(B, -1, H, E // H).transpose(1, 2)
        v = v.view(B, -1, H, E // H).transpose(1, 2)
        mask = None
        if attn_mask is not None:
            mask = attn_mask
            if mask.dtype == torch.bool:
                mask = torch.zeros_like(mask, dtype=q.dtype).masked_fill(mask, float("-inf"))
            mask = mask.to(q.dtype)
            if mask.dim() == 3:  # (B*H, L, S)
                mask = mask.view(B, H, L, S)
        if key_padding_mask is not None:
            kpm = key_padding_mask
            if kpm.dtype == torch.bool:
                kpm = torch.zeros_like(kpm, dtype=q.dtype).masked_fill(kpm, float("-inf"))
            kpm = kpm.to(q.dtype).view(B, 1, 1, S)
            mask = kpm if mask is None else mask + kpm
        if prefix is not None and mask is not None:  # prefix keys are never masked
            mask = F.pad(mask, (prefix[0].shape[1], 0))
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=self.dropout if self.training else 0.0,
                                           is_causal=bool(is_causal and mask is None))
        o = self.out_proj(o.transpose(1, 2).reshape(B, L, E))
        if not self.batch_first:
            o = o.transpose(0, 1)
        return o, None


def _linear_hook(module: nn.Module, args, output):
    return module.lora.apply_branches(args[0], output)


def _extend(layer: LoRALayer, slices: dict[str, tuple[int, int]]) -> LoRALayer:
    for name, rows in slices.items():
        if name not in layer.slices:
            layer.slices[name] = rows
            layer.branches[name] = nn.ModuleList()
    return layer


def attach_linear(linear: nn.Linear, slices: dict[str, tuple[int, int]]) -> LoRALayer:
    """Attach (or extend) the LoRA layer of an nn.Linear."""
    if not hasattr(linear, "lora"):
        linear.lora = LoRALayer(linear, "weight", {})
        linear._lora_hook = linear.register_forward_hook(_linear_hook)
    return _extend(linear.lora, slices)


def attach_mha(mha: nn.MultiheadAttention, slices: dict[str, tuple[int, int]]) -> LoRALayer:
    """Attach (or extend) the LoRA layer of an nn.MultiheadAttention's fused in-projection."""
    if not mha._qkv_same_embed_dim or mha.bias_k is not None or mha.add_zero_attn:
        raise ValueError("LoRA on nn.MultiheadAttention needs a fused in_proj_weight without bias_k/add_zero_attn")
    if not isinstance(mha, LoRAMultiheadAttention):
        mha.__class__ = LoRAMultiheadAttention
        mha.lora_in = LoRALayer(mha, "in_proj_weight", {})
    return _extend(mha.lora_in, slices)


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

    def merge_all(self) -> None:
        for s in self.sites:
            while len(s.branches):
                s.merge(0)

    def clear(self) -> None:
        for layer in self.layers:
            for name in layer.branches:
                layer.branches[name] = nn.ModuleList()

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

    @contextlib.contextmanager
    def dense_sums(self):
        """Temporarily apply each slice's branches as one `DenseSum` (the official codes' forward)."""
        saved = []
        for layer in self.layers:
            for name, branches in layer.branches.items():
                if len(branches):
                    saved.append((layer, name, branches))
                    layer.branches[name] = nn.ModuleList([DenseSum(list(branches))])
        try:
            yield
        finally:
            for layer, name, branches in saved:
                layer.branches[name] = branches

    def structure(self) -> list[list[dict]]:
        return [[br.spec() for br in s.branches] for s in self.sites]

    def rebuild(self, structure: list[list[dict]], shared=None) -> None:
        """Recreate empty branches of the given kinds and shapes (before loading a state dict); `shared`: the
        modules the model owns, for kinds that share a parameter across layers."""
        if len(structure) != len(self.sites):
            raise ValueError("checkpoint LoRA structure does not match the model's adapted sites")
        self.clear()
        for site, specs in zip(self.sites, structure):
            for sp in specs:
                site.layer.append(site.slice, branch_from_spec(sp, shared))


def build_sites(projections: Iterable[tuple[str, int, str, nn.Module, str, tuple[int, int]]]) -> list[Site]:
    """Create sites from (encoder, block, kind, host module, weight name, rows) tuples."""
    sites = []
    for encoder, block, kind, host, weight_name, rows in projections:
        if isinstance(host, nn.MultiheadAttention):
            layer = attach_mha(host, {kind: rows})
        elif isinstance(host, nn.Linear):
            layer = attach_linear(host, {kind: rows})
        else:
            raise TypeError(f"cannot attach LoRA to {type(host).__name__}")
        sites.append(Site(encoder, block, kind, layer, kind))
    return sites
