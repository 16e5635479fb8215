"""Classifier alignment, class statistics and NCM on plain tensors (a stand-in for the run services)."""

import contextlib
import copy
from types import SimpleNamespace

import pytest
import torch
import torch.nn as nn

from loracl.cl.alignment import (ClassifierAlignment, normalised_logits, pack_lower, sample_features, shrink_factors,
                              unpack_lower)
from loracl.config import AlignConfig
from loracl.errors import ConfigError
from loracl.data.loader import derive_seed
from loracl.engine import Batch
from loracl.cl.statistics import ncm_logits
from loracl.models.heads import LinearHead, TextHead
from loracl.cl.statistics import ClassStatistics


class FakeModel(nn.Module):
    """Features are the inputs themselves: the 'images' of a task are feature vectors."""

    def __init__(self, d, head):
        super().__init__()
        self.backbone = SimpleNamespace(feature_dim=d)
        self.head = head
        self.device = torch.device("cpu")

    def features(self, x):
        return x


class FakeRun:
    """The services alignment uses: seed, log, cost.timed, forward_pass."""

    def __init__(self, seed=0):
        self._seed = seed
        self.lines = []
        self.cost = SimpleNamespace(timed=lambda phase: contextlib.nullcontext())

    def seed(self, *parts):
        return derive_seed(self._seed, *parts)

    def log(self, msg):
        self.lines.append(msg)

    def forward_pass(self, images, fn, *, desc, view="train"):
        X, Y = images
        for k in range(0, len(Y), 64):
            fn(Batch(X[k:k + 64], Y[k:k + 64], torch.arange(k, min(k + 64, len(Y)))))


def gaussian_classes(means, n, gen, spread=1.0):
    d = means.shape[1]
    X = torch.cat([m + spread * torch.randn(n, d, generator=gen) for m in means])
    Y = torch.arange(len(means)).repeat_interleave(n)
    return X, Y


def test_class_statistics_match_torch_mean_and_cov_whatever_the_batches():
    g = torch.Generator().manual_seed(0)
    X, Y = gaussian_classes(torch.randn(3, 5, generator=g) * 4, 50, g)
    Y = Y + 10  # global ids
    acc = ClassStatistics([12, 10, 11], 5)
    for k in range(0, len(Y), 7):
        acc.update(X[k:k + 7], Y[k:k + 7])
    means, covs = acc.finalize()
    for row, c in enumerate([12, 10, 11]):
        Xc = X[Y == c].double()
        assert torch.allclose(means[row], Xc.mean(0), atol=1e-10)
        assert torch.allclose(covs[row], torch.cov(Xc.t()), atol=1e-10)
    assert acc.count.tolist() == [50, 50, 50]


def test_sampled_features_reproduce_stored_mean_and_covariance():
    g = torch.Generator().manual_seed(1)
    d = 6
    means = torch.randn(2, d, generator=g, dtype=torch.float64) * 3
    A = torch.randn(2, d, d, generator=g, dtype=torch.float64)
    covs = A @ A.transpose(1, 2) / d + 0.1 * torch.eye(d, dtype=torch.float64)
    x, k = sample_features(means, torch.linalg.cholesky(covs), 40000, torch.Generator().manual_seed(2))
    for c in range(2):
        xc = x[k == c]
        assert len(xc) == 40000
        assert torch.allclose(xc.mean(0), means[c], atol=0.05)
        assert torch.allclose(torch.cov(xc.t()), covs[c], atol=0.05 * covs[c].abs().max())
    # the shrink schedule scales each class's mean: task 0 of 2 tasks -> 0.95, the newest task -> 1
    f = shrink_factors(torch.tensor([0, 1]), 1)
    assert f.tolist() == pytest.approx([0.95, 1.0])
    x, k = sample_features(means, torch.linalg.cholesky(covs), 40000, torch.Generator().manual_seed(2), f)
    assert torch.allclose(x[k == 0].mean(0), 0.95 * means[0], atol=0.05)


def test_logit_normalisation_divides_by_mean_block_norm_and_temperature():
    logits = torch.tensor([[3.0, 4.0, 0.0, 1.0]])
    out = normalised_logits(logits, [2, 2], 0.1)
    assert torch.allclose(out, logits / ((5.0 + 1.0) / 2) / 0.1, atol=1e-5)


def two_task_problem(seed=0, offset=3.0):
    """4 classes in 2 tasks, separated Gaussians; each task's head right within its own classes, but the second
    one's logits offset so that it wins on many of the first task's images (heads trained apart)."""
    g = torch.Generator().manual_seed(seed)
    d = 8
    centres = torch.eye(d)[:4] * 2
    head = LinearHead(d)
    tasks = []
    for t in range(2):
        ids = [2 * t, 2 * t + 1]
        X, Y = gaussian_classes(centres[ids], 200, g, spread=0.5)
        tasks.append(SimpleNamespace(index=t, class_ids=ids, train=(X, Y + 2 * t)))
        head.add_classes(ids)
        with torch.no_grad():
            head.chunks[t].weight.copy_(centres[ids])
            head.chunks[t].bias.fill_(offset * t)
    test = gaussian_classes(centres, 200, g, spread=0.5)
    return head, tasks, test


def accuracy(head, test):
    X, Y = test
    return float((head.all_logits(X).argmax(-1) == Y).float().mean())


@pytest.mark.parametrize("logit_norm", [False, True])
def test_alignment_repairs_miscalibrated_task_heads(one_thread, logit_norm):
    head, tasks, test = two_task_problem()
    before = accuracy(head, test)
    run = FakeRun()
    align = ClassifierAlignment(AlignConfig(enabled=True, logit_norm=logit_norm), run, FakeModel(8, head))
    align.end_task(tasks[0])  # first task: statistics only, the head is untouched
    assert accuracy(head, test) == before and not run.lines
    align.end_task(tasks[1])
    after = accuracy(head, test)
    assert before < 0.85 and after > before + 0.05, (before, after)
    assert len(run.lines) == 1 and "align after task 1: 4 classes" in run.lines[0]
    assert align.means.dtype == torch.float64 and align.covs.shape == (4, 8, 8)
    assert align.task_of.tolist() == [0, 0, 1, 1]
    # the ridge: covariance of class 0 is its sample covariance + 1e-4 I
    X, Y = tasks[0].train
    assert torch.allclose(align.covs[0], torch.cov(X[Y == 0].double().t()) + 1e-4 * torch.eye(8, dtype=torch.float64))


def test_alignment_with_identical_statistics_keeps_a_calibrated_head_right(one_thread):
    """Every class drawn from the same Gaussian shape around its own centre, heads already calibrated: the
    alignment must not lower accuracy."""
    head, tasks, test = two_task_problem(seed=3, offset=0.0)
    before = accuracy(head, test)
    align = ClassifierAlignment(AlignConfig(enabled=True), FakeRun(), FakeModel(8, head))
    for t in tasks:
        align.end_task(t)
    assert before > 0.9 and accuracy(head, test) >= before


def test_alignment_resumes_exactly_from_its_state(one_thread):
    head, tasks, test = two_task_problem()
    a = ClassifierAlignment(AlignConfig(enabled=True, epochs=2), FakeRun(seed=5), FakeModel(8, head))
    a.end_task(tasks[0])
    saved_state, saved_head = copy.deepcopy(a.state_dict()), copy.deepcopy(head)
    a.end_task(tasks[1])
    # a fresh run loads the state written after task 0 and aligns after task 1 again
    b = ClassifierAlignment(AlignConfig(enabled=True, epochs=2), FakeRun(seed=5), FakeModel(8, saved_head))
    b.load_state_dict(saved_state)
    b.end_task(tasks[1])
    for p, q in zip(head.parameters(), saved_head.parameters()):
        assert torch.equal(p, q)
    # another seed draws other features
    c = ClassifierAlignment(AlignConfig(enabled=True, epochs=2), FakeRun(seed=6), FakeModel(8, copy.deepcopy(saved_head)))
    c.load_state_dict(saved_state)
    c.end_task(tasks[1])
    assert not torch.equal(c.model.head.chunks[0].weight, head.chunks[0].weight)


def test_covariances_are_stored_as_lower_triangles_with_the_same_cholesky_factors(one_thread):
    g = torch.Generator().manual_seed(0)
    A = torch.randn(3, 6, 6, generator=g, dtype=torch.float64)
    covs = A @ A.transpose(1, 2) + 0.1 * torch.eye(6, dtype=torch.float64)
    covs = covs + torch.triu(1e-9 * torch.randn(3, 6, 6, generator=g, dtype=torch.float64), 1)  # unequal triangles
    packed = pack_lower(covs)
    assert packed.shape == (3, 21)
    sym = unpack_lower(packed, 6)
    assert torch.equal(sym, sym.transpose(1, 2)) and torch.equal(torch.tril(sym), torch.tril(covs))
    # the Cholesky factor reads the lower triangle only: the alignment draws are those of the unpacked matrices
    assert torch.equal(torch.linalg.cholesky(sym), torch.linalg.cholesky(covs))

    head, tasks, _ = two_task_problem()
    a = ClassifierAlignment(AlignConfig(enabled=True), FakeRun(), FakeModel(8, head))
    a.end_task(tasks[0])
    state = a.state_dict()
    assert "covs" not in state and state["covs_lower"].shape == (2, 36)  # 36 of 64 entries per class
    b = ClassifierAlignment(AlignConfig(enabled=True), FakeRun(), FakeModel(8, copy.deepcopy(head)))
    b.load_state_dict(state)
    assert torch.equal(b.covs, a.covs)
    # a checkpoint written before the packed form still loads, to the same matrices
    c = ClassifierAlignment(AlignConfig(enabled=True), FakeRun(), FakeModel(8, copy.deepcopy(head)))
    c.load_state_dict({k: v for k, v in state.items() if k != "covs_lower"} | {"covs": a.covs})
    assert torch.equal(c.covs, a.covs)


def test_alignment_refuses_the_clip_text_head():
    text = TextHead.__new__(TextHead)
    nn.Module.__init__(text)
    with pytest.raises(ConfigError, match="linear heads"):
        ClassifierAlignment(AlignConfig(enabled=True), FakeRun(), FakeModel(8, text))


def test_ncm_predicts_the_nearest_prototype_by_cosine():
    protos = torch.tensor([[1.0, 0.0, 0.0], [0.0, 5.0, 0.0], [0.0, 0.0, 0.1]])
    feats = torch.tensor([[2.0, 0.1, 0.0], [0.0, 0.1, 0.2], [0.3, 3.0, 0.0], [-1.0, 0.0, 0.05]])
    logits = ncm_logits(feats, protos)
    assert logits.argmax(-1).tolist() == [0, 2, 1, 2]  # the scale of a prototype does not matter, the angle does
    assert torch.allclose(logits[0, 0], torch.tensor(2.0 / (2.0 ** 2 + 0.01) ** 0.5))


def test_inflora_ca_switches_alignment_on_unless_the_config_says_otherwise():
    from loracl.runs.assembly import load_config

    c = load_config(preset="cifar100-mini", method="inflora-ca")
    assert c.align.enabled and c.method.memory == "gpm" and c.method.rank == 5
    assert not load_config(preset="cifar100-mini", method="inflora-ca", sets=["align.enabled=false"]).align.enabled
    assert not load_config(preset="cifar100-mini", method="inflora").align.enabled
    assert load_config(preset="cifar100-mini", method="seq-lora", sets=["align.enabled=true"]).align.enabled
    c = load_config(preset="inflora-ca-cifar100")
    assert (c.method.name, c.method.rank, c.align.enabled, c.align.logit_norm) == ("inflora-ca", 5, True, False)
    assert (c.train.optimizer.name, c.train.optimizer.lr, c.train.schedule.name) == ("sgd", 0.001, "cosine-epoch")
    c = load_config(preset="inflora-ca-imagenet-r-10")
    assert (c.method.rank, c.method.eps, c.align.logit_norm, c.train.epochs) == (10, 0.95, True, 50)


def test_cosine_epoch_is_torchs_cosine_annealing_stepped_per_epoch():
    """InfLoRA_CA's CosineAnnealingLR(T_max=E), stepped once per epoch: constant within an epoch."""
    from loracl.config import ScheduleConfig
    from loracl.engine.trainer import build_schedule

    epochs, steps = 4, 3
    ours = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    sched = build_schedule(ours, ScheduleConfig(name="cosine-epoch"), epochs, steps)
    ref = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    ref_sched = torch.optim.lr_scheduler.CosineAnnealingLR(ref, T_max=epochs)
    for e in range(epochs):
        for _ in range(steps):
            assert ours.param_groups[0]["lr"] == pytest.approx(ref.param_groups[0]["lr"], rel=1e-12)
            ours.step()
            sched.step()
        ref.step()
        ref_sched.step()
