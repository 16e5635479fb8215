"""Distillation of CLIP against a frozen reference CLIP and weight-space interpolation: the pieces ZSCL's code
builds its rows from (Thunderbeee/ZSCL `mtil/src/models/finetune.py`; BASELINES.md 5).

- `clip_distillation`: reference images scored against reference text embeddings (the reference model's, no
  gradient) by the model being trained and by the reference model, both with the trained model's logit scale;
  the loss is the soft cross-entropy CE(s / T, softmax(t / T)) * T^2 (its gradient is KL(t || s)'s), image side
  (each image over the texts) plus text side (the same logits transposed: each text over the images). LwF uses
  it with the previous task's model as reference and the current dataset as reference set; ZSCL with zero-shot
  CLIP and a separate reference set. Under torchrun both terms are taken over the global batch (the processes'
  features gathered, with gradient): the text side's softmax runs over every process's images, as in one process.
- `interpolate_`: theta <- alpha theta + (1 - alpha) theta_ref in place (WiSE-FT).
- `frozen_copy`: the reference model, a copy in eval mode with no gradients.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F

from .. import dist


def soft_cross_entropy(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """Mean over rows of CE(student / T, softmax(teacher / T)) * T^2 (ZSCL's `distillation`)."""
    t = temperature
    target = F.softmax(teacher.float() / t, dim=-1)
    return -(target * F.log_softmax(student.float() / t, dim=-1)).sum(-1).mean() * t * t


def clip_distillation(student_feats: torch.Tensor, teacher_feats: torch.Tensor, text: torch.Tensor, scale,
                      temperature: float = 2.0, image: bool = True, text_side: bool = True) -> torch.Tensor:
    """The image-side and text-side distillation terms on one batch of reference images; `text` holds unit text
    embeddings (rows), `scale` the trained model's logit scale (exp'ed)."""
    student_feats, teacher_feats = dist.cat_with_grad(student_feats), dist.cat_with_grad(teacher_feats)
    s = scale * F.normalize(student_feats.float(), dim=-1) @ text.t()
    with torch.no_grad():
        t = scale * F.normalize(teacher_feats.float(), dim=-1) @ text.t()
    loss = s.new_zeros(())
    if image:
        loss = loss + soft_cross_entropy(s, t, temperature)
    if text_side:
        loss = loss + soft_cross_entropy(s.t(), t.t(), temperature)
    return loss


def frozen_copy(module: torch.nn.Module) -> torch.nn.Module:
    ref = copy.deepcopy(module).eval()
    for p in ref.parameters():
        p.requires_grad_(False)
    return ref


@torch.no_grad()
def interpolate_(module: torch.nn.Module, reference: dict[str, torch.Tensor], alpha: float) -> None:
    """Every parameter named in `reference`: theta <- alpha theta + (1 - alpha) theta_ref."""
    for name, p in module.named_parameters():
        if name in reference:
            p.mul_(alpha).add_(reference[name].to(p.device, p.dtype), alpha=1 - alpha)
