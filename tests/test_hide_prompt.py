"""HiDe-Prompt: the contrastive term by hand, the prompt momentum, multi-centroid statistics and diagonal draws,
the task-identity head re-aligned from well-separated statistics, and the predicted task's prompt at test."""

import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn as nn

from conftest import smoke_sets
from loracl.cl.alignment import sample_diagonal
from loracl.cl.statistics import kmeans, multi_centroid_statistics
from loracl.methods.hide_prompt import HiDePrompt, HiDePromptConfig, HiDePrompts, contrastive
from loracl.models.heads import LinearHead

D = 8


def _tasks(n_tasks=3, per=2):
    return [SimpleNamespace(index=t, class_ids=list(range(t * per, (t + 1) * per))) for t in range(n_tasks)]


def _module(n_tasks=3, length=2, **kw):
    cfg = HiDePromptConfig(length=length, blocks=[0, 1], **kw)
    return HiDePrompts(cfg, _tasks(n_tasks), {0: D, 1: D}, D)


def test_contrastive_equals_hand_computation():
    anchors = torch.tensor([[1.0, 0.0]])
    feats = torch.tensor([[0.0, 2.0], [1.0, 1.0]])
    M = [[1.0, 0.0], [0.0, 2.0], [1.0, 1.0]]
    tau = 0.8
    total = 0.0
    for i, a in enumerate(M):  # row i: -log softmax(sim_i / tau)[i]
        sims = [(a[0] * b[0] + a[1] * b[1]) / tau for b in M]
        total += -(sims[i] - math.log(sum(math.exp(s) for s in sims)))
    assert float(contrastive(feats, anchors, tau)) == pytest.approx(total / 3, rel=1e-6)
    # no stored centroids (the first task): the batch alone
    only = contrastive(feats, torch.zeros(0, 2), tau)
    sims = torch.tensor([[4.0, 2.0], [2.0, 2.0]]) / tau
    assert float(only) == pytest.approx(float(nn.functional.cross_entropy(sims, torch.arange(2))), rel=1e-6)


def test_prompt_starts_from_the_previous_and_takes_the_momentum_after_the_task():
    torch.manual_seed(0)
    p = _module(prompt_momentum=0.25)
    p.begin(0)
    with torch.no_grad():
        p.e[0][0].fill_(1.0)
    p.end()
    assert torch.equal(p.e[0][0], torch.ones_like(p.e[0][0]))  # task 0: no earlier prompt, unchanged
    p.begin(1)
    assert torch.equal(p.e[0][1], p.e[0][0])  # the new prompt starts as the previous one
    with torch.no_grad():
        p.e[0][1].fill_(3.0)
    # in training the prompt is already mixed: 0.75 * 3 + 0.25 * 1, and the earlier prompt gets no gradient
    mixed = p.mixed(p.e[0], 1)
    assert torch.allclose(mixed, torch.full_like(mixed, 2.5))
    mixed.sum().backward()
    assert p.e[0][0].grad is None and torch.allclose(p.e[0][1].grad, torch.full_like(mixed, 0.75))
    p.end()
    assert torch.allclose(p.e[0][1], torch.full_like(p.e[0][1], 2.5))  # P_1 <- (1 - m) P_1 + m mean(P_0)
    assert torch.equal(p.e[0][0], torch.ones_like(p.e[0][0]))
    p.begin(2)
    with torch.no_grad():
        p.e[1][2].zero_()
    p.end()  # mean of P_0 and P_1 of block 1
    want = 0.25 * (p.e[1][0] + p.e[1][1]) / 2
    assert torch.allclose(p.e[1][2], want)


def test_kmeans_and_multi_centroid_statistics_find_the_clusters():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(50, D, generator=g, dtype=torch.float64) * 0.1
    b = torch.randn(30, D, generator=g, dtype=torch.float64) * 0.1 + 10
    x, y = torch.cat([a, b]), torch.zeros(80, dtype=torch.long)
    labels = kmeans(x, 2, torch.Generator().manual_seed(1))
    assert len(set(labels[:50].tolist())) == 1 and len(set(labels[50:].tolist())) == 1 and labels[0] != labels[50]
    means, var, owner = multi_centroid_statistics(x, y, [0], 2, torch.Generator().manual_seed(1))
    got = sorted([means[0], means[1]], key=lambda m: float(m.sum()))
    assert torch.allclose(got[0], a.mean(0)) and torch.allclose(got[1], b.mean(0))
    assert owner.tolist() == [0, 0]
    assert torch.allclose(var.sort(0).values[0], torch.minimum(a.var(0, unbiased=False), b.var(0, unbiased=False)))
    # fewer images than centroids: one cluster per image, with zero variance, which the draws skip
    means, var, _ = multi_centroid_statistics(x[:3], y[:3], [0], 10, torch.Generator().manual_seed(1))
    assert len(means) == 3 and float(var.abs().max()) == 0
    draws, rows = sample_diagonal(means, var, 4, torch.Generator().manual_seed(0))
    assert len(draws) == 0 and len(rows) == 0


def test_diagonal_draws_have_the_stored_moments():
    means = torch.tensor([[0.0, 5.0], [1.0, 1.0], [2.0, 2.0]], dtype=torch.float64)
    var = torch.tensor([[1.0, 4.0], [0.0, 0.0], [0.25, 0.25]], dtype=torch.float64)
    x, rows = sample_diagonal(means, var, 20000, torch.Generator().manual_seed(0))
    assert sorted(set(rows.tolist())) == [0, 2]  # the zero-variance row is skipped
    for r in (0, 2):
        xr = x[rows == r]
        assert torch.allclose(xr.mean(0), means[r], atol=0.05)
        assert torch.allclose(xr.var(0), var[r] + 1e-4, rtol=0.05)


def _method(p: HiDePrompts, tasks):
    head = LinearHead(D)
    for t in tasks:
        head.add_classes(t.class_ids)
    model = SimpleNamespace(prompts=p, head=head, device=torch.device("cpu"))
    run = SimpleNamespace(model=model, scenario=SimpleNamespace(tasks=tasks), batch_size=16,
                          seed=lambda *parts: sum(map(ord, str(parts))), log=lambda *a: None)
    m = HiDePrompt(HiDePromptConfig(), run)
    return m, model


def test_task_identity_head_picks_the_task_from_well_separated_statistics():
    torch.manual_seed(0)
    tasks = _tasks(3, 2)
    p = _module(3)
    m, model = _method(p, tasks)
    g = torch.Generator().manual_seed(0)
    centres = torch.randn(6, D, generator=g, dtype=torch.float64) * 4
    x = torch.cat([centres[c] + 0.3 * torch.randn(40, D, generator=g, dtype=torch.float64) for c in range(6)])
    y = torch.arange(6).repeat_interleave(40)
    stats = multi_centroid_statistics(x, y, list(range(6)), 3, torch.Generator().manual_seed(0))
    m.stats = {"tii": stats, "cls": stats}
    p.begin(2)
    p.end()
    test = torch.cat([centres[c] + 0.3 * torch.randn(20, D, generator=g, dtype=torch.float64) for c in range(6)])
    truth = torch.arange(3).repeat_interleave(40)
    before = (p.predict_task(p.tii(test.float())) == truth).float().mean()
    m.align(2)
    with torch.no_grad():
        after = (p.predict_task(p.tii(test.float())) == truth).float().mean()
        heads = model.head(test.float(), torch.arange(6)).argmax(-1)
    assert after >= 0.95 > before
    assert (heads == torch.arange(6).repeat_interleave(20)).float().mean() >= 0.95  # the classifier too


class _Fixed(nn.Module):
    def __init__(self, logits):
        super().__init__()
        self.logits = logits

    def forward(self, q):
        return self.logits


def test_at_test_the_predicted_tasks_prompt_is_used_and_in_training_the_own_mixed_one():
    torch.manual_seed(0)
    p = _module(3, length=2)
    p.begin(0), p.end(), p.begin(1), p.end()  # tasks 0 and 1 learned; task 2 not begun
    # classes 0-1 task 0, 2-3 task 1, 4-5 task 2 (not seen: never predicted, however large its logit)
    p.tii = _Fixed(torch.tensor([[0.0, 0, 5, 0, 9, 9], [3.0, 0, 1, 0, 9, 9], [0.0, 0, 0, 2, 0, 0]]))
    prefixes, aux = p.prefixes(torch.zeros(3, D))
    assert aux is None
    for b, e in zip(p.blocks, p.e):
        for i, k in enumerate([1, 0, 1]):
            assert torch.equal(prefixes[b].keys[i], e[k][:2]) and torch.equal(prefixes[b].values[i], e[k][2:])
    p.force = 0  # the statistics pass: the given task's prompt for every image
    prefixes, _ = p.prefixes(torch.zeros(3, D))
    assert all(torch.equal(prefixes[0].keys[i], p.e[0][0][:2]) for i in range(3))
    p.force = None
    p.begin(2)  # training: the true task's prompt, mixed, whatever the head says
    prefixes, _ = p.prefixes(torch.zeros(3, D))
    assert torch.allclose(prefixes[1].values[2], p.mixed(p.e[1], 2)[2:])


TINY = ["benchmark.num_tasks=2", "benchmark.datasets=[{name: cifar100, root: '{data_root}/cifar100', classes: "
        f"{list(range(6))}, max_per_class: {{train: 12, test: 4}}}}]", "method.ca_epochs=2", "method.n_centroids=3"]


@pytest.mark.slow
@pytest.mark.shared
def test_tiny_run_stores_centroids_and_records_task_identity(tmp_path):
    from loracl.runs.assembly import load_config
    from loracl.runs.runner import Runner

    cfg = load_config(preset="cifar100-mini", method="hide-prompt", sets=smoke_sets(**{"eval.max_per_task": None}) + TINY)
    runner = Runner(cfg, tmp_path / "hide", progress=False, log=lambda *a, **k: None)
    r = runner.run()
    assert r["status"] == "complete"
    tii = r["method_extras"]["tii_accuracy"]
    assert len(tii) == 2 and float(tii[0]) == 1.0  # one task: always right
    m = runner.method
    for k in ("tii", "cls"):
        means, var, owner = m.stats[k]
        assert sorted(set(owner.tolist())) == list(range(6)) and len(means) <= 6 * 3 and means.shape[1] == var.shape[1]
    assert not any(p.requires_grad for p in runner.model.backbone.parameters())
