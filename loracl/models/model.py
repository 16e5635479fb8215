"""The model every method trains: a pretrained backbone, its LoRA adapter and a head over global class ids."""

from __future__ import annotations

import torch
import torch.nn as nn

from ..config import RunConfig
from .backbones import Backbone, create_backbone
from .heads import Head, LinearHead, TextHead
from .lora import LoRAAdapter


class ContinualModel(nn.Module):
    def __init__(self, backbone: Backbone, head: Head):
        super().__init__()
        self.backbone = backbone
        self.head = head
        self.adapter: LoRAAdapter | None = None
        self.lora_spec: dict | None = None
        # modules a method owns (a cosine head, prompt pools, shared magnitudes): registered here so that DDP
        # averages their gradients, checkpoints hold them and .to(device) moves them; no method all-reduces
        self.owned = nn.ModuleDict()

    def own(self, name: str, module: nn.Module) -> nn.Module:
        """Register a method's module with the model (once per name; create it in `setup` or rebuild it from
        `structure` so that a resumed run finds it before the state dict is loaded)."""
        if name in self.owned:
            raise ValueError(f"the model already owns a module named '{name}'")
        dev = next(self.backbone.parameters()).device
        self.owned[name] = module.to(dev)
        return module

    @property
    def prompts(self) -> nn.Module | None:
        """The prompt module (L2P, DualPrompt, CODA-Prompt), owned as 'prompts'; it computes the features."""
        return self.owned["prompts"] if "prompts" in self.owned else None

    def features(self, x: torch.Tensor) -> torch.Tensor:
        prompts = self.prompts
        if prompts is not None:  # the prompt module draws its query and conditions the backbone's forward
            return prompts.features(self.backbone, x)
        return self.backbone.features(x)

    def forward(self, x: torch.Tensor, class_ids: torch.Tensor, return_features: bool = False):
        """Logits over `class_ids` (a 1-D tensor of global ids), columns in that order; with
        `return_features`, (logits, features). A loss that needs the features too must take them from here,
        not from a second call of `features`: under torchrun only this forward goes through DDP, which
        averages the gradients across processes."""
        feats = self.features(x)
        logits = self.head(feats, class_ids)
        return (logits, feats) if return_features else logits

    def inject_lora(self, kinds: list[str], blocks: list[int] | None = None,
                    encoders: list[str] | None = None) -> LoRAAdapter:
        """Attach LoRA layers once per run; methods then add, train and merge branches on its sites."""
        if self.adapter is not None:
            raise RuntimeError("LoRA is already injected into this model")
        self.adapter = self.backbone.inject_lora(kinds, blocks, encoders)
        self.lora_spec = {"kinds": list(kinds), "blocks": blocks, "encoders": encoders}
        dev = next(self.backbone.parameters()).device
        self.backbone.to(dev)
        return self.adapter

    def set_trainable(self, policy: str) -> None:
        """Freeze policy: 'none', 'head', 'lora', 'lora+head', 'full' (backbone weights), 'full+head'."""
        for p in self.parameters():
            p.requires_grad_(False)
        parts = set(policy.split("+"))
        if "head" in parts:
            for p in self.head.parameters():
                p.requires_grad_(True)
        if "full" in parts:
            for n, p in self.backbone.named_parameters():
                if ".lora" not in n and "pretrained_head" not in n:
                    p.requires_grad_(True)
        if "lora" in parts and self.adapter is not None:
            for s in self.adapter.sites:
                for br in s.branches:
                    br.restore_trainable()

    def structure(self) -> dict:
        return {"lora_spec": self.lora_spec,
                "lora": self.adapter.structure() if self.adapter is not None else None,
                "head": self.head.structure(),
                "owned": {k: m.structure() for k, m in self.owned.items() if hasattr(m, "structure")}}

    def rebuild(self, structure: dict) -> None:
        if structure.get("lora_spec") and self.adapter is None:
            spec = structure["lora_spec"]
            self.inject_lora(spec["kinds"], spec["blocks"], spec["encoders"])
        for name, sub in structure.get("owned", {}).items():  # owned modules exist (setup made them)
            if name not in self.owned:
                raise ValueError(f"checkpoint holds a module '{name}' that this method does not own")
            self.owned[name].rebuild(sub)
        if structure.get("lora") is not None:
            self.adapter.rebuild(structure["lora"], shared=self.owned)
        self.head.rebuild(structure["head"])


def build_model(cfg: RunConfig, device: torch.device) -> ContinualModel:
    backbone = create_backbone(cfg.backbone, keep_pretrained_head=cfg.eval.retention is not None)
    if cfg.head.kind == "text":
        if backbone.family != "open_clip":
            raise ValueError("head.kind 'text' needs an open_clip backbone")
        head = TextHead(backbone, cfg.head.templates)
    else:
        head = LinearHead(backbone.feature_dim, cosine=cfg.head.kind == "cosine", scale=cfg.head.cosine_scale)
    return ContinualModel(backbone, head).to(device)
