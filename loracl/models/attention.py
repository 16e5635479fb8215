"""The patched-attention room: the attention modules of timm and open_clip, adapted in place, never copied.

An attention module's class is swapped for a subclass with the same parameters and state dict:
- timm `Attention` becomes `PatchedAttention`;
- `nn.MultiheadAttention` (open_clip) becomes `PatchedMultiheadAttention`: its fused in-projection runs through
  its LoRA layer (`lora_in`), since nn.MultiheadAttention computes q, k, v inside a functional call that no
  module hook sees, and `out_proj` is called as a module so that its LoRA hook fires too.
With nothing set (no prefix, no LoRA slice, no tap) each calls the original forward: bit-identical.

LoRA and prompts are peers here. A block may carry a `Prefix` (per-sample keys and values, B x P x C) for the
length of one forward (`prefixed`), in one of two modes:
- "concat": prepended to the block's keys and values, inside the block's softmax (prefix tuning, as the code of
  L2P / DualPrompt / CODA-Prompt does); the queries and the token sequence are unchanged;
- "residual": attended with its own softmax, softmax(q pk^T / sqrt(d)) pv, scaled per sample by `weight`, and
  added to the attention output before the out-projection (DIKI): zero values, or weight 0, change nothing.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import Attention

from ..errors import ConfigError
from .lora import LoRALayer

MODES = ("concat", "residual")


@dataclass
class Prefix:
    keys: torch.Tensor  # B x P x C
    values: torch.Tensor  # B x P x C
    mode: str = "concat"
    weight: torch.Tensor | None = None  # residual: per-sample scale (B); None: 1

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"unknown prefix mode '{self.mode}' ({', '.join(MODES)})")


def _pad_mask(mask: torch.Tensor, n: int) -> torch.Tensor:
    """Extend an attention mask over n prefix keys in front; prefix keys are never masked."""
    if mask.dtype == torch.bool:  # SDPA's boolean masks say where to attend
        return torch.cat([mask.new_ones(*mask.shape[:-1], n), mask], -1)
    return F.pad(mask, (n, 0))


def _attend(q, k, v, pk, pv, prefix: Prefix, mask, dropout: float) -> torch.Tensor:
    """Scaled dot-product attention (B x H x L x D) with a prefix (pk, pv: B x H x P x D) in its mode."""
    if prefix.mode == "concat":
        if mask is not None:
            mask = _pad_mask(mask, pk.shape[2])
        return F.scaled_dot_product_attention(q, torch.cat([pk, k], 2), torch.cat([pv, v], 2), attn_mask=mask,
                                              dropout_p=dropout)
    o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout)
    r = F.scaled_dot_product_attention(q, pk, pv)
    if prefix.weight is not None:
        r = r * prefix.weight.to(r.dtype).view(-1, 1, 1, 1)
    return o + r


class PatchedAttention(Attention):
    """timm's Attention with an optional per-sample prefix."""

    prefix: Prefix | None = None

    def forward(self, x, attn_mask=None, **kw):
        if self.prefix is None:
            return super().forward(x, attn_mask=attn_mask, **kw)
        if kw.get("is_causal"):
            raise ValueError("prefixes on causal attention are not supported")
        B, N, _ = x.shape
        H, D = self.num_heads, self.head_dim
        gate = self.gate(x).sigmoid() if getattr(self, "gate", None) is not None else None
        q, k, v = self.qkv(x).reshape(B, N, 3, H, D).permute(2, 0, 3, 1, 4).unbind(0)
        pk, pv = (p.to(k.dtype).reshape(B, -1, H, D).transpose(1, 2) for p in (self.prefix.keys, self.prefix.values))
        # the prefix keys live where the projected keys do (before timm's optional qk-norm)
        q, k, pk = self.q_norm(q), self.k_norm(k), self.k_norm(pk)
        x = _attend(q, k, v, pk, pv, self.prefix, attn_mask, self.attn_drop.p if self.training else 0.0)
        x = self.norm(x.transpose(1, 2).reshape(B, N, H * D))
        if gate is not None:
            x = x * gate
        return self.proj_drop(self.proj(x))


class PatchedMultiheadAttention(nn.MultiheadAttention):
    """nn.MultiheadAttention (open_clip) with LoRA on its fused in-projection and an optional prefix."""

    lora_in: LoRALayer
    prefix: Prefix | None = None

    def forward(self, query, key, value, key_padding_mask=None, need_weights=True, attn_mask=None,
                average_attn_weights=True, is_causal=False):
        if self.prefix is None and not (self.lora_in.slices or self.lora_in.taps):  # the untouched module
            return nn.MultiheadAttention.forward(self, query, key, value, key_padding_mask, need_weights, attn_mask,
                                                 average_attn_weights, is_causal)
        if self.prefix is not None and is_causal:
            raise ValueError("prefixes on causal attention are not supported")
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
                    for br in self.lora_in.branches[name].values():
                        y = y + br(x).to(y.dtype)
                parts.append(y)
            q, k, v = parts
        B, L, _ = q.shape
        S = k.shape[1]
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
        dropout = self.dropout if self.training else 0.0
        if self.prefix is None:
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout,
                                               is_causal=bool(is_causal and mask is None))
        else:
            pk, pv = (p.to(k.dtype).reshape(B, -1, H, E // H).transpose(1, 2)
                      for p in (self.prefix.keys, self.prefix.values))
            o = _attend(q, k, v, pk, pv, self.prefix, mask, dropout)
        o = self.out_proj(o.transpose(1, 2).reshape(B, L, E))
        if not self.batch_first:
            o = o.transpose(0, 1)
        return o, None


def patch_attention(attn: nn.Module) -> nn.Module:
    """Swap an attention module's class for its patched subclass (idempotent; no new parameters or state)."""
    if isinstance(attn, (PatchedAttention, PatchedMultiheadAttention)):
        return attn
    if type(attn) is Attention:
        attn.__class__ = PatchedAttention
    elif isinstance(attn, nn.MultiheadAttention):
        if not attn._qkv_same_embed_dim or attn.bias_k is not None or attn.add_zero_attn:
            raise ValueError("loracl adapts nn.MultiheadAttention with a fused in_proj_weight and no bias_k / "
                             "add_zero_attn")
        attn.lora_in = LoRALayer(attn, "in_proj_weight", {})  # empty: no parameters, no state-dict keys
        attn.__class__ = PatchedMultiheadAttention
    else:
        raise TypeError(f"loracl patches timm's Attention and nn.MultiheadAttention, not {type(attn).__name__}")
    attn.prefix = None
    return attn


def attach_mha(mha: nn.MultiheadAttention, slices: dict[str, tuple[int, int]]) -> LoRALayer:
    """Attach (or extend) the LoRA layer of an nn.MultiheadAttention's fused in-projection."""
    layer = patch_attention(mha).lora_in
    for name, rows in slices.items():
        if name not in layer.slices:
            layer.slices[name] = rows
            layer.branches[name] = nn.ModuleDict()
    return layer


def prefix_dim(attn: nn.Module) -> int:
    """Width C of a block's keys and values (a prefix token's size)."""
    return attn.embed_dim if isinstance(attn, nn.MultiheadAttention) else attn.qkv.out_features // 3


def prefix_slots(backbone, blocks: list[int], encoder: str = "image") -> dict[int, nn.Module]:
    """The (patched) attention modules of an encoder's chosen blocks."""
    all_blocks = backbone.encoder_blocks()[encoder]
    bad = [b for b in blocks if not 0 <= b < len(all_blocks)]
    if bad:
        raise ConfigError(f"prompt block(s) {bad} out of range: the {encoder} encoder has {len(all_blocks)} blocks")
    return {b: patch_attention(all_blocks[b].attn) for b in blocks}


@contextlib.contextmanager
def prefixed(slots: dict[int, nn.Module], prefixes: dict[int, Prefix]):
    """Set each block's prefix for the duration of one forward; cleared whatever happens."""
    try:
        for b, p in prefixes.items():
            slots[b].prefix = p
        yield
    finally:
        for b in prefixes:
            slots[b].prefix = None
