"""L2P: learning to prompt (Wang et al., CVPR 2022), as the L2P++ of CODA-Prompt's code that InfLoRA's tables use.

A pool of M prompts P_1..P_M (length L) with keys k_1..k_M shared by all tasks. For an image x:

    1. q(x)  = final-norm CLS of the frozen pretrained ViT (no prompts, no gradient)
    2. S(x)  = the top-N keys by cos(q(x), k_i)                          (training and test alike)
    3. the selected prompts, each split into L/2 key and L/2 value tokens, are prefixed to the attention
       of block 0 (L2P++: prefix tuning in the attention rather than the paper's prompt tokens at the input)
    4. loss  = CE over the task's classes + sum over S(x) of (1 - cos(q(x), k_i))

Defaults (BASELINES.md 4): M = 30, L = 20, N = 5, block 0.

Where the official code and the paper differ (the code's behaviour is the default):
- `tuning`: prefix (the code: L/2 key and L/2 value tokens in block 0's attention) or prompt (the paper: the
  N x L prompt tokens prepended to the token sequence entering block 0, the classifier fed with the mean of
  their outputs; timm ViTs only). The paper's own setting is M = 10, L = 5, N = 5 (set pool / length / top_k).
- `key_loss`: official, CODA-Prompt's / InfLoRA's `(1 - cos_sim[:, k_idx]).sum()`, indexes the B x M cosines
  with the B x N selected indices, giving B x B x N terms: every selected key is pulled towards every query of
  the batch, and the sum is not divided by the batch size; paper: each sample's own selected keys towards its
  own query, averaged over the batch.
The key loss only trains the keys (q has no gradient and the selection is a top-k), so it changes which
prompts are chosen, never the prompts' or the head's gradients.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn as nn
import torch.nn.functional as F
from pydantic import Field

from .. import dist
from ..config import MethodConfig
from ..errors import ConfigError
from ..models.attention import prefix_dim, prefix_slots
from ..models.prompts import (
    PromptModule,
    batch_total,
    cosine_topk,
    prompt_tuned_features,
    split_prefix,
    uniform_,
)
from . import register
from .prompting import PromptMethod


class L2PConfig(MethodConfig):
    pool: int = Field(30, ge=1, description="prompts in the pool (M)")
    length: int = Field(20, ge=2, description="tokens per prompt (L): L/2 keys and L/2 values")
    top_k: int = Field(5, ge=1, description="prompts selected per image (N)")
    blocks: list[int] = Field(default_factory=lambda: [0], description="blocks whose attention gets the prefix")
    tuning: Literal["prefix", "prompt"] = Field("prefix", description="prefix tuning in the attention (code) or "
                                                                       "prompt tokens at the input (paper)")
    key_loss: Literal["official", "paper"] = Field("official", description="batch-summed cross terms (official "
                                                                           "code) or per-sample mean (paper)")


def key_matching_loss(q: torch.Tensor, keys: torch.Tensor, idx: torch.Tensor, variant: str) -> torch.Tensor:
    """sum (1 - cos(q, k_i)) over the selected keys; q (B x d, no gradient), keys (M x d), idx (B x N).

    official: the code's `(1 - cos_sim[:, k_idx]).sum()`, i.e. the sum over b, b', j of 1 - cos(q_b, k_idx[b', j])
    = sum over b', j of (B - <sum_b q_b / |q_b|, k_idx[b', j] / |k|>), with the sum over the global batch under
    torchrun (and times the world size, since DDP averages the processes' gradients); paper: per sample,
    averaged over the batch.
    """
    qn, kn = F.normalize(q, dim=-1), F.normalize(keys, dim=-1)[idx]  # B x d, B x N x d
    if variant == "paper":
        return (1 - (kn @ qn[:, :, None]).squeeze(-1)).sum(1).mean()
    qsum, n = batch_total(qn)
    return dist.world_size() * (n - kn @ qsum).sum()


class L2PPrompts(PromptModule):
    def __init__(self, cfg: L2PConfig, dims: dict[int, int], key_dim: int):
        super().__init__(cfg.blocks)
        if cfg.top_k > cfg.pool:
            raise ConfigError(f"l2p: method.top_k {cfg.top_k} > method.pool {cfg.pool}")
        self.top_k, self.key_loss, self.tuning = cfg.top_k, cfg.key_loss, cfg.tuning
        if self.tuning == "prompt" and self.blocks != [0]:
            raise ConfigError("l2p: prompt tuning prepends the tokens at the input (method.blocks: [0])")
        if self.tuning == "prefix" and cfg.length % 2:
            raise ConfigError(f"l2p: a prefix splits into L/2 keys and L/2 values; method.length {cfg.length} is odd")
        self.keys = uniform_(cfg.pool, key_dim)
        # one pool of prompts per prompted block, selected by the same keys
        self.pool = nn.ParameterList([uniform_(cfg.pool, cfg.length, dims[b]) for b in self.blocks])

    def prefixes(self, q):
        _, idx = cosine_topk(q, self.keys, self.top_k)
        prefixes = {b: split_prefix(P[idx]) for b, P in zip(self.blocks, self.pool)}  # P[idx]: B x N x L x C
        return prefixes, key_matching_loss(q, self.keys, idx, self.key_loss) if self.learning else None

    def features(self, backbone, x):
        if self.tuning == "prefix" or self.task < 0:
            return super().features(backbone, x)
        q = self.query(backbone, x)
        _, idx = cosine_topk(q, self.keys, self.top_k)
        self.aux_loss = key_matching_loss(q, self.keys, idx, self.key_loss) if self.learning else None
        return prompt_tuned_features(backbone, x, self.pool[0][idx].flatten(1, 2))  # B x N*L x C

    def trainable(self):
        return [self.keys, *self.pool]  # the pool is shared by all tasks


@register
class L2P(PromptMethod):
    """L2P++ (CVPR 2022, CODA-P's variant): a shared prompt pool, top-5 keys by cosine, prefix in block 0."""

    name = "l2p"
    Config = L2PConfig

    def make_prompts(self):
        slots = prefix_slots(self.model.backbone, self.cfg.blocks)
        return L2PPrompts(self.cfg, {b: prefix_dim(a) for b, a in slots.items()}, self.model.backbone.feature_dim)
