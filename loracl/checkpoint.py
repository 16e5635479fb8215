"""Checkpoints written atomically, holding only what differs from the pretrained backbone.

A per-task checkpoint of a ViT-B run would be 350 MB if it held every weight; most weights never change,
so only tensors whose bytes differ from the freshly built model's (merged weights, heads, branches) are
stored. Loading rebuilds the model from the config, then loads this subset on top.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import torch


def tensor_digest(t: torch.Tensor) -> str:
    # reshape(-1): a 0-dim tensor (CLIP's logit_scale) cannot be viewed as bytes directly
    b = t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
    return hashlib.blake2b(b, digest_size=16).hexdigest()


def digests(module: torch.nn.Module) -> dict[str, str]:
    return {k: tensor_digest(v) for k, v in module.state_dict().items()}


def changed_state(module: torch.nn.Module, base: dict[str, str]) -> dict[str, torch.Tensor]:
    out = {}
    for k, v in module.state_dict().items():
        if k not in base or tensor_digest(v) != base[k]:
            out[k] = v.detach().cpu().clone()
    return out


def atomic_save(obj, path: Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)


def load(path: Path):
    return torch.load(path, map_location="cpu", weights_only=False)
