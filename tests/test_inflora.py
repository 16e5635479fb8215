"""InfLoRA's linear algebra on plain tensors, and the interference-free property on a toy problem whose tasks
live in disjoint input subspaces (real LoRA layer, taps, DualGPM and design; a plain training loop)."""

import math

import pytest
import torch
import torch.nn.functional as F

from loracl.models.branches import new_branch_factors
from loracl.methods.inflora import design_down_projection
from loracl.models.backbones import build_sites
from loracl.cl.statistics import layer_input_moments
from loracl.cl.subspace import DualGPM, orthogonal_complement, principal_angles_cos, project_out


def _cov(d=32, n=400, seed=0):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, d, generator=g, dtype=torch.float64) * torch.linspace(3.0, 0.1, d, dtype=torch.float64)
    X = X + 0.3 * torch.randn(1, d, generator=g, dtype=torch.float64)  # uncentred, as the official C is
    return X.t() @ X / n


def _memory(d=32, k=9, seed=1):
    g = torch.Generator().manual_seed(seed)
    M, _ = torch.linalg.qr(torch.randn(d, k, generator=g, dtype=torch.float64))
    return M


@pytest.mark.parametrize("stored", ["remove", "retain"])
def test_official_design_rows_orthonormal_scaled_and_orthogonal_to_memory(stored):
    C, M = _cov(), _memory()
    mem = DualGPM(0.95, 10)  # the same old space, stored either way
    mem.basis["L"], mem.kind["L"] = (M, "remove") if stored == "remove" else (orthogonal_complement(M), "retain")
    B = design_down_projection(C, mem.free_basis("L"), 10, "official").double()
    assert B.shape == (10, 32)
    torch.testing.assert_close(B @ B.t(), torch.eye(10, dtype=torch.float64) / 3, atol=1e-6, rtol=0)
    assert (B @ M).abs().max() < 1e-6
    # the same subspace as the official computation: top left singular vectors of (I - M M^T) C
    U, _, _ = torch.linalg.svd(project_out(C, M))
    cos = principal_angles_cos(B.t(), U[:, :10])
    assert cos.min() > 1 - 1e-6


def test_paper_design_is_the_top_eigenvectors_of_the_projected_covariance():
    C, M = _cov(), _memory()
    free = orthogonal_complement(M)
    B = design_down_projection(C, free, 10, "paper").double()
    torch.testing.assert_close(B @ B.t(), torch.eye(10, dtype=torch.float64), atol=1e-6, rtol=0)
    assert (B @ M).abs().max() < 1e-6
    P = free @ free.t()
    PCP = P @ C @ P
    lam = torch.linalg.eigvalsh(PCP).flip(0)[:10]
    # each row is an eigenvector with the matching top eigenvalue
    torch.testing.assert_close(B @ PCP, lam[:, None] * B, atol=1e-5, rtol=1e-5)
    # and it is a different subspace from the official one (METHODS.md: cosines down to ~0.93)
    B_off = design_down_projection(C, free, 10, "official").double()
    assert principal_angles_cos(B.t(), B_off.t()).min() < 1 - 1e-4


def test_first_task_design_without_memory():
    C = _cov()
    B = design_down_projection(C, None, 4, "official").double()
    evecs = torch.linalg.eigh(C).eigenvectors.flip(1)[:, :4]
    assert principal_angles_cos(B.t(), evecs).min() > 1 - 1e-8
    torch.testing.assert_close(B.norm(dim=1), torch.full((4,), 1 / math.sqrt(3), dtype=torch.float64))


def test_design_with_little_or_no_free_space():
    C = _cov(d=12)
    M = _memory(d=12, k=9)
    B = design_down_projection(C, orthogonal_complement(M), 10, "official").double()
    assert B.shape == (3, 12) and (B @ M).abs().max() < 1e-6  # only 3 free directions, all of them used
    assert design_down_projection(C, torch.zeros(12, 0, dtype=torch.float64), 10) is None


# ------------------------------------------------------------------------------------------------
# toy problem: task t's inputs live in span(Q[:, 8t:8t+8]), disjoint from the other task's


D, TOKENS, RANK = 24, 4, 4


def _toy_task(Q, t, n_per_class=40, seed=0):
    g = torch.Generator().manual_seed(100 + t + seed)
    S = Q[:, 8 * t: 8 * t + 8]
    means = 3.0 * F.normalize(torch.randn(3, 8, generator=g), dim=1)
    y = torch.arange(3).repeat_interleave(n_per_class)
    z = means[y][:, None, :] + 0.7 * torch.randn(len(y), TOKENS, 8, generator=g)
    return z @ S.t(), y  # (n, tokens, D), all inside span(S)


class Toy:
    """One pretrained linear layer (frozen) adapted by LoRA, a linear head per task on the token mean."""

    def __init__(self):
        g = torch.Generator().manual_seed(7)
        self.lin = torch.nn.Linear(D, D, bias=False)
        with torch.no_grad():
            self.lin.weight.copy_(torch.randn(D, D, generator=g) / math.sqrt(D))
        self.lin.weight.requires_grad_(False)
        self.site = build_sites([("toy", 0, "k", self.lin, "weight", (0, D))])[0]
        self.heads = []
        self.memory = DualGPM(0.95, 2)

    def features(self, X):
        return torch.tanh(self.lin(X)).mean(1)

    def moments(self, X):
        with layer_input_moments([self.site.layer]) as acc, torch.no_grad():
            self.lin(X)
        return acc[self.site.layer].finalize().double()

    def learn(self, t, X, y, inflora=True):
        torch.manual_seed(t)
        if inflora:
            down = design_down_projection(self.moments(X), self.memory.free_basis("toy"), RANK)
        else:  # sequential LoRA control: a random down-projection
            down = new_branch_factors(RANK, D, D)[0]
        br = self.site.add_lora(down, torch.zeros(D, RANK), tag=f"task{t}", train_down=False)
        head = torch.nn.Linear(D, 3)
        self.heads.append(head)
        opt = torch.optim.Adam([br.up, *head.parameters()], lr=2e-2)
        for _ in range(100):
            opt.zero_grad()
            F.cross_entropy(head(self.features(X)), y).backward()
            opt.step()
        self.site.merge(f"task{t}")
        self.memory.update("toy", self.moments(X), t)

    @torch.no_grad()
    def logits(self, t, X):
        return self.heads[t](self.features(X))



@pytest.mark.parametrize("inflora", [True, False])
def test_toy_disjoint_subspaces_earlier_task_is_untouched(inflora, one_thread):
    Q, _ = torch.linalg.qr(torch.randn(D, D, generator=torch.Generator().manual_seed(3)))
    (X0, y0), (X1, y1) = _toy_task(Q, 0), _toy_task(Q, 1)
    toy = Toy()
    toy.learn(0, X0, y0, inflora)
    before = toy.logits(0, X0)
    acc0 = (before.argmax(1) == y0).float().mean().item()
    W0 = toy.lin.weight.detach().clone()
    toy.learn(1, X1, y1, inflora)
    after = toy.logits(0, X0)
    acc1 = (toy.logits(1, X1).argmax(1) == y1).float().mean().item()
    assert acc0 > 0.9 and acc1 > 0.9, "both tasks must be learned for the test to mean anything"
    if inflora:
        torch.testing.assert_close(after, before, atol=1e-5, rtol=1e-5)
        assert (after.argmax(1) == y0).float().mean().item() == acc0
        # the weight changed, but not on the old tasks' input subspace (the memory after task 0)
        dW = toy.lin.weight - W0
        assert dW.abs().max() > 1e-2
        M0 = Q[:, :8]
        assert (dW @ M0).abs().max() < 1e-4 * dW.abs().max()
    else:  # the control shows the property is not free: a random down-projection moves task 0's outputs
        assert (after - before).abs().max() > 1e-2


def test_memory_on_the_input_matrix_equals_memory_on_the_covariance_root():
    """The paper's DualGPM runs on the token matrix H (d x N); C^(1/2) with C = H H^T / N stands in for it
    exactly (same left singular vectors and residual spectra), so the 'input' energy needs only C."""
    from loracl.cl.subspace import psd_sqrt

    g = torch.Generator().manual_seed(5)
    d, n = 16, 300
    on_h, on_root, on_c = DualGPM(0.9, 3), DualGPM(0.9, 3), DualGPM(0.9, 3)
    for t in range(3):
        H = torch.randn(d, n, generator=g, dtype=torch.float64) * torch.linspace(2, 0.2, d, dtype=torch.float64)[:, None]
        H = torch.roll(H, shifts=5 * t, dims=0)  # each task stresses other directions
        C = H @ H.t() / n
        on_h.update("L", H / math.sqrt(n), t)
        on_root.update("L", psd_sqrt(C), t)
        on_c.update("L", C, t)
        assert on_h.kind["L"] == on_root.kind["L"]
        A, B = on_h.old_space("L").double(), on_root.old_space("L").double()
        assert A.shape == B.shape
        torch.testing.assert_close(A @ A.t(), B @ B.t(), atol=1e-5, rtol=0)
        if t == 0:  # squared eigenvalues concentrate the energy: the official criterion keeps fewer directions
            assert 0 < on_c.dims()["L"][0] < on_h.dims()["L"][0] < d
