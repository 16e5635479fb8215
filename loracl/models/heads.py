"""Classifier heads over a growing table of global class ids.

Every head scores a requested list of class ids (the columns of the returned logits follow that list),
so the same code serves class-incremental evaluation over all seen classes and cross-dataset evaluation
over one dataset's own classes. Heads learn classes in chunks (one per task); `LinearHead` therefore is
"per-task heads concatenated at test time", and a chunk can be extended for a growing head.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


class Head(nn.Module):
    # True: the head scores classes from their names alone (CLIP text), so it can be evaluated on a task
    # before training on it; the runner then registers every task's classes before the first task
    zero_shot: bool = False

    def add_classes(self, ids: list[int], names: list[str], templates: list[str] | None = None) -> None:
        raise NotImplementedError

    def knows(self, ids) -> bool:
        raise NotImplementedError

    def forward(self, feats: torch.Tensor, class_ids: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def structure(self) -> dict:
        return {}

    def rebuild(self, structure: dict) -> None:
        pass


class LinearHead(Head):
    """Per-task linear (or cosine) chunks; logits for any known class ids, in the requested order.

    Owned by a method beside the model's head (KeepLoRA+'s cosine head), it trains the chunk of the classes in
    `learning`, in the optimiser group "head"."""

    group = "head"

    def __init__(self, dim: int, cosine: bool = False, scale: float = 30.0):
        super().__init__()
        self.dim, self.cosine, self.scale = dim, cosine, scale
        self.chunks = nn.ModuleList()
        self.chunk_ids: list[list[int]] = []
        self.learning: list[int] | None = None
        self.register_buffer("column_of", torch.full((0,), -1, dtype=torch.long), persistent=False)

    def _reindex(self):
        ids = [i for c in self.chunk_ids for i in c]
        col = torch.full((max(ids, default=-1) + 1,), -1, dtype=torch.long)
        col[torch.tensor(ids, dtype=torch.long)] = torch.arange(len(ids))
        self.column_of = col.to(self.column_of.device)

    def add_classes(self, ids, names=None, templates=None):
        new = [i for i in ids if not self.knows([i])]
        if not new:
            return
        dev = self.column_of.device
        lin = nn.Linear(self.dim, len(new), bias=not self.cosine).to(dev)
        if self.cosine:
            nn.init.normal_(lin.weight, std=0.02)
        else:  # timm's head init: zero, so an untrained chunk gives no preference
            nn.init.trunc_normal_(lin.weight, std=0.02)
            nn.init.zeros_(lin.bias)
        self.chunks.append(lin)
        self.chunk_ids.append(list(new))
        self._reindex()

    def knows(self, ids) -> bool:
        ids = torch.as_tensor(list(ids) if not torch.is_tensor(ids) else ids).cpu()
        if len(ids) == 0:
            return True
        return bool(ids.max() < len(self.column_of)) and bool((self.column_of.cpu()[ids] >= 0).all())

    def all_logits(self, feats: torch.Tensor) -> torch.Tensor:
        if self.cosine:
            f = F.normalize(feats, dim=-1)
            return self.scale * torch.cat([F.linear(f, F.normalize(c.weight, dim=-1)) for c in self.chunks], -1)
        return torch.cat([c(feats) for c in self.chunks], dim=-1)

    def forward(self, feats, class_ids):
        logits = self.all_logits(feats)
        cols = self.column_of[class_ids.to(self.column_of.device)]
        return logits.index_select(-1, cols.to(logits.device))

    def logits_if_known(self, feats: torch.Tensor, class_ids: torch.Tensor) -> torch.Tensor:
        """`forward(feats, class_ids)` where every id has a chunk, zeros otherwise. Decided on the device, so a
        training step calling it on the device's class ids waits for nothing (`knows` reads them on the host)."""
        if not self.chunks:
            return feats.new_zeros(feats.shape[0], len(class_ids))
        n = len(self.column_of)
        ids = class_ids.to(self.column_of.device)
        cols = F.pad(self.column_of, (0, 1), value=-1)[torch.where((ids >= 0) & (ids < n), ids, n)]
        known = cols >= 0
        logits = F.pad(self.all_logits(feats), (0, 1))  # a zero column for the unknown ids
        out = logits.index_select(-1, torch.where(known, cols, logits.shape[-1] - 1).to(logits.device))
        return out * known.all().to(out.device)

    def trainable(self) -> list[nn.Parameter]:
        return list(self.chunk_of(self.learning).parameters()) if self.learning else []

    def chunk_of(self, ids) -> nn.Linear:
        for c, cids in zip(self.chunks, self.chunk_ids):
            if set(ids) <= set(cids):
                return c
        raise KeyError(f"no head chunk holds classes {list(ids)[:5]}...")

    @torch.no_grad()
    def set_rows(self, ids: list[int], weight: torch.Tensor, bias: torch.Tensor | None = None) -> None:
        for k, i in enumerate(ids):
            for c, cids in zip(self.chunks, self.chunk_ids):
                if i in cids:
                    r = cids.index(i)
                    c.weight[r] = weight[k].to(c.weight)
                    if bias is not None and c.bias is not None:
                        c.bias[r] = bias[k].to(c.bias)

    def structure(self):
        return {"chunk_ids": self.chunk_ids}

    def rebuild(self, structure):
        self.chunks = nn.ModuleList()
        self.chunk_ids = []
        self._reindex()  # forget the old columns, or classes already added (mid-task resume) look known
        for ids in structure["chunk_ids"]:
            self.add_classes(ids)


def prompt_embeddings(backbone, prompts: list[list[str]]) -> torch.Tensor:
    """One unit embedding per class: its prompts through `backbone`'s text encoder (one batch), each normalised,
    averaged and normalised again (CLIP's prompt ensembling)."""
    tok = backbone.tokenize([p for ps in prompts for p in ps]).to(backbone.logit_scale.device)
    e = F.normalize(backbone.encode_text(tok).float(), dim=-1)
    out, k = [], 0
    for ps in prompts:
        out.append(F.normalize(e[k:k + len(ps)].mean(0), dim=-1))
        k += len(ps)
    return torch.stack(out)


class TextHead(Head):
    """CLIP's zero-shot classifier: cosine similarity with text embeddings of prompted class names.

    Text embeddings are cached per class and recomputed only when the text encoder changed: the cache key
    holds the version counters of every text-side tensor (in-place optimiser steps and merges bump them).
    While the text encoder has trainable parameters and grad is on, embeddings are computed in the
    forward so that gradients reach it.
    """

    zero_shot = True

    def __init__(self, backbone, templates: str = "first"):
        super().__init__()
        self.__dict__["backbone"] = backbone  # not a child: the model owns the backbone
        self.templates_mode = templates
        self.prompts: dict[int, list[str]] = {}
        self._cache: dict = {"key": None, "ids": None, "emb": None}

    def add_classes(self, ids, names, templates=None):
        templates = templates or ["a photo of a {c}."]
        use = templates[:1] if self.templates_mode == "first" else templates
        for i, n in zip(ids, names):
            self.prompts[int(i)] = [t.replace("{c}", n) if "{c}" in t else t.format(n) for t in use]

    def knows(self, ids):
        return all(int(i) in self.prompts for i in (ids.tolist() if torch.is_tensor(ids) else ids))

    def _text_tensors(self):
        bb = self.backbone
        params = bb.text_parameters()
        for mod in bb.model.transformer.modules():
            params += [b for b in mod.buffers(recurse=False)]
        return params

    def _version_key(self):
        from .lora import LoRALayer

        active = tuple(m.active for m in self.backbone.model.transformer.modules() if isinstance(m, LoRALayer))
        return tuple((id(t), t._version) for t in self._text_tensors()) + (active,)

    def encode_batched(self, ids: list[int]) -> torch.Tensor:
        return prompt_embeddings(self.backbone, [self.prompts[i] for i in ids])

    def text_embeddings(self, class_ids: torch.Tensor) -> torch.Tensor:
        ids = [int(i) for i in class_ids.tolist()]
        needs_grad = torch.is_grad_enabled() and any(p.requires_grad for p in self.backbone.text_parameters())
        if needs_grad:
            return self.encode_batched(ids)
        key = self._version_key()
        c = self._cache
        if c["key"] != key or c["ids"] is None or not set(ids) <= set(c["ids"]):
            with torch.no_grad():
                known = sorted(self.prompts) if len(self.prompts) <= 4096 else ids
                emb = torch.cat([self.encode_batched(known[k:k + 256]) for k in range(0, len(known), 256)])
            c.update(key=key, ids=known, emb=emb, index={i: k for k, i in enumerate(known)})
        idx = torch.tensor([c["index"][i] for i in ids], device=c["emb"].device)
        return c["emb"].index_select(0, idx)

    def forward(self, feats, class_ids):
        t = self.text_embeddings(class_ids)
        f = F.normalize(feats.float(), dim=-1)
        return self.backbone.logit_scale.exp().float() * f @ t.t()

    def structure(self):
        return {"prompts": {str(k): v for k, v in self.prompts.items()}}

    def rebuild(self, structure):
        self.prompts = {int(k): v for k, v in structure["prompts"].items()}
