"""The model every method trains: a pretrained backbone, its LoRA adapter and a head over global class ids.

What trains is declared on the model (`set_trainable`), on the branches (their factors' flags) and on the modules
a method owns (their `trainable()`), and the model applies the declaration again whenever it is rebuilt from a
checkpoint: a resumed run trains exactly what the uninterrupted one did, and `param_groups` is a pure query.
"""

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
        self._trainable: tuple[frozenset, tuple | None] = (frozenset(), None)

    @property
    def device(self) -> torch.device:
        return next(self.backbone.parameters()).device

    def own(self, name: str, module: nn.Module) -> nn.Module:
        """Register a method's module with the model (once per name; create it in `setup` so that a resumed run
        finds it before the state dict is loaded). What of it trains is its `trainable()` (default: all of it),
        in the optimiser group its `group` names (default "backbone")."""
        if name in self.owned:
            raise ValueError(f"the model already owns a module named '{name}'")
        self.owned[name] = module.to(self.device)
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

    def inject_lora(self, options) -> LoRAAdapter:
        """Attach LoRA layers once per run where `options` (a method's LoRAOptions: targets, blocks, encoders)
        says; methods then add, train and merge named branches on its sites."""
        return self._inject(list(options.targets), options.blocks, options.encoders)

    def _inject(self, kinds: list[str], blocks: list[int] | None, encoders: list[str] | None) -> LoRAAdapter:
        if self.adapter is not None:
            raise RuntimeError("LoRA is already injected into this model")
        self.adapter = self.backbone.inject_lora(kinds, blocks, encoders)
        self.lora_spec = {"kinds": list(kinds), "blocks": blocks, "encoders": encoders}
        self.backbone.to(self.device)
        return self.adapter

    # ---- what trains ---------------------------------------------------------------------------------
    def set_trainable(self, policy: str, head=None) -> None:
        """Declare what trains: '+'-joined parts of 'lora' (the branches, as each declares), 'head' (every head
        chunk, or with `head=` class ids only the chunks holding them), 'full' (every encoder weight of the
        backbone, CLIP's temperature and the pretrained head excepted), 'owned' (what each owned module's
        `trainable()` gives); 'none' for nothing. The declaration is applied now and after every rebuild."""
        parts = frozenset(p for p in policy.split("+") if p != "none")
        bad = parts - {"lora", "head", "full", "owned"}
        if bad:
            raise ValueError(f"unknown trainable part(s) {sorted(bad)} in '{policy}'")
        self._trainable = (parts, None if head is None else tuple(int(i) for i in head))
        self.apply_trainable()

    def apply_trainable(self) -> None:
        parts, head_ids = self._trainable
        for p in self.parameters():
            p.requires_grad_(False)
        if "head" in parts:
            params = self.head.parameters() if head_ids is None else self.head.chunk_of(head_ids).parameters()
            for p in params:
                p.requires_grad_(True)
        if "full" in parts:
            for p in self.backbone.encoder_parameters():
                p.requires_grad_(True)
        if "lora" in parts and self.adapter is not None:
            for s in self.adapter.sites:
                for br in s.branches.values():
                    br.restore_trainable()
        if "owned" in parts:
            for m in self.owned.values():
                for p in (m.trainable() if hasattr(m, "trainable") else m.parameters()):
                    p.requires_grad_(True)

    def param_groups(self) -> dict[str, list[nn.Parameter]]:
        """What trains now, by optimiser group: "backbone" (weights, branches), "head", and the groups owned
        modules name ("prompts", ...)."""
        groups = {"backbone": [p for p in self.backbone.parameters() if p.requires_grad],
                  "head": [p for p in self.head.parameters() if p.requires_grad]}
        for m in self.owned.values():
            groups.setdefault(getattr(m, "group", "backbone"), []).extend(
                p for p in m.parameters() if p.requires_grad)
        return groups

    def structure(self) -> dict:
        return {"lora_spec": self.lora_spec,
                "lora": self.adapter.structure() if self.adapter is not None else None,
                "head": self.head.structure(),
                "owned": {k: m.structure() for k, m in self.owned.items() if hasattr(m, "structure")}}

    def rebuild(self, structure: dict) -> None:
        if structure.get("lora_spec") and self.adapter is None:
            spec = structure["lora_spec"]
            self._inject(spec["kinds"], spec["blocks"], spec["encoders"])
        for name, sub in structure.get("owned", {}).items():  # owned modules exist (setup made them)
            if name not in self.owned:
                raise ValueError(f"checkpoint holds a module '{name}' that this method does not own")
            self.owned[name].rebuild(sub)
        if structure.get("lora") is not None:
            self.adapter.rebuild(structure["lora"], shared=self.owned)
        self.head.rebuild(structure["head"])
        self.apply_trainable()


def build_model(cfg: RunConfig, device: torch.device) -> ContinualModel:
    backbone = create_backbone(cfg.backbone, keep_pretrained_head=cfg.eval.retention is not None)
    if cfg.head.kind == "text":
        if backbone.family != "open_clip":
            raise ValueError("head.kind 'text' needs an open_clip backbone")
        head = TextHead(backbone, cfg.head.templates)
    else:
        head = LinearHead(backbone.feature_dim, cosine=cfg.head.kind == "cosine", scale=cfg.head.cosine_scale)
    return ContinualModel(backbone, head).to(device)
