"""The pieces of LoRA subtraction with a drift-resistant space (LoRA-DRS, Liu & Chang, CVPR 2025) that are plain
continual-learning math, on tensors and parameters:

- `drift_resistant_projector`: T = U U^T / ||U U^T||_F, U the eigenvectors of a layer's input second moment that
  hold `threshold` of its eigenvalue sum (the official code's energy: the singular values of C itself, i.e. the
  squared singular values of the token matrix, smallest k reaching the threshold);
- `shifted_weights`: adapted weights temporarily moved by given deltas (the subtraction W0 - sum of old LoRAs),
  restored bit for bit afterwards;
- `ProjectedUpdates`: the optimiser's update of chosen parameters replaced by `L u R` (the official Adam variant
  projects Adam's step, not the gradient), with torch's optimiser step hooks, so no optimiser is rebuilt;
- `augmented_triplet_loss`: batch-hard triplet loss whose hardest negative may also be a stored old-class prototype.
"""

from __future__ import annotations

import contextlib
import weakref

import torch
import torch.nn.functional as F
from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook

from .subspace import orthogonal_complement, principal_basis, psd_sqrt


def drift_resistant_projector(C: torch.Tensor, threshold: float = 0.99, space: str = "principal",
                              normalise: bool = True) -> torch.Tensor:
    """The d x d update projector of one layer from its input second moment `C` (float32 result).

    space "principal": span of the leading eigenvectors holding `threshold` of trace(C) (the official code);
    "complement": its orthogonal complement (an Adam-NSCL-like null space, for comparison). `normalise` divides by
    the Frobenius norm, sqrt(k) for a rank-k projector, as the official code does."""
    # psd_sqrt(C) has C's eigenvectors as left singular vectors and sqrt(eigenvalues) as singular values, so the
    # squared-singular-value energy of principal_basis is measured on C's eigenvalues, as the official code does
    U = principal_basis(psd_sqrt(C.double()), threshold, inclusive=True)
    if space == "complement":
        U = orthogonal_complement(U)
    elif space != "principal":
        raise ValueError(f"unknown space '{space}' (principal or complement)")
    P = U @ U.t()
    if normalise and U.shape[1] > 0:
        P = P / torch.linalg.matrix_norm(P)
    return P.float().contiguous()


@contextlib.contextmanager
def shifted_weights(sites, deltas):
    """Within the block, the weight slice of each site is W + delta; afterwards exactly W again (saved copies)."""
    saved = [s.weight().detach().clone() for s in sites]
    try:
        for s, d in zip(sites, deltas):
            s.add_to_weight(d)
        yield
    finally:
        with torch.no_grad():
            for s, w in zip(sites, saved):
                s.weight().copy_(w)


_LIVE: "weakref.WeakSet[ProjectedUpdates]" = weakref.WeakSet()
_HOOKS: list = []


def _before_step(opt, args, kwargs):
    for proj in list(_LIVE):
        proj.remember(opt)


def _after_step(opt, args, kwargs):
    for proj in list(_LIVE):
        proj.project()


class ProjectedUpdates:
    """While started, every optimiser step that updates a registered parameter p by u leaves it at p + L u R
    instead (L, R: d x d matrices or None). The parameters are held by weak reference, so a projection left
    started by an interrupted run never touches another run's parameters."""

    def __init__(self):
        self.rules: dict[int, tuple[weakref.ref, torch.Tensor | None, torch.Tensor | None]] = {}
        self.before: dict[int, torch.Tensor] = {}

    def add(self, p: torch.nn.Parameter, left: torch.Tensor | None = None, right: torch.Tensor | None = None):
        self.rules[id(p)] = (weakref.ref(p), left, right)

    def start(self) -> None:
        if not _HOOKS:  # one pair of process-wide hooks serves every live projection
            _HOOKS.extend([register_optimizer_step_pre_hook(_before_step),
                           register_optimizer_step_post_hook(_after_step)])
        _LIVE.add(self)

    def stop(self) -> None:
        _LIVE.discard(self)
        self.rules.clear()
        self.before.clear()

    @torch.no_grad()
    def remember(self, opt) -> None:
        for group in opt.param_groups:
            for p in group["params"]:
                rule = self.rules.get(id(p))
                if rule is not None and rule[0]() is p and p.grad is not None:
                    self.before[id(p)] = p.detach().clone()

    @torch.no_grad()
    def project(self) -> None:
        for key, old in self.before.items():
            ref, left, right = self.rules[key]
            p = ref()
            u = p - old
            if left is not None:
                u = left.to(u) @ u
            if right is not None:
                u = u @ right.to(u)
            p.copy_(old + u)
        self.before.clear()


def augmented_triplet_loss(feats: torch.Tensor, labels: torch.Tensor, prototypes: torch.Tensor | None,
                           margin: float = 1.0) -> torch.Tensor:
    """mean_i max(0, margin + d(i, hardest positive) - d(i, hardest negative)) on L2-normalised `feats`.

    The hardest positive is the farthest same-label sample of the batch (itself included), the hardest negative
    the nearest other-label sample (or, when the batch holds none, the hardest positive + margin), and then
    the nearest stored prototype (normalised here) if it is nearer still: old classes push without exemplars.
    Distances are Euclidean, clamped at 1e-12 (under the square root for the batch, as the official code)."""
    sq = feats.pow(2).sum(1)
    d = (sq.unsqueeze(1) + sq.unsqueeze(0) - 2 * feats @ feats.t()).clamp(min=1e-12).sqrt()
    same = labels.unsqueeze(1) == labels.unsqueeze(0)
    ap = d.masked_fill(~same, float("-inf")).max(1).values
    an = d.masked_fill(same, float("inf")).min(1).values
    an = torch.where(same.all(1), ap + margin, an)
    if prototypes is not None and len(prototypes):
        c = F.normalize(prototypes.to(feats), dim=1)
        to_protos = (feats.unsqueeze(1) - c.unsqueeze(0)).norm(dim=-1).clamp(min=1e-12)
        an = torch.minimum(an, to_protos.min(1).values)
    return F.relu(margin - (an - ap)).mean()
