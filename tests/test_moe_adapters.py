"""MoE-Adapters: the noisy top-k gate and its cv^2 balance loss against hand computations; activate-freeze (the
experts frozen after a task never change again); DDAS (an image whose reconstruction error exceeds the
threshold gets zero-shot CLIP's logits, exactly)."""

import math

import pytest
import torch

from conftest import TINY_CLIP, clip_datasets, smoke_sets
from loracl.models.moe import ExpertMixture, cv_squared, noisy_top_k
from loracl.runs.assembly import load_config
from loracl.runs.runner import Runner
from loracl.runs.statefile import load as load_checkpoint


def test_cv_squared_by_hand():
    v = torch.tensor([1.0, 2.0, 3.0, 6.0])  # mean 3, unbiased variance (4 + 1 + 0 + 9) / 3
    assert float(cv_squared(v)) == pytest.approx((14 / 3) / 9, rel=1e-6)
    assert float(cv_squared(torch.tensor([5.0]))) == 0.0
    assert float(cv_squared(torch.full((4,), 2.0))) == 0.0


def test_clean_top2_gates_pick_the_two_largest_logits():
    g = torch.Generator().manual_seed(0)
    h, wg, wn = torch.randn(6, 8, generator=g), torch.randn(8, 5, generator=g), torch.randn(8, 5, generator=g)
    gates, load = noisy_top_k(h, wg, wn, 2, noisy=False)
    clean = h @ wg
    assert ((gates > 0).sum(1) == 2).all()
    top = clean.topk(2, dim=1)
    torch.testing.assert_close(gates.gather(1, top.indices), torch.softmax(top.values, 1))
    torch.testing.assert_close(gates.sum(1), torch.ones(6))
    torch.testing.assert_close(load, (gates > 0).sum(0).float())


def _phi(z):
    return 0.5 * (1 + math.erf(z / math.sqrt(2)))


def test_noisy_top2_gates_and_load_by_hand():
    g = torch.Generator().manual_seed(1)
    n, d, E, k = 5, 8, 6, 2
    h, wg, wn = torch.randn(n, d, generator=g), torch.randn(d, E, generator=g), torch.randn(d, E, generator=g)
    torch.manual_seed(3)
    gates, load = noisy_top_k(h, wg, wn, k, noisy=True)
    torch.manual_seed(3)
    eps = torch.randn(n, E)  # the same draw
    clean = (h @ wg).tolist()
    std = [[math.log1p(math.exp(v)) + 1e-2 for v in row] for row in (h @ wn).tolist()]
    expect_load = [0.0] * E
    for i in range(n):
        noisy = [clean[i][e] + float(eps[i, e]) * std[i][e] for e in range(E)]
        order = sorted(range(E), key=lambda e: -noisy[e])
        assert set(torch.nonzero(gates[i]).flatten().tolist()) == set(order[:k])  # exactly the top 2
        z = [math.exp(noisy[e]) for e in order[:k]]
        for e, w in zip(order[:k], z):
            assert float(gates[i, e]) == pytest.approx(w / sum(z), rel=1e-5)
        thr_in, thr_out = noisy[order[k]], noisy[order[k - 1]]
        for e in range(E):
            thr = thr_in if noisy[e] > thr_in else thr_out
            expect_load[e] += _phi((clean[i][e] - thr) / std[i][e])
    torch.testing.assert_close(load, torch.tensor(expect_load), rtol=1e-5, atol=1e-6)
    importance = gates.sum(0)
    mi, ml = sum(importance.tolist()) / E, sum(expect_load) / E
    hand = (sum((v - mi) ** 2 for v in importance.tolist()) / (E - 1)) / mi ** 2 \
        + (sum((v - ml) ** 2 for v in expect_load) / (E - 1)) / ml ** 2
    assert float(cv_squared(importance) + cv_squared(load)) == pytest.approx(hand, rel=1e-4)


def test_mixture_runs_each_expert_on_its_samples_only():
    torch.manual_seed(0)
    m = ExpertMixture(8, experts=4, width=3, scale=0.1, dropout=0.0, routers=2, top_k=2, learning=1).eval()
    m.set_route(1)
    with torch.no_grad():
        for p in m.parameters():
            p.normal_()
    x = torch.randn(5, 3, 8)  # samples, tokens, width
    gates, _ = noisy_top_k(x[:, 0], m.w_gate[1], m.w_noise[1], 2, noisy=False)
    expect = sum(gates[:, e, None, None] * m.experts[e](x) for e in range(4))
    torch.testing.assert_close(m(x), expect)
    m.batch_first = False  # tokens first: the same mixture on the transposed input
    torch.testing.assert_close(m(x.transpose(0, 1)), expect.transpose(0, 1))


# ---- a tiny run on real data: a random tiny CLIP, two datasets ----------------------------------------------
CLIP = TINY_CLIP + [
        clip_datasets(8, 4),
        "method.reference={name: tiny_imagenet, root: '{data_root}/tiny_imagenet32', "
        "max_per_class: {train: 2, test: 1}}", "method.ref_steps=5", "method.ae_steps=10", "method.experts=4",
        "train.optimizer.lr=0.05"]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    from loracl.methods.moe_adapters import MoEAdapters

    frozen_after, grads_seen = [], []
    end, after = MoEAdapters.end_task, MoEAdapters.after_backward

    def end_task(self, task):
        end(self, task)
        frozen_after.append([list(m.frozen) for m in self.mixtures])

    def after_backward(self, task):
        after(self, task)
        grads_seen.append([p.grad is None for m in self.mixtures for p in m.frozen_parameters()])

    MoEAdapters.end_task, MoEAdapters.after_backward = end_task, after_backward
    try:
        sets = smoke_sets(**{"data.batch_size": 8, "eval.max_per_task": None, "threads": 1}) + CLIP
        out = tmp_path_factory.mktemp("moe")
        runner = Runner(load_config(preset="mini-mtil", method="moe-adapters", sets=sets), out, progress=False,
                        log=lambda *a, **k: None)
        runner.run()
    finally:
        MoEAdapters.end_task, MoEAdapters.after_backward = end, after
    return runner, out, frozen_after, grads_seen


@pytest.mark.slow
@pytest.mark.shared
def test_frozen_experts_never_change_in_a_later_task(tiny_run):
    runner, out, frozen_after, grads_seen = tiny_run
    assert all(len(f) == 2 for f in frozen_after[0])  # two experts per site after the first task
    assert grads_seen and all(all(g) for g in grads_seen[len(grads_seen) // 2:])  # task 2: no frozen gradient
    a = load_checkpoint(out / "checkpoints" / "task_00.pt")["model"]
    b = load_checkpoint(out / "checkpoints" / "task_01.pt")["model"]
    sites = runner.model.adapter.sites
    keys = [k for k in a if ".moe.experts." in k]
    assert len(keys) == len(sites) * 4 * 4  # per site: 4 experts x (down, up) x (weight, bias)
    changed = 0
    for k in keys:
        site = k.split(".lora.")[0]
        i = next(j for j, s in enumerate(sites) if s.layer is runner.model.get_submodule(site).lora)
        e = int(k.split(".moe.experts.")[1].split(".")[0])
        if e in frozen_after[0][i]:
            assert torch.equal(a[k], b[k]), k
        else:
            changed += not torch.equal(a[k], b[k])
    assert changed > 0  # the experts left free did train in the second task
    for group in runner.method.param_groups(runner.scenario.tasks[1]).values():
        assert not {id(p) for p in group} & {id(p) for m in runner.method.mixtures for p in m.frozen_parameters()}


@pytest.mark.slow
@pytest.mark.shared
def test_ddas_sends_unfamiliar_images_to_zero_shot_clip_exactly(tiny_run):
    runner, _, _, _ = tiny_run
    method, model = runner.method, runner.model
    x = torch.cat([xb for task in runner.scenario.tasks for xb, _ in runner.data.eval_batches(task.test)])
    ids = runner.scenario.tasks[1].class_ids
    ids = torch.as_tensor(ids)
    with torch.no_grad():
        feats = method.zero_shot_features(x)
        err = method.bank.errors(feats)
        assert bool(method.bank.trained.all())  # the reference slot and both tasks
        popped = [s.pop("moe") for s in model.adapter.sites]  # CLIP with no adapter at all: zero-shot CLIP
        zero_shot = model(x, ids).float()
        for s, br in zip(model.adapter.sites, popped):
            s.add(br, "moe")
        best, slot = err.min(1)
        method.cfg.threshold = float(best.median())  # about half the images above it
        route = method.select(feats)
        out = method.logits(x, ids)
        above = (best > method.cfg.threshold) | (slot == 0)
        assert bool((route[above] == -1).all()) and bool((route[~above] == slot[~above] - 1).all())
        assert above.any() and (~above).any()
        assert torch.equal(out[above], zero_shot[above])  # bit for bit
        assert not torch.allclose(out[~above], zero_shot[~above])  # the routed ones went through experts
        for m in method.mixtures:
            m.set_route(1)
        torch.testing.assert_close(out[route == 1], model(x[route == 1], ids).float())
