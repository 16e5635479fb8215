"""Subspace linear algebra shared by InfLoRA, KeepLoRA and GPM-style memories, on plain tensors.

Conventions: a basis `M` is a `d x k` matrix with orthonormal columns; `C` is a `d x d` uncentred
second-moment matrix of layer inputs (`(1/N) sum x x^T`) or any matrix whose column space matters.
"Energy" is measured on squared singular values, as both official code bases do.
"""

from __future__ import annotations

import math

import torch


def energy_rank(s: torch.Tensor, threshold: float, inclusive: bool = False) -> int:
    """How many leading singular values to keep for `threshold` of the squared-singular-value energy.

    inclusive=False (GPM / InfLoRA official code): count directions whose cumulative energy ratio is
    strictly below the threshold, at least 1. inclusive=True: the smallest k reaching the threshold.
    """
    e = s.double() ** 2
    total = e.sum()
    if total <= 0:
        return 1
    ratio = torch.cumsum(e, 0) / total
    if inclusive:
        k = int((ratio < threshold - 1e-12).sum().item()) + 1
        return min(max(k, 1), s.numel())
    return max(int((ratio < threshold).sum().item()), 1)


def left_singular(C: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    U, S, _ = torch.linalg.svd(C.double(), full_matrices=False)
    return U.to(C.dtype), S.to(C.dtype)


def principal_basis(A: torch.Tensor, threshold: float, side: str = "left", inclusive: bool = False) -> torch.Tensor:
    """Leading singular vectors of `A` holding `threshold` of its energy (left: column space, right: row space)."""
    U, S, Vh = torch.linalg.svd(A.double(), full_matrices=False)
    k = energy_rank(S, threshold, inclusive)
    B = U[:, :k] if side == "left" else Vh[:k].t()
    return B.to(A.dtype).contiguous()


def psd_sqrt(K: torch.Tensor) -> torch.Tensor:
    """Symmetric square root of a PSD matrix (negative round-off eigenvalues clipped to 0).

    For K = X X^T / N (token second moments), psd_sqrt(K) has the left singular vectors of the token matrix
    X and squared singular values proportional to X's: handing it to the GPM rules measures energy on the
    representation matrix itself (GPM, KeepLoRA) instead of on the squared eigenvalues of K (InfLoRA)."""
    L, Q = torch.linalg.eigh(K.double())
    return ((Q * L.clamp(min=0).sqrt()) @ Q.t()).to(K.dtype)


def project_out(X: torch.Tensor, M: torch.Tensor | None) -> torch.Tensor:
    """(I - M M^T) X: the part of X's columns orthogonal to span(M)."""
    if M is None or M.shape[1] == 0:
        return X
    return X - M @ (M.t() @ X)


def project_onto(X: torch.Tensor, M: torch.Tensor) -> torch.Tensor:
    """M M^T X."""
    return M @ (M.t() @ X)


def orthogonal_complement(M: torch.Tensor) -> torch.Tensor:
    """Orthonormal basis of span(M)^perp (d x (d - k))."""
    d, k = M.shape
    U, _, _ = torch.linalg.svd(M.double(), full_matrices=True)
    return U[:, k:].to(M.dtype).contiguous()


def dualgpm_threshold(eps: float, task: int, num_tasks: int) -> float:
    """InfLoRA's schedule: eps_t = eps + (1 - eps) * t / T, t counted from 0."""
    return eps + (1.0 - eps) * task / num_tasks


def gpm_first(C: torch.Tensor, threshold: float) -> torch.Tensor:
    """Initial GPM memory: the leading left singular vectors of C below `threshold` of the energy."""
    U, S = left_singular(C)
    return U[:, :energy_rank(S, threshold)].contiguous()


def gpm_extend(M: torch.Tensor, C: torch.Tensor, threshold: float) -> torch.Tensor:
    """GPM "remove" update: add the residual directions of C (outside span(M)) until the energy already
    captured plus the added energy reaches `threshold`. Energies are fractions of C's total."""
    _, S_C = left_singular(C)
    total = (S_C.double() ** 2).sum()
    R = project_out(C, M)
    U_R, S_R = left_singular(R)
    sr = S_R.double() ** 2
    acc = (total - sr.sum()) / total
    r = 0
    for i in range(sr.numel()):
        if acc >= threshold:
            break
        acc = acc + sr[i] / total
        r += 1
    if r == 0:
        return M
    out = torch.cat([M, U_R[:, :r]], dim=1)
    return out[:, : out.shape[0]].contiguous()


def dualgpm_retain_update(F: torch.Tensor, C: torch.Tensor, threshold: float) -> torch.Tensor:
    """DualGPM "retain" update, where F spans the *free* space (the complement of old tasks' inputs).

    Directions are moved out of F, largest projected energy first, while the energy of C still inside F
    stays at or above 1 - threshold; the new free basis is F with those directions removed."""
    _, S_C = left_singular(C)
    total = (S_C.double() ** 2).sum()
    R = project_onto(C, F)
    U_R, S_R = left_singular(R)
    sr = S_R.double() ** 2
    acc = sr.sum() / total
    r = 0
    for i in range(sr.numel()):
        if acc < 1.0 - threshold:
            break
        acc = acc - sr[i] / total
        r += 1
    if r == 0:
        return F
    remaining = F - U_R[:, :r] @ (U_R[:, :r].t() @ F)
    U, _, _ = torch.linalg.svd(remaining.double(), full_matrices=False)
    return U[:, : max(F.shape[1] - r, 0)].to(F.dtype).contiguous()


class DualGPM:
    """Per-layer memory of old tasks' input subspaces (InfLoRA, Sec. 3.3), as the official code keeps it.

    `kind[i]` is "remove" when `basis[i]` spans the old tasks' space and "retain" when it spans its
    complement (the space still free); a "remove" basis of more than d/2 columns is stored as its
    complement. With `dual=False` this is plain GPM ("remove" only), as InfLoRA-b5 and DomainNet use.
    Bases are stored in `dtype` (float32: at most d/2 columns each with DualGPM); updates run in the
    dtype of the statistics they are given (float64 recommended).
    """

    def __init__(self, eps: float, num_tasks: int, dual: bool = True, dtype: torch.dtype = torch.float32):
        self.eps, self.num_tasks, self.dual, self.dtype = eps, num_tasks, dual, dtype
        self.basis: dict[str, torch.Tensor] = {}
        self.kind: dict[str, str] = {}

    def threshold(self, task: int) -> float:
        return dualgpm_threshold(self.eps, task, self.num_tasks)

    def old_space(self, key: str) -> torch.Tensor | None:
        """Orthonormal basis of the old tasks' input space of layer `key` (None before the first task)."""
        if key not in self.basis:
            return None
        B = self.basis[key]
        return B if self.kind[key] == "remove" else orthogonal_complement(B)

    def free_basis(self, key: str, dtype: torch.dtype = torch.float64) -> torch.Tensor | None:
        """Orthonormal basis of the space still free for a new task (None: everything is free)."""
        if key not in self.basis:
            return None
        B = self.basis[key].to(dtype)
        return orthogonal_complement(B) if self.kind[key] == "remove" else B

    def free_projection(self, key: str, X: torch.Tensor) -> torch.Tensor:
        """Project X's columns onto the space still free for a new task: (I - M M^T) X or F F^T X."""
        if key not in self.basis:
            return X
        B = self.basis[key].to(X.dtype)
        return project_out(X, B) if self.kind[key] == "remove" else project_onto(X, B)

    def update(self, key: str, C: torch.Tensor, task: int) -> None:
        thr = self.threshold(task)
        d = C.shape[0]
        if key not in self.basis:
            U, S = left_singular(C)
            r = energy_rank(S, thr)
            if self.dual and r >= d / 2:
                # the official code stores U[:, :r] here but labels it "retain" (the free space), which later
                # trips its own assertion; the free space is the complement of the kept directions.
                B, kind = U[:, r:], "retain"
            else:
                B, kind = U[:, :r], "remove"
        elif self.kind[key] == "remove":
            B, kind = gpm_extend(self.basis[key].to(C.dtype), C, thr), "remove"
        else:
            B, kind = dualgpm_retain_update(self.basis[key].to(C.dtype), C, thr), "retain"
        if self.dual and kind == "remove" and B.shape[1] > d / 2:
            B, kind = orthogonal_complement(B), "retain"
        self.basis[key], self.kind[key] = B.to(self.dtype).contiguous(), kind

    def dims(self) -> dict[str, tuple[int, str]]:
        """Per layer: dimension of the old tasks' space, and the stored kind."""
        out = {}
        for k, B in self.basis.items():
            n = B.shape[1] if self.kind[k] == "remove" else B.shape[0] - B.shape[1]
            out[k] = (n, self.kind[k])
        return out

    def state_dict(self) -> dict:
        return {"basis": dict(self.basis), "kind": dict(self.kind)}

    def load_state_dict(self, state: dict) -> None:
        self.basis = {k: v.to(self.dtype) for k, v in state["basis"].items()}
        self.kind = dict(state["kind"])


def randomized_svd(A: torch.Tensor, rank: int, q: int | None = None, niter: int = 4):
    """Rank-`rank` truncated SVD by randomised subspace iteration (Halko et al.), `q` = 4 * rank by default."""
    q = min(q or 4 * rank, min(A.shape))
    U, S, V = torch.svd_lowrank(A.float(), q=q, niter=niter)
    return U[:, :rank], S[:rank], V[:, :rank]


def residual_factors(G_hat: torch.Tensor, rank: int, free_dims: int | None = None, rtol: float = 1e-5):
    """A (d_in x r, orthonormal) and B (r x d_out) with A B the rank-r approximation of G_hat, by randomised
    SVD (q = 4r, 4 subspace iterations, as the official code). Directions with a singular value below
    rtol * the largest carry no gradient: their U columns are round-off, possibly inside the protected space,
    so they are dropped (the official code would keep and train them), as is anything beyond the free
    dimensions. The rank can therefore be smaller than `rank`, and 0."""
    if not torch.isfinite(G_hat).all():
        raise FloatingPointError("non-finite gradient estimate in KeepLoRA's initialisation")
    r = min(rank, min(G_hat.shape), free_dims if free_dims is not None else rank)
    if r <= 0 or float(G_hat.abs().max()) == 0.0:
        return G_hat.new_zeros(G_hat.shape[0], 0), G_hat.new_zeros(0, G_hat.shape[1])
    U, S, V = randomized_svd(G_hat.float(), r, q=4 * rank)
    keep = int((S > rtol * S[0]).sum())
    U, S, V = U[:, :keep], S[:keep], V[:, :keep]
    return U.contiguous(), (S[:, None] * V.t()).contiguous()


def top_left_singular(C: torch.Tensor, r: int) -> torch.Tensor:
    U, _ = left_singular(C)
    return U[:, :r].contiguous()


def principal_angles_cos(A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    """Cosines of the principal angles between span(A) and span(B) (orthonormalised first)."""
    qa, _ = torch.linalg.qr(A.double())
    qb, _ = torch.linalg.qr(B.double())
    return torch.linalg.svdvals(qa.t() @ qb).clamp(max=1.0)


INV_SQRT3 = 1.0 / math.sqrt(3.0)


def cross_gram_l1(old: torch.Tensor, new: torch.Tensor) -> torch.Tensor:
    """sum_jk |(old new^T)_jk|: O-LoRA's orthogonality penalty between the rows of earlier tasks' down-projections
    (r_old x d, stacked) and the new one's (r x d); zero exactly when every new row is orthogonal to every old one."""
    return (old @ new.t()).abs().sum()
