"""DualGPM / GPM on synthetic covariances whose spectra can be checked by hand (METHODS.md section 1, step 4).

Every covariance is `Q diag(lam) Q^T` in a fixed random orthonormal basis Q of R^8, so "energy" (squared
singular values) is lam^2 and the expected kept directions are columns of Q.
"""

import pytest
import torch

from loracl.cl.subspace import (DualGPM, dualgpm_retain_update, dualgpm_threshold, energy_rank, gpm_extend,
                             orthogonal_complement)

D = 8


@pytest.fixture
def Q():
    g = torch.Generator().manual_seed(0)
    q, _ = torch.linalg.qr(torch.randn(D, D, generator=g, dtype=torch.float64))
    return q


def cov(Q, energies):
    """Covariance with eigenvalues sqrt(energies) along Q's columns (energy = squared eigenvalue)."""
    lam = torch.tensor(energies, dtype=torch.float64).sqrt()
    return Q @ torch.diag(lam) @ Q.t()


def same_span(A, B, tol=1e-6):
    """span(A) == span(B) for orthonormal-column A and B."""
    if A.shape[1] != B.shape[1]:
        return False
    return torch.allclose(A @ A.t(), B @ B.t(), atol=tol)


def test_threshold_schedule():
    assert dualgpm_threshold(0.95, 0, 10) == pytest.approx(0.95)
    assert dualgpm_threshold(0.95, 1, 10) == pytest.approx(0.955)
    assert dualgpm_threshold(0.98, 9, 10) == pytest.approx(0.998)
    m = DualGPM(0.9, 5)
    assert [round(m.threshold(t), 6) for t in range(5)] == [0.9, 0.92, 0.94, 0.96, 0.98]


def test_energy_rank_counts_strictly_below_threshold():
    s = torch.tensor([16.0, 4.0, 1.0, 1.0]).sqrt()  # energies 16, 4, 1, 1 of 22: cumulative .727 .909 .955 1
    assert energy_rank(s, 0.95) == 2  # official: directions whose cumulative ratio is < threshold
    assert energy_rank(s, 0.95, inclusive=True) == 3
    assert energy_rank(s, 0.5) == 1  # at least one
    assert energy_rank(torch.zeros(3), 0.9) == 1


def test_dualgpm_remove_then_switch_to_retain_then_retain_update(Q):
    m = DualGPM(0.95, 5)  # thresholds 0.95, 0.96, 0.97, 0.98, 0.99
    # task 0: energies 16, 4, 1, 1 -> cumulative .727, .909, .955: keep 2 (< 0.95), 2 < d/2 -> "remove"
    m.update("L", cov(Q, [16, 4, 1, 1, 0, 0, 0, 0]), 0)
    assert m.kind["L"] == "remove" and same_span(m.basis["L"].double(), Q[:, :2])
    # task 1: all energy (9, 1) outside the memory: acc starts at 0, +0.9 < 0.96, +0.1 -> 1.0: add both
    m.update("L", cov(Q, [0, 0, 9, 1, 0, 0, 0, 0]), 1)
    assert m.kind["L"] == "remove" and same_span(m.basis["L"].double(), Q[:, :4])  # 4 = d/2: no switch yet
    # task 2: energy 4 inside the memory, 1 outside: acc starts at 0.8 < 0.97, +0.2: add one -> 5 > d/2
    m.update("L", cov(Q, [4, 0, 0, 0, 1, 0, 0, 0]), 2)
    assert m.kind["L"] == "retain" and same_span(m.basis["L"].double(), Q[:, 5:])
    assert m.dims()["L"] == (5, "retain")
    torch.testing.assert_close(m.free_basis("L") @ m.free_basis("L").t(), Q[:, 5:] @ Q[:, 5:].t(), atol=1e-6,
                               rtol=0)
    # task 3 (retain update, threshold 0.98): energies 9 (old space), 4 and 0.09 in the free space.
    # acc = 4.09 / 13.09 = 0.312 >= 0.02: move the 4-direction out; acc = 0.09 / 13.09 = 0.0069 < 0.02: stop
    m.update("L", cov(Q, [9, 0, 0, 0, 0, 4, 0.09, 0]), 3)
    assert m.kind["L"] == "retain" and same_span(m.basis["L"].double(), Q[:, 6:])
    assert m.dims()["L"] == (6, "retain")


def test_dualgpm_first_task_retain_case_is_the_complement(Q):
    """The official code stores U[:, :r] labelled "retain" when r >= d/2 and then fails its own assertion
    (or, at r == d/2, protects the wrong space). The free space is the complement of the kept directions."""
    m = DualGPM(0.9, 10)
    # energies 8, 4, 2.5, 2, 1.2, 1, .8, .5 of 20: cumulative .4 .6 .725 .825 .885 | .935: 5 below 0.9 >= d/2
    C = cov(Q, [8, 4, 2.5, 2, 1.2, 1, 0.8, 0.5])
    m.update("L", C, 0)
    assert m.kind["L"] == "retain" and m.basis["L"].shape == (D, 3)
    assert same_span(m.basis["L"].double(), Q[:, 5:])
    assert same_span(m.old_space("L").double(), Q[:, :5])
    # the next task's update works on it (no crash, the free space only shrinks): threshold .91,
    # energy 9 and .01 in the free space: acc 1 >= .09, remove the 9-direction, acc .0011 < .09: stop
    m.update("L", cov(Q, [0, 0, 0, 0, 0, 9, 0, 0.01]), 1)
    assert m.kind["L"] == "retain" and same_span(m.basis["L"].double(), Q[:, 6:])


def test_dualgpm_first_task_exactly_half_is_stored_as_retain(Q):
    m = DualGPM(0.85, 10)  # cumulative .4 .6 .725 .825 | .885: 4 = d/2 directions kept
    m.update("L", cov(Q, [8, 4, 2.5, 2, 1.2, 1, 0.8, 0.5]), 0)
    assert m.kind["L"] == "retain" and same_span(m.basis["L"].double(), Q[:, 4:])


def test_plain_gpm_never_switches(Q):
    m = DualGPM(0.9, 10, dual=False)  # thresholds .9, .91, .92
    m.update("L", cov(Q, [8, 4, 2.5, 2, 1.2, 1, 0.8, 0.5]), 0)
    assert m.kind["L"] == "remove" and same_span(m.basis["L"].double(), Q[:, :5])
    m.update("L", cov(Q, [0, 0, 0, 0, 0, 9, 1, 0]), 1)  # outside: 0 + .9 < .91, + .1: add both -> 7 > d/2
    assert m.kind["L"] == "remove" and same_span(m.basis["L"].double(), Q[:, :7])
    m.update("L", cov(Q, [1, 0, 0, 0, 0, 0, 0, 9]), 2)  # starts at .1 (inside), + .9: add one -> all 8
    assert m.kind["L"] == "remove" and same_span(m.basis["L"].double(), Q)


def test_gpm_extend_skips_when_memory_already_holds_the_energy(Q):
    M = Q[:, :3]
    C = cov(Q, [5, 3, 1, 0, 0, 0, 0, 0.0001])  # outside energy 1e-4 / 9.0001: acc .99999 >= .95
    assert gpm_extend(M, C, 0.95) is M


def test_retain_update_keeps_an_orthonormal_basis_inside_the_old_free_space():
    g = torch.Generator().manual_seed(1)
    d = 32
    F, _ = torch.linalg.qr(torch.randn(d, 12, generator=g, dtype=torch.float64))
    X = torch.randn(d, 200, generator=g, dtype=torch.float64)
    C = X @ X.t() / 200
    F2 = dualgpm_retain_update(F, C, 0.97)
    assert 0 < F2.shape[1] < F.shape[1]
    torch.testing.assert_close(F2.t() @ F2, torch.eye(F2.shape[1], dtype=torch.float64), atol=1e-10, rtol=0)
    # inside the old free space: projecting onto F changes nothing
    torch.testing.assert_close(F @ (F.t() @ F2), F2, atol=1e-10, rtol=0)


def test_orthogonal_complement(Q):
    Cm = orthogonal_complement(Q[:, :3])
    assert Cm.shape == (D, 5)
    torch.testing.assert_close(Q[:, :3].t() @ Cm, torch.zeros(3, 5, dtype=torch.float64), atol=1e-12, rtol=0)


def test_memory_state_roundtrip(Q):
    m = DualGPM(0.95, 5)
    m.update("a", cov(Q, [16, 4, 1, 1, 0, 0, 0, 0]), 0)
    m.update("b", cov(Q, [8, 4, 2.5, 2, 1.2, 1, 0.8, 0.5]), 0)
    m2 = DualGPM(0.95, 5)
    m2.load_state_dict(m.state_dict())
    assert m2.kind == m.kind
    for k in m.basis:
        assert torch.equal(m2.basis[k], m.basis[k]) and m2.basis[k].dtype == torch.float32
