"""SD-LoRA: frozen normalised directions scaled by shared magnitudes, the fused sum of old directions, rank
reduction, knowledge absorption, and tiny runs on the fixture (exact resume)."""

import json

import pytest
import torch

from conftest import interrupted_at_step_checkpoint, smoke_sets
from loracl.cli import main
from loracl.methods.sd_lora import absorption_coefficients, rank_for_task
from loracl.models.branches import FrozenDirections, Magnitudes, ScaledBranch, direction_norm


def _dirs(g, k, r=3, d_in=7, d_out=5):
    return [(torch.randn(r, d_in, generator=g), torch.randn(d_out, r, generator=g)) for _ in range(k)]


@pytest.mark.parametrize("norm", ["factors", "product"])
def test_frozen_contribution_is_alpha_times_normalised_direction(norm):
    g = torch.Generator().manual_seed(0)
    mags = Magnitudes(4, 0.8)
    with torch.no_grad():
        mags.alpha.copy_(torch.tensor([0.5, -1.2, 2.0, 0.8]))
    fd = FrozenDirections(7, 5, mags, "m")
    dirs = _dirs(g, 3)
    for k, (down, up) in enumerate(dirs):
        fd.add(down, up, k, norm)
    x = torch.randn(4, 7, generator=g)
    want = sum(mags.alpha[k] * F_lin(x, down, up) / direction_norm(down, up, norm) for k, (down, up) in enumerate(dirs))
    n = {"factors": lambda d, u: u.norm() * d.norm(), "product": lambda d, u: (u @ d).norm()}[norm]
    by_hand = sum(float(mags.alpha[k].detach()) * (x @ down.t() @ up.t()) / n(down, up) for k, (down, up) in enumerate(dirs))
    torch.testing.assert_close(fd(x), by_hand, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(want.detach(), by_hand, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(x @ fd.delta_weight().t(), by_hand, atol=1e-5, rtol=1e-5)


def F_lin(x, down, up):
    return x @ down.t() @ up.t()


def test_fused_dense_sum_equals_low_rank_sum_and_caches_without_grad():
    g = torch.Generator().manual_seed(1)
    mags = Magnitudes(6, 1.0)
    fd = FrozenDirections(4, 4, mags, "m")
    for k, (down, up) in enumerate(_dirs(g, 5, r=2, d_in=4, d_out=4)):  # 10 ranks > 4*4/8: the dense path
        fd.add(down, up, k, "factors")
    x = torch.randn(3, 4, generator=g)
    low_rank = (x @ fd.down.t() * fd.coefficients()) @ fd.up.t()
    mags.alpha.requires_grad_(False)
    with torch.no_grad():
        dense = fd(x)
        assert fd._cache is not None
        cached = fd._cache[1]
        fd(x)
        assert fd._cache[1] is cached  # no magnitude changed: not rebuilt
        mags.alpha.mul_(2)
        torch.testing.assert_close(fd(x), 2 * dense, atol=1e-5, rtol=1e-5)  # rebuilt after the change
    torch.testing.assert_close(dense, low_rank, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("input_grad", [True, False])
def test_the_path_chosen_while_training_is_the_one_with_fewer_counted_flops(input_grad):
    """For every stacked rank around the crossing, the training step (forward and backward, as PyTorch's FLOP
    counter counts it) of the chosen path costs no more than the other path's."""
    from torch.utils.flop_counter import FlopCounterMode

    g = torch.Generator().manual_seed(3)
    d_in, d_out, T = 32, 24, 64

    def step_flops(fd, low_rank: bool):
        fd.low_rank_cheaper = lambda training, grad, tokens: low_rank
        x = torch.randn(T, d_in, generator=g).requires_grad_(input_grad)
        with FlopCounterMode(display=False) as fc:
            fd(x).sum().backward()
        return fc.get_total_flops()

    seen = set()
    for R in range(2, 40, 2):
        mags = Magnitudes(R, 1.0)
        fd = FrozenDirections(d_in, d_out, mags, "m")
        for k, (down, up) in enumerate(_dirs(g, R // 2, r=2, d_in=d_in, d_out=d_out)):
            fd.add(down, up, k, "factors")
        chosen = FrozenDirections.low_rank_cheaper(fd, True, input_grad, T)
        low, dense = step_flops(fd, True), step_flops(fd, False)
        assert (low if chosen else dense) == min(low, dense), (R, chosen, low, dense)
        seen.add(chosen)
    assert seen == {True, False}  # the range crosses over


def test_gradients_reach_every_magnitude_but_not_frozen_factors():
    g = torch.Generator().manual_seed(2)
    mags = Magnitudes(3, 0.8)
    fd = FrozenDirections(7, 5, mags, "m")
    for k, (down, up) in enumerate(_dirs(g, 2)):
        fd.add(down, up, k, "factors")
    cur = ScaledBranch(*_dirs(g, 1)[0], mags, "m", 2, "none")
    x = torch.randn(4, 7, generator=g)
    (fd(x) + cur(x)).pow(2).sum().backward()
    assert mags.alpha.grad is not None and (mags.alpha.grad != 0).all()
    assert cur.down.grad is not None and cur.up.grad is not None
    assert not any(b.requires_grad for b in fd.buffers()) and not list(fd.parameters())


def test_rank_schedule_and_absorption_coefficients():
    sched = [[0, 10], [4, 8], [8, 6]]
    assert [rank_for_task(t, 10, sched) for t in range(10)] == [10] * 4 + [8] * 4 + [6] * 2
    assert rank_for_task(7, 5, None) == 5
    g = torch.Generator().manual_seed(3)
    old = torch.randn(3, 50, generator=g)
    d, res = absorption_coefficients(old, 2 * old[0] - 0.5 * old[2])  # inside the old span: residual 0
    torch.testing.assert_close(d, torch.tensor([2.0, 0.0, -0.5], dtype=torch.float64), atol=1e-8, rtol=0)
    assert res < 1e-12
    q = torch.linalg.qr(torch.randn(50, 4, generator=g, dtype=torch.float64))[0].t()
    d, res = absorption_coefficients(q[:3], 0.6 * q[0] + 0.8 * q[3])  # known residual: 0.8^2
    assert res == pytest.approx(0.64, abs=1e-9)


def _run(tmp_path, method, *extra, name="run", sets=()):
    out = tmp_path / name
    args = ["run", "--preset", "cifar100-mini", "--method", method, "--out", str(out)]
    for s in smoke_sets(**{"benchmark.num_tasks": 4, "train.checkpoint_every": 2, "method.rank": 2}) + list(sets):
        args += ["--set", s]
    return main(args + list(extra)), out


@pytest.mark.slow
@pytest.mark.shared
@pytest.mark.parametrize("method", ["sd-lora", "sd-lora-kd"])
def test_sd_lora_runs_and_resumes_exactly(tmp_path, method, one_thread):
    rc, full = _run(tmp_path, method, name="full")
    assert rc == 0
    a = json.loads((full / "results.json").read_text())
    assert all(v is not None for v in a["acc_matrix"][3])
    with interrupted_at_step_checkpoint(3):  # mid task 1, after frozen directions and magnitudes exist
        rc, part = _run(tmp_path, method, name="part")
    assert rc == 130
    rc, part = _run(tmp_path, method, "--resume", name="part")
    assert rc == 0
    b = json.loads((part / "results.json").read_text())
    assert a["acc_matrix"] == b["acc_matrix"] and a["metrics"] == b["metrics"]
