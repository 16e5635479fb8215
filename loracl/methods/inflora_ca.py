"""InfLoRA-CA: the official InfLoRA code's `InfLoRA_CA` (BASELINES.md section 1).

InfLoRA (methods/inflora.py) with the plain GPM memory ("remove" bases only, no DualGPM switch) and classifier
alignment after every task (loracl/alignment.py): declaring `classifier_alignment` makes the config loader switch
`align.enabled` on unless the config sets it. The official configs' optimiser (SGD momentum 0.9, cosine, lr 1e-3)
and ranks (5 on CIFAR-100, 10 on ImageNet-R) are in the presets `inflora-ca-cifar100` / `inflora-ca-imagenet-r-10`.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from . import register
from .inflora import InfLoRA, InfLoRAConfig


class InfLoRACAConfig(InfLoRAConfig):
    rank: int = Field(5, ge=1, description="r (official: 5 on CIFAR-100, 10 on ImageNet-R)")
    memory: Literal["dualgpm", "gpm"] = "gpm"


@register
class InfLoRACA(InfLoRA):
    """InfLoRA-CA (official InfLoRA_CA): InfLoRA with plain GPM and classifier alignment of all heads after each task."""

    name = "inflora-ca"
    Config = InfLoRACAConfig
    classifier_alignment = True
