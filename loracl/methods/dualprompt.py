"""DualPrompt (Wang et al., ECCV 2022), as CODA-Prompt's code that InfLoRA's tables use.

Two kinds of prompts, both prefixed to the attention (L/2 key tokens, L/2 value tokens):
- a G(eneral)-prompt of length 6 in blocks 0-1, shared by all tasks and trained in every task;
- one E(xpert)-prompt of length 20 per task in blocks 2-4, each with a key per block.

    training on task t:  E-prompt t for every image (the task identity is known), and in each E-block
                         loss = CE over the task's classes + sum over the batch of (1 - cos(q(x), k_t))
    test:                in each E-block, the E-prompt of the key most similar to q(x) (top-1 of the
                         tasks begun so far)

q(x) is the final-norm CLS of the frozen pretrained ViT (no prompts, no gradient). As in the official code,
the key loss is summed over the batch (not averaged) and every E-block has its own keys, chosen
independently at test. E-prompts and keys of earlier tasks are frozen: each task trains its own.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from pydantic import Field

from .. import dist
from ..config import MethodConfig
from ..errors import ConfigError
from ..models.attention import prefix_dim, prefix_slots
from ..models.prompts import PromptModule, cosine_topk, split_prefix, uniform_
from . import register
from .prompting import PromptMethod


class DualPromptConfig(MethodConfig):
    g_length: int = Field(6, ge=2, description="G-prompt length")
    g_blocks: list[int] = Field(default_factory=lambda: [0, 1], description="blocks with the G-prompt")
    e_length: int = Field(20, ge=2, description="E-prompt length")
    e_blocks: list[int] = Field(default_factory=lambda: [2, 3, 4], description="blocks with the E-prompts")


class DualPrompts(PromptModule):
    def __init__(self, cfg: DualPromptConfig, n_tasks: int, dims: dict[int, int], key_dim: int):
        if set(cfg.g_blocks) & set(cfg.e_blocks):
            raise ConfigError("dualprompt: method.g_blocks and method.e_blocks overlap")
        if cfg.g_length % 2 or cfg.e_length % 2:
            raise ConfigError("dualprompt: a prefix splits into L/2 keys and L/2 values; g_length and e_length must be even")
        super().__init__(cfg.g_blocks + cfg.e_blocks)
        self.g_blocks, self.e_blocks = sorted(cfg.g_blocks), sorted(cfg.e_blocks)
        self.g = nn.ParameterList([uniform_(cfg.g_length, dims[b]) for b in self.g_blocks])
        # [block][task]: one E-prompt and one key per task, separate tensors so that each task trains its own
        self.e = nn.ModuleList([nn.ParameterList([uniform_(cfg.e_length, dims[b]) for _ in range(n_tasks)])
                                for b in self.e_blocks])
        self.e_keys = nn.ModuleList([nn.ParameterList([uniform_(key_dim) for _ in range(n_tasks)])
                                     for _ in self.e_blocks])

    def prefixes(self, q):
        B, t = q.shape[0], self.task
        out = {b: split_prefix(g.expand(B, -1, -1)) for b, g in zip(self.g_blocks, self.g)}
        loss = q.new_zeros(()) if self.learning else None
        for b, prompts, keys in zip(self.e_blocks, self.e, self.e_keys):
            if self.learning:  # the true task's E-prompt; the key loss summed over the (global) batch
                loss = loss + dist.world_size() * (1 - F.cosine_similarity(q, keys[t][None], dim=-1)).sum()
                P = prompts[t].expand(B, -1, -1)
            else:  # the E-prompt of the best-matching key among the tasks begun so far
                _, idx = cosine_topk(q, torch.stack(list(keys[: t + 1])), 1)
                P = torch.stack(list(prompts[: t + 1]))[idx[:, 0]]
            out[b] = split_prefix(P)
        return out, loss

    def trainable(self):
        t = self.task
        return [*self.g] + [e[t] for e in self.e] + [k[t] for k in self.e_keys]


@register
class DualPrompt(PromptMethod):
    """DualPrompt (ECCV 2022): shared G-prompt in blocks 0-1, per-task E-prompts with keys in blocks 2-4."""

    name = "dualprompt"
    Config = DualPromptConfig

    def make_prompts(self):
        c = self.cfg
        slots = prefix_slots(self.model.backbone, c.g_blocks + c.e_blocks)
        return DualPrompts(c, len(self.run.scenario), {b: prefix_dim(a) for b, a in slots.items()},
                           self.model.backbone.feature_dim)
