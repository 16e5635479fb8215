"""Ridge heads (cl/ridge.py; RanPAC and RAIL): the one-eigendecomposition lambda path against direct solves, the
closed form against RAIL's recursion, order invariance, and tiny runs on real images (RanPAC's head after the
last task is the ridge solution on every task's features; RAIL's Transfer is zero-shot CLIP's, exactly)."""

import numpy as np
import pytest
import torch
from conftest import TINY_CLIP, smoke_sets

from loracl.cl.ridge import RidgeStatistics, random_projection, ridge_path, select_ridge
from loracl.methods.ranpac import task_features
from loracl.runs.assembly import load_config
from loracl.runs.runner import Runner

RIDGES = [10.0 ** k for k in range(-4, 5)]
IDENTITY = lambda f: f.double()  # noqa: E731  (features already expanded)


def _data(n, m, c, seed=0):
    g = torch.Generator().manual_seed(seed)
    h = torch.relu(torch.randn(n, m, generator=g, dtype=torch.float64))
    y = torch.randint(0, c, (n,), generator=g)
    return h, y, torch.nn.functional.one_hot(y, c).double()


def _direct(h, y, lam):
    return torch.linalg.solve(h.t() @ h + lam * torch.eye(h.shape[1], dtype=h.dtype), h.t() @ y)


@pytest.mark.parametrize("n,m", [(30, 50), (80, 20)])  # the dual path (n <= m) and the primal one
def test_ridge_path_is_every_direct_solve(n, m):
    h, _, y = _data(n + 10, m, 4)
    preds = ridge_path(h[:n], y[:n], h[n:], RIDGES)
    for lam, p in zip(RIDGES, preds):
        torch.testing.assert_close(p, h[n:] @ _direct(h[:n], y[:n], lam), rtol=1e-6, atol=1e-8)


def test_select_ridge_is_the_lowest_held_out_error():
    h, _, y = _data(100, 40, 5, seed=1)
    lam, errors = select_ridge(h, y, RIDGES, 0.8)
    brute = [float(((h[80:] @ _direct(h[:80], y[:80], r) - y[80:]) ** 2).mean()) for r in RIDGES]
    np.testing.assert_allclose(errors, brute, rtol=1e-6)
    assert lam == RIDGES[int(np.argmin(brute))]
    with pytest.raises(ValueError, match="both sides"):
        select_ridge(h[:1], y[:1], RIDGES, 0.8)


def _rail_recursion(tasks, lam):
    """The official primal RAIL update, batch by batch: R = (G + lambda I)^-1 by Woodbury, W grown by columns."""
    h0, y0 = tasks[0]
    r = torch.linalg.inv(h0.t() @ h0 + lam * torch.eye(h0.shape[1], dtype=h0.dtype))
    w = r @ (h0.t() @ y0)
    for h, y in tasks[1:]:
        w = torch.cat([w, w.new_zeros(len(w), y.shape[1] - w.shape[1])], dim=1)
        for k in range(0, len(h), 7):  # batches of 7
            hb, yb = h[k:k + 7], y[k:k + 7]
            r = r - r @ hb.t() @ torch.linalg.inv(torch.eye(len(hb), dtype=h.dtype) + hb @ r @ hb.t()) @ hb @ r
            w = w + r @ hb.t() @ (yb - hb @ w)
    return w


def test_closed_form_equals_rail_recursion_and_ignores_task_order():
    h, y, _ = _data(60, 12, 6, seed=2)
    parts = [(h[:20], y[:20] % 2), (h[20:40], 2 + y[20:40] % 2), (h[40:], 4 + y[40:] % 2)]  # 2 classes a task
    stats = RidgeStatistics(12, IDENTITY)
    for hp, yp in parts:
        stats.add(hp, yp)
    w = stats.solve(0.1)
    onehots = [torch.nn.functional.one_hot(yp, 6).double()[:, :2 * (k + 1)] for k, (_, yp) in enumerate(parts)]
    ref = _rail_recursion([(hp, oh) for (hp, _), oh in zip(parts, onehots)], 0.1)
    torch.testing.assert_close(w, ref, rtol=1e-5, atol=1e-6)  # G is kept in float32
    backwards = RidgeStatistics(12, IDENTITY)
    for hp, yp in reversed(parts):
        backwards.add(hp, yp)
    cols = [backwards.ids.tolist().index(c) for c in stats.ids.tolist()]
    torch.testing.assert_close(backwards.solve(0.1)[:, cols], w, rtol=1e-5, atol=1e-6)


def test_a_class_seen_again_adds_to_its_column_and_state_round_trips():
    h, _, _ = _data(10, 5, 2, seed=3)
    stats = RidgeStatistics(5, IDENTITY)
    stats.add(h[:6], torch.tensor([3, 3, 8, 8, 3, 8]))
    stats.add(h[6:], torch.tensor([8, 8, 1, 1]))  # class 8 again (domain-incremental), 1 new
    assert stats.ids.tolist() == [3, 8, 1]
    torch.testing.assert_close(stats.cross[:, 1], h[[2, 3, 5, 6, 7]].sum(0))
    again = RidgeStatistics(5, IDENTITY)
    again.load_state_dict(stats.state_dict())
    assert torch.equal(again.gram, stats.gram) and torch.equal(again.cross, stats.cross)
    with pytest.raises(ValueError, match="projection size"):
        RidgeStatistics(6, IDENTITY).load_state_dict(stats.state_dict())


def _direct_w(h, y, ids, lam):
    onehot = (y.unsqueeze(1) == ids.unsqueeze(0)).double()
    return torch.linalg.solve(h.t() @ h + lam * torch.eye(h.shape[1], dtype=torch.float64), h.t() @ onehot)


def test_dual_form_until_m_images_then_primal_both_the_direct_solve():
    """At most M images: the images' features are kept and the dual solve is used (and round-trips through a
    checkpoint); past M, G and C; every W is the direct solve, for a lambda from large to tiny."""
    h, y, _ = _data(40, 30, 3, seed=4)
    stats = RidgeStatistics(30, IDENTITY)
    stats.add(h[:20], y[:20])
    assert stats.gram is None and stats.feats.shape == (20, 30)
    again = RidgeStatistics(30, IDENTITY)
    again.load_state_dict(stats.state_dict())
    for lam in (1.0, 1e-3, 1e-10):  # fewer images than features: the tiny lambda leaves G + lambda I singular
        ref = _direct_w(h[:20], y[:20], stats.ids, lam)
        torch.testing.assert_close(h[:20] @ stats.solve(lam), h[:20] @ ref, rtol=1e-4, atol=1e-6)
        assert torch.equal(again.solve(lam), stats.solve(lam))
    stats.add(h[20:], y[20:])  # 40 > 30 images: G and C from here on
    assert stats.feats is None and stats.gram is not None
    for lam in (1.0, 1e-3):
        torch.testing.assert_close(stats.solve(lam), _direct_w(h, y, stats.ids, lam), rtol=1e-4, atol=1e-6)


def test_random_projection_draws():
    a = random_projection(16, 300, seed=5, init="uniform")
    assert torch.equal(a, random_projection(16, 300, seed=5, init="uniform"))
    assert a.abs().max() <= 0.25 and a.abs().max() > 0.24  # U(-1/sqrt(16), 1/sqrt(16))
    g = random_projection(16, 300, seed=5)
    assert abs(float(g.std()) - 1) < 0.05


def _runner(tmp_path, preset, method, sets):
    cfg = load_config(preset=preset, method=method, sets=smoke_sets(**{"eval.max_per_task": 20}) + sets)
    r = Runner(cfg, tmp_path, progress=False, log=lambda *a, **k: None)
    for t in r.scenario.tasks:
        t.train = t.train.subset(np.arange(0, len(t.train), max(len(t.train) // 40, 1))[:40])
    return r


@pytest.mark.shared
@pytest.mark.slow
def test_ranpac_head_is_the_ridge_solution_on_every_task(tmp_path, one_thread):
    """Without adaptation the backbone is the pretrained one throughout: the head after the last task is the ridge
    solution on all tasks' random features, with the last task's lambda."""
    r = _runner(tmp_path, "cifar100-mini", "ranpac", ["benchmark.num_tasks=3", "method.M=64", "benchmark.datasets=[{name: cifar100, "
                                                        "root: '{data_root}/cifar100', classes: [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11]}]",
                                                        "method.adapt_first_task=false"])
    res = r.run()
    assert res["status"] == "complete" and len(res["method_extras"]["lambda"]) == 3
    stats = RidgeStatistics(64, r.method.expand)
    for t in r.scenario.tasks:
        stats.add(*task_features(r.method, t.train, "check"))
    assert stats.ids.tolist() == r.method.stats.ids.tolist()
    torch.testing.assert_close(r.method.weights, stats.solve(res["method_extras"]["lambda"][-1]))
    assert res["metrics"]["final_acc"] > 100 / 12  # above chance over 12 classes


@pytest.mark.shared
@pytest.mark.slow
def test_rail_transfer_is_zero_shot(tmp_path, one_thread):
    clip = TINY_CLIP + [
            "benchmark.datasets=[{name: cifar10, root: '{data_root}/cifar10', classes: [0, 1, 2, 3]}, "
            "{name: mnist, root: '{data_root}/mnist', classes: [0, 1, 2, 3]}, "
            "{name: cifar100, root: '{data_root}/cifar100', classes: [0, 1, 2, 3]}]"]
    res = _runner(tmp_path / "rail", "mini-mtil", "rail", clip + ["method.M=128"]).run()
    zs = _runner(tmp_path / "zs", "mini-mtil", "zeroshot", clip).run()
    n = len(res["acc_matrix"])
    assert all(res["acc_matrix"][j][i] == zs["acc_before"][i] for j in range(n) for i in range(j + 1, n))
    assert res["metrics"]["transfer"] == pytest.approx(zs["metrics"]["transfer"])
    phases = res["cost"]["flops_by_phase_per_task"][0]  # no backpropagation: a feature pass and the ridge products
    assert set(phases) == {"rail-features", "rail-solve"} and all(v > 0 for v in phases.values())
