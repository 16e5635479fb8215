"""KeepLoRA: the subspace algebra on plain tensors, then the method on a tiny open_clip CLIP (random weights) and
on the pretrained ViT fixture, over real images of ../shared/data."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import DATA, TINY_CLIP, smoke_sets
from loracl.runs.assembly import load_config
from loracl.errors import ConfigError
from loracl.cl.statistics import ClassMeans
from loracl.cl.subspace import residual_factors
from loracl.cl.subspace import energy_rank, gpm_extend, gpm_first, principal_basis, project_onto, psd_sqrt
from loracl.runs.runner import Runner

pytestmark = pytest.mark.usefixtures("one_thread")

CLIP = TINY_CLIP



def _orth(d, k, seed):
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64))
    return q[:, :k]


# ---- linear algebra ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("side", ["left", "right"])
def test_principal_subspace_energy_thresholds(side):
    """k = number of leading directions whose cumulative squared-singular-value share stays below eps (>= 1),
    spanning U (output space, official) or V (input space, paper)."""
    d = 8
    U, V = _orth(d, d, 0), _orth(d, d, 1)
    s = torch.tensor([4.0, 3.0, 2.0, 1.0, 0.5, 0.25, 0.1, 0.05], dtype=torch.float64)
    W = U @ torch.diag(s) @ V.t()
    share = torch.cumsum(s ** 2, 0) / (s ** 2).sum()  # 0.528, 0.824, 0.956, 0.989, 0.998, ...
    for eps, k in ((0.2, 1), (0.5, 1), (0.85, 2), (0.9, 2), (0.96, 3), (0.99, 4), (0.998, 5)):
        B = principal_basis(W, eps, side=side)
        assert B.shape == (d, k), (eps, share)
        ref = (U if side == "left" else V)[:, :k]
        torch.testing.assert_close(B @ B.t(), ref @ ref.t(), atol=1e-10, rtol=0)
        assert energy_rank(s, eps) == k


def test_gpm_growth_on_representation_energy():
    """gpm_extend adds the fewest residual directions that bring the captured energy of X to eps; on
    psd_sqrt(X X^T) it does exactly what it does on X itself."""
    g = torch.Generator().manual_seed(0)
    d, n = 12, 200
    X = (torch.randn(d, n, generator=g, dtype=torch.float64) * torch.logspace(0, -2, d, dtype=torch.float64)[:, None])
    M = _orth(d, 2, 3)
    R = psd_sqrt(X @ X.t() / n)
    torch.testing.assert_close(R @ R, X @ X.t() / n, atol=1e-12, rtol=1e-9)
    for eps in (0.9, 0.99, 0.999):
        grown = gpm_extend(M, R, eps)
        same = gpm_extend(M, X, eps)
        assert grown.shape == same.shape
        torch.testing.assert_close(grown @ grown.t(), same @ same.t(), atol=1e-8, rtol=0)
        torch.testing.assert_close(grown[:, :2], M)  # the old basis is kept as it is
        torch.testing.assert_close(grown.t() @ grown, torch.eye(grown.shape[1], dtype=torch.float64), atol=1e-10,
                                   rtol=0)
        captured = lambda B: float((project_onto(X, B) ** 2).sum() / (X ** 2).sum())  # noqa: E731
        assert captured(grown) >= eps - 1e-12
        assert captured(grown[:, :-1]) < eps  # minimal
    first = gpm_first(R, 0.9)
    assert first.shape[1] == energy_rank(torch.linalg.svdvals(X), 0.9)


def test_residual_factors_live_in_the_residual():
    g = torch.Generator().manual_seed(1)
    d_in, d_out, r = 20, 16, 4
    M = _orth(d_in, 6, 2).float()
    G = torch.randn(d_in, d_out, generator=g)
    G_hat = G - M @ (M.t() @ G)
    A, B = residual_factors(G_hat, r)
    assert A.shape == (d_in, r) and B.shape == (r, d_out)
    torch.testing.assert_close(A.t() @ A, torch.eye(r), atol=1e-5, rtol=0)
    assert (M.t() @ A).abs().max() < 1e-5
    U, S, Vh = torch.linalg.svd(G_hat)
    best = U[:, :r] @ torch.diag(S[:r]) @ Vh[:r]
    torch.testing.assert_close(A @ B, best, atol=1e-3, rtol=1e-3)
    # a gradient of rank 2 gives a rank-2 branch, and none when nothing is left outside M
    low = G_hat[:, :1] @ torch.ones(1, d_out) + G_hat[:, 1:2] @ torch.arange(d_out).float()[None]
    assert residual_factors(low, r)[0].shape[1] == 2
    assert residual_factors(torch.zeros(d_in, d_out), r)[0].shape[1] == 0
    assert residual_factors(G_hat, r, free_dims=3)[0].shape[1] == 3


# ---- the method on CLIP and on the ViT fixture ------------------------------------------------------------

def _runner(tmp_path, method="keeplora", preset="mini-mtil", clip=True, n_train=64, **extra):
    """A runner whose tasks keep n_train random training images each (the statistics passes see them all)."""
    sets = smoke_sets(**extra) + (CLIP if clip else [])
    cfg = load_config(preset=preset, method=method, sets=sets)
    r = Runner(cfg, tmp_path, progress=False, log=lambda *a, **k: None)
    for t in r.scenario.tasks:
        rows = np.random.default_rng(t.index).permutation(len(t.train))[:n_train]
        t.train = t.train.subset(np.sort(rows))
    return r


def _start(r):
    """What Runner.run does before the first task."""
    r.method.setup()
    for t in r.scenario.tasks:
        r.method.add_task_classes(t)


def _weights(r):
    return {s.name: s.weight().detach().clone() for s in r.model.adapter.sites}


@pytest.mark.slow
@pytest.mark.shared
@pytest.mark.parametrize("variant", ["official", "paper"])
def test_init_and_subtract_keeps_the_function_on_clip(tmp_path, variant):
    r = _runner(tmp_path, n_train=32, **{"method.variant": variant})
    _start(r)
    m = r.method
    assert len(r.model.adapter.sites) == 4 * 2 * 2  # q, k, v, out in both encoders' 2 blocks
    for s in r.model.adapter.sites:  # principal subspace: per encoder threshold, U (official) or V (paper)
        eps = {"image": 0.85, "text": 0.2}[s.encoder]
        ref = principal_basis(s.weight().detach().float(), eps, side="left" if variant == "official" else "right")
        torch.testing.assert_close(m.bases[s.name], ref)
    task = r.scenario.tasks[1]
    r.trainer.current_task = task
    ids = r.data.classes.tensor(task.class_ids)
    x, _ = next(iter(r.data.eval_batches(task.test)))
    text = r.model.head.prompts
    with torch.no_grad():
        before = m.logits(x, ids)
        feats0 = r.model.features(x)
        tok = r.model.backbone.tokenize([text[i][0] for i in task.class_ids])
        txt0 = r.model.backbone.encode_text(tok)
    W0 = _weights(r)
    m.begin_task(task)
    assert r.model.adapter.live_branches() == len(r.model.adapter.sites)
    for s in r.model.adapter.sites:
        br = s.branches["task1"]
        assert not br.down.requires_grad and br.up.requires_grad
        assert br.delta_weight().norm() > 0
        torch.testing.assert_close(s.weight() + br.delta_weight(), W0[s.name], atol=1e-6, rtol=0)
    with torch.no_grad():
        torch.testing.assert_close(m.logits(x, ids), before, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(r.model.features(x), feats0, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(r.model.backbone.encode_text(tok), txt0, atol=1e-5, rtol=1e-4)
    assert "keeplora-gradient" in r.record.phase_seconds


@pytest.mark.slow
@pytest.mark.shared
def test_updates_stay_in_the_residual_subspace_and_memory_grows(tmp_path):
    """Two tasks: every merged change of every adapted W is orthogonal (on the input side) to the protected
    basis of its task, which after a task holds the old basis plus the task's feature directions."""
    r = _runner(tmp_path, n_train=32, **{"train.max_steps_per_epoch": 3})
    _start(r)
    m = r.method
    for t in r.scenario.tasks[:2]:
        r.trainer.current_task = t
        M0 = {k: v.clone() for k, v in m.bases.items()}
        W0 = _weights(r)
        m.begin_task(t)
        r.services.fit(t, phase="train", images=t.train, epochs=1, groups=m.param_groups(t), loss=m.loss)
        m.end_task(t)
        assert r.model.adapter.live_branches() == 0
        moved = 0
        for s in r.model.adapter.sites:
            dW = s.weight().detach() - W0[s.name]
            if dW.norm() == 0:
                continue
            moved += 1
            # zero up to the float32 round-off of the two in-place updates of W (subtract, merge)
            assert (dW @ M0[s.name]).norm() <= 1e-6 * W0[s.name].norm() + 1e-4 * dW.norm(), s.name
            M1 = m.bases[s.name]
            assert M1.shape[1] >= M0[s.name].shape[1]
            torch.testing.assert_close(M1[:, :M0[s.name].shape[1]], M0[s.name])
            torch.testing.assert_close(M1.t() @ M1, torch.eye(M1.shape[1]), atol=1e-4, rtol=0)
        assert moved == len(r.model.adapter.sites)
        assert sum(m.protected_dims().values()) > sum(v.shape[1] for v in M0.values())


@pytest.mark.slow
@pytest.mark.shared
def test_gradient_estimate_is_the_dataset_mean_and_holds_one_gradient_set(tmp_path):
    r = _runner(tmp_path)
    _start(r)
    m = r.method
    task = r.scenario.tasks[0]
    task.train = task.train.subset(np.arange(40))
    r.trainer.current_task = task
    m.add_task_classes(task)
    seen = []
    orig = r.services.forward_pass

    def spy(*a, **k):
        seen.append([n for n, p in r.model.named_parameters() if p.requires_grad])
        return orig(*a, **k)

    r.services.forward_pass = spy
    r.services.batch_size = 16  # batches of 16, 16, 8
    g_batches = {k: v.clone() for k, v in m.estimate_gradients(task).items()}
    r.services.batch_size = 64  # one batch
    g_once = m.estimate_gradients(task)
    for layer, g in g_once.items():
        torch.testing.assert_close(g_batches[layer], g, atol=1e-6, rtol=1e-4)
    assert len(seen[0]) == len(r.model.adapter.layers)  # only the adapted weights are trainable in the pass
    assert all(n.endswith(("in_proj_weight", "out_proj.weight")) for n in seen[0])
    assert all(p.grad is None and not p.requires_grad for p in r.model.parameters())


@pytest.mark.slow
@pytest.mark.shared
def test_plus_class_means_from_the_gradient_pass_equal_a_separate_pass(tmp_path):
    """KeepLoRA+ takes the class means from the gradient pass's forward (same images, same function) unless
    the gradient sees a subset; both give the rows a pass of their own gives."""
    for grad_batches, shared in ((None, True), (1, False)):
        r = _runner(tmp_path / str(grad_batches), method="keeplora+", n_train=40,
                    **{"method.grad_batches": grad_batches, "data.batch_size": 16,
                       "data.train_augment": "none"})  # the two passes draw their own crops otherwise
        _start(r)
        m, task = r.method, r.scenario.tasks[0]
        r.trainer.current_task = task
        passes = []
        orig = r.services.forward_pass
        r.services.forward_pass = lambda images, fn, **k: (passes.append(k["desc"]), orig(images, fn, **k))
        m.begin_task(task)
        assert ("keeplora+-class-means" in passes) != shared, passes
        ref = ClassMeans(m.run.classes, task.class_ids, r.model.backbone.feature_dim, r.model.device)
        orig(task.train, lambda b: ref.add(r.model.features(b.x), b.y), desc="reference")
        got = m.cosine.chunk_of(task.class_ids).weight.detach()
        want = ref.rows()
        assert want.shape == (len(task.class_ids), r.model.backbone.feature_dim)
        torch.testing.assert_close(F.normalize(got, dim=-1), want, atol=1e-5, rtol=0)


@pytest.mark.slow
@pytest.mark.shared
def test_end_to_end_keeplora_plus_on_clip(tmp_path):
    """The whole loop (KeepLoRA+ runs every step of KeepLoRA), then a resume after the last task."""
    res = _runner(tmp_path / "keeplora+", method="keeplora+", n_train=32, **{"eval.max_per_task": 20}).run()
    mt = res["metrics"]
    assert res["status"] == "complete"
    assert all(v is not None for row in res["acc_matrix"] for v in row)  # upper triangle: zero-shot transfer
    assert mt["transfer"] is not None and mt["average"] is not None and mt["last"] is not None
    phases = res["cost"]["phase_seconds_per_task"][0]
    assert {"train", "keeplora-gradient", "keeplora-features"} <= set(phases)
    assert "keeplora+-class-means" not in phases  # the gradient pass saw every image: its forward gave the means
    # resuming after the last task restores the bases and KeepLoRA+'s five cosine chunks
    done = _runner(tmp_path / "keeplora+", method="keeplora+")
    r = Runner(done.cfg, tmp_path / "keeplora+", resume=True, progress=False, log=lambda *a, **k: None)
    r.method.setup()
    initial = sum(r.method.protected_dims().values())
    start, state, _ = r.checkpoints.restore()
    r.method.load_state_dict(state["method"])
    assert start == 5
    assert len(r.method.cosine.chunks) == 5
    assert sum(r.method.protected_dims().values()) > initial


@pytest.mark.slow
@pytest.mark.shared
def test_keeplora_on_the_vit_fixture_keeps_retention_reported(tmp_path):
    val = tmp_path / "tin-val"  # 2 of the 25 validation images per class: the retention pass in seconds
    for d in sorted((DATA / "tiny_imagenet32" / "val").iterdir()):
        (val / d.name).mkdir(parents=True)
        for f in sorted(d.iterdir())[:2]:
            (val / d.name / f.name).symlink_to(f)
    res = _runner(tmp_path / "run", preset="cifar100-mini", clip=False,
                  **{"eval.retention": str(val), "eval.max_per_task": 20,
                     "benchmark.num_tasks": None, "benchmark.class_order": list(range(20)),
                     "benchmark.task_sizes": [10, 10]}).run()
    assert res["status"] == "complete"
    assert res["metrics"]["pretrained_retention"] is not None
    assert res["metrics"]["pretrained_retention_initial"] > 20


@pytest.mark.slow
@pytest.mark.shared
def test_official_variant_refuses_non_square_weights(tmp_path):
    r = _runner(tmp_path, clip=False, preset="cifar100-mini", **{"method.targets": ["q", "fc1"]})
    with pytest.raises(ConfigError, match="square"):
        r.method.setup()
