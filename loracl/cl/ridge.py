"""Closed-form ridge-regression heads on frozen features (RanPAC, McDonnell et al. NeurIPS 2023; RAIL, Xu et al.
NeurIPS 2024; BASELINES.md 5 and 6).

Features h = ReLU(W_rand^T f) of a fixed random projection; over every training image so far the Gram matrix
G = sum h h^T and C = sum h y^T (y one-hot over the classes seen so far, a class seen again in a later task adds
to its column); the head is W = (G + lambda I)^-1 C and a test image scores h^T W. Since G and C are sums, the
head after task t is the ridge solution on the union of all tasks' features, whatever their order: nothing is
forgotten by construction. While there are fewer images than random features (small benchmarks, RAIL's few
shots) the images' own features are kept instead and the same W is solved in its dual form: a checkpoint of
N x d numbers instead of M x M, and N^3 work instead of M^3. RAIL's recursive update (Woodbury on R = (G + lambda I)^-1, one batch at a time)
computes the same W; tests/test_ridge.py checks the two agree.

RanPAC picks lambda per task from 10^-8 ... 10^8 by the mean squared error on the last 20% of the task's
features of the ridge solution fitted on the first 80%. The official code solves one M x M system per
candidate; here one eigendecomposition, of the smaller of the Gram matrix (M x M) and the kernel matrix of
the fitted images (N x N), gives every candidate's predictions: the same numbers, a fraction of the work.
"""

from __future__ import annotations

import math

import torch

RANPAC_RIDGES = [10.0 ** k for k in range(-8, 9)]


def random_projection(d: int, m: int, seed: int, init: str = "gaussian") -> torch.Tensor:
    """The d x m projection, drawn from its own generator: `gaussian` N(0, 1) (RanPAC's torch.randn), `uniform`
    U(-1/sqrt(d), 1/sqrt(d)) (RAIL's bias-free nn.Linear at PyTorch's default initialisation)."""
    g = torch.Generator().manual_seed(seed)
    if init == "gaussian":
        return torch.randn(d, m, generator=g)
    if init == "uniform":
        bound = 1.0 / math.sqrt(d)
        return (torch.rand(d, m, generator=g) * 2 - 1) * bound
    raise ValueError(f"unknown projection init '{init}' (gaussian or uniform)")


def ridge_path(h_fit: torch.Tensor, y_fit: torch.Tensor, h_val: torch.Tensor, ridges: list[float]) -> torch.Tensor:
    """Predictions on `h_val` of the ridge solutions fitted on (`h_fit`, `y_fit`), one per lambda in `ridges`:
    a (len(ridges), N_val, C) tensor, float64, from one eigendecomposition (primal or dual, the smaller)."""
    hf, hv, yf = h_fit.double(), h_val.double(), y_fit.double()
    n, m = hf.shape
    if n <= m:  # W = H^T (H H^T + lambda I)^-1 Y
        s, u = torch.linalg.eigh(hf @ hf.t())
        a, b = hv @ hf.t() @ u, u.t() @ yf
    else:  # W = (H^T H + lambda I)^-1 H^T Y
        s, u = torch.linalg.eigh(hf.t() @ hf)
        a, b = hv @ u, u.t() @ (hf.t() @ yf)
    s = s.clamp(min=0)
    return torch.stack([(a / (s + lam)) @ b for lam in ridges])


def select_ridge(h: torch.Tensor, y: torch.Tensor, ridges: list[float], fit_fraction: float = 0.8) -> tuple[float, list]:
    """RanPAC's choice of lambda: fit on the first `fit_fraction` of the rows, the lowest mean squared error on
    the rest (the first of equals); returns (lambda, the errors)."""
    k = int(len(h) * fit_fraction)
    if k == 0 or k == len(h):
        raise ValueError(f"choosing lambda needs images on both sides of the split ({len(h)} images, "
                         f"fit fraction {fit_fraction})")
    preds = ridge_path(h[:k], y[:k], h[k:], ridges)
    errors = ((preds - y[k:].double().unsqueeze(0)) ** 2).mean(dim=(1, 2))
    return ridges[int(torch.argmin(errors))], errors.tolist()


class RidgeStatistics:
    """What the head is solved from, over every image so far: while there are at most M images, their features
    themselves (N x d numbers; the solve is the dual one, W = H^T (H H^T + lambda I)^-1 Y, N^3 work); beyond,
    G = sum h h^T and C = sum h y^T (M x M, the primal solve, M^3 work). Both give the same W. Columns are classes
    in the order first seen; `expand` maps features to the random features h.

    G is kept in float32 as in the official code (its packed lower triangle is the bulk of a checkpoint: 200 MB
    at M = 10,000), each addition summed in float64 first; C and the solves are float64."""

    def __init__(self, m: int, expand):
        self.m, self.expand = m, expand
        self.ids = torch.zeros(0, dtype=torch.long)
        self.feats, self.labels = None, torch.zeros(0, dtype=torch.long)  # the dual form's
        self.gram, self.cross = None, None  # the primal form's

    def targets(self, y: torch.Tensor) -> torch.Tensor:
        """One-hot rows (float64) over the classes known, new ones appended in id order."""
        known = set(self.ids.tolist())
        new = sorted({c for c in y.tolist() if c not in known})
        if new:
            self.ids = torch.cat([self.ids, torch.tensor(new, dtype=torch.long)])
            if self.cross is not None:
                self.cross = torch.cat([self.cross, self.cross.new_zeros(self.m, len(new))], dim=1)
        col = {c: i for i, c in enumerate(self.ids.tolist())}
        out = torch.zeros(len(y), len(self.ids), dtype=torch.float64)
        out[torch.arange(len(y)), torch.tensor([col[c] for c in y.tolist()], dtype=torch.long)] = 1
        return out

    def add(self, f: torch.Tensor, y: torch.Tensor) -> None:
        """Features `f` (N x d, before the projection) of images of classes `y`."""
        self.targets(y)
        f, y = f.float().cpu(), y.long().cpu()
        if self.gram is None and len(self.labels) + len(y) <= self.m:
            self.feats = f if self.feats is None else torch.cat([self.feats, f])
            self.labels = torch.cat([self.labels, y])
            return
        if self.gram is None:  # past M images: from here on G and C
            self.gram = torch.zeros(self.m, self.m, dtype=torch.float32)
            self.cross = torch.zeros(self.m, len(self.ids), dtype=torch.float64)
            if self.feats is not None:
                f, y = torch.cat([self.feats, f]), torch.cat([self.labels, y])
            self.feats, self.labels = None, torch.zeros(0, dtype=torch.long)
        gram = torch.zeros(self.m, self.m, dtype=torch.float64)
        for k in range(0, len(y), 4096):  # bounded memory: 4096 x M random features at a time
            h = self.expand(f[k:k + 4096]).double()
            gram += h.t() @ h
            self.cross += h.t() @ self.targets(y[k:k + 4096])
        self.gram += gram.float()

    def solve(self, lam: float) -> torch.Tensor:
        """W (M x classes, float64) of ridge parameter `lambda`."""
        if self.gram is None:
            h = self.expand(self.feats).double()
            return h.t() @ _spd_solve(h @ h.t(), lam, self.targets(self.labels))
        return _spd_solve(self.gram.double(), lam, self.cross)

    def state_dict(self) -> dict:
        if self.gram is None:
            return {"ids": self.ids, "feats": self.feats, "labels": self.labels}
        i, j = torch.tril_indices(self.m, self.m)
        return {"ids": self.ids, "gram": self.gram[i, j], "cross": self.cross}

    def load_state_dict(self, state: dict) -> None:
        self.ids = state["ids"].long()
        if "gram" not in state:
            self.feats, self.labels, self.gram, self.cross = state["feats"], state["labels"].long(), None, None
            return
        i, j = torch.tril_indices(self.m, self.m)
        if state["gram"].numel() != len(i):
            raise ValueError(f"the checkpoint's Gram matrix is not {self.m} x {self.m} (a different projection size)")
        self.gram = torch.zeros(self.m, self.m, dtype=torch.float32)
        self.gram[i, j] = state["gram"].float()
        self.gram[j, i] = state["gram"].float()
        self.cross, self.feats, self.labels = state["cross"].double(), None, torch.zeros(0, dtype=torch.long)


def _spd_solve(a: torch.Tensor, lam: float, b: torch.Tensor) -> torch.Tensor:
    """(A + lambda I)^-1 B for a symmetric positive semi-definite A: by Cholesky (half LU's work), or by LU, as
    the official code, where rounding leaves A + lambda I short of positive definite (a tiny lambda)."""
    a = a + lam * torch.eye(len(a), dtype=a.dtype)
    chol, info = torch.linalg.cholesky_ex(a)
    if int(info) == 0:
        return torch.cholesky_solve(b, chol)
    return torch.linalg.solve(a, b)
