"""A ViT split into a task-shared prefix and task-specific suffix, and the pieces CL-LoRA trains it with
(He et al., CVPR 2025; official code JiangpengHe/CL-LoRA).

- `orthonormal_down`: a fixed random down-projection with orthonormal rows (the official adapter's init:
  Q^T of the QR factorisation of a uniform d x r matrix);
- `prefix` / `suffix`: a timm ViT's embeddings and first `split` blocks, then the remaining blocks, the final
  norm and the CLS token (the official `forward_general_cls` is `suffix(prefix(x, k), k, k)`: the shared
  blocks alone, then the norm); evaluating several task-specific suffixes on one prefix computes the shared
  half once;
- `reassign_gradient_`: the shared up-projection's distillation gradient scaled per output row by the
  previous task's row norms, normalised to mean 1;
- `distillation`: soft cross-entropy between student and teacher logits at temperature T, summed over classes and
  averaged over the batch, without a T^2 factor and with the teacher not detached (official `_KD_loss`);
- `orthogonality`: mean over earlier tasks of |cos(previous block weights, current block weights)|.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def orthonormal_down(rank: int, d_in: int, generator: torch.Generator) -> torch.Tensor:
    """A rank x d_in matrix with orthonormal rows: Q^T of the QR of a U(0, 1) d_in x rank matrix."""
    q, _ = torch.linalg.qr(torch.rand(d_in, rank, generator=generator, dtype=torch.float64))
    return q.t().float().contiguous()


def prefix(vit, x: torch.Tensor, split: int) -> torch.Tensor:
    """Tokens after the embeddings and the first `split` blocks of a timm VisionTransformer."""
    h = vit.norm_pre(vit.patch_drop(vit._pos_embed(vit.patch_embed(x))))
    for blk in vit.blocks[:split]:
        h = blk(h)
    return h


def suffix(vit, h: torch.Tensor, split: int, end: int | None = None) -> torch.Tensor:
    """The pooled features (CLS after the final norm) of tokens `h` run through blocks split..end-1."""
    for blk in vit.blocks[split:end]:
        h = blk(h)
    return vit.forward_head(vit.norm(h), pre_logits=True)


@torch.no_grad()
def reassign_gradient_(up: torch.nn.Parameter, previous_up: torch.Tensor) -> None:
    """up.grad (d_out x r) *= w per row, w = the rows' norms of the previous up, scaled to mean 1 (in place)."""
    if up.grad is None:
        return
    w = previous_up.float().norm(dim=1)
    if float(w.sum()) == 0:  # a previous up of zeros carries no importance: leave the gradient as it is
        return
    up.grad.mul_((len(w) * w / w.sum()).to(up.grad.dtype).unsqueeze(1))


def distillation(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """-(softmax(teacher / T) * log_softmax(student / T)).sum() / batch (gradients reach both arguments)."""
    t = temperature
    return -(F.softmax(teacher.float() / t, dim=1) * F.log_softmax(student.float() / t, dim=1)).sum() / len(student)


def orthogonality(previous: list[torch.Tensor], current: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Mean over `previous` of |<p / ||p||, c / ||c||>| of the flattened tensors (0 without previous ones)."""
    if not previous:
        return current.new_zeros(())
    c = current.flatten()
    c = c / (c.norm() + eps)
    return sum((p.flatten() / (p.norm() + eps) * c).sum().abs() for p in previous) / len(previous)
