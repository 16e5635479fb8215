"""CL-LoRA: its pieces by hand (orthonormal fixed down-projection, gradient reassignment, orthogonality,
distillation), per-task scoring on a hand-built case, branch selection, and a tiny run on real images where the
shared down-projections never change and two optimiser steps are taken per batch from the second task on."""

import contextlib
import math

import pytest
import torch

from conftest import smoke_sets
from loracl.cl.shared_specific import distillation, orthogonality, orthonormal_down, reassign_gradient_
from loracl.methods import cl_lora
from loracl.methods.cl_lora import CLLoRA
from loracl.models.branches import Branch, WeightedBranch
from loracl.models.lora import LoRAAdapter, LoRALayer, Site
from loracl.runs.assembly import load_config

TINY = ["benchmark.num_tasks=2", "benchmark.datasets=[{name: cifar100, root: '{data_root}/cifar100', classes: "
        f"{list(range(20))}, max_per_class: {{train: 20, test: 5}}}}]", "method.rank=4"]


def test_orthonormal_down_has_orthonormal_rows():
    d = orthonormal_down(8, 128, torch.Generator().manual_seed(0))
    assert d.shape == (8, 128)
    assert torch.allclose(d @ d.t(), torch.eye(8), atol=1e-6)
    assert not torch.allclose(d, orthonormal_down(8, 128, torch.Generator().manual_seed(1)))


def test_reassign_gradient_equals_hand_computation():
    up = torch.nn.Parameter(torch.zeros(3, 2))
    up.grad = torch.tensor([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]])
    previous = torch.tensor([[3.0, 4.0], [0.0, 10.0], [0.0, 15.0]])  # row norms 5, 10, 15 -> w = 3 * n / 30
    reassign_gradient_(up, previous)
    assert torch.allclose(up.grad, torch.tensor([[0.5, 1.0], [3.0, 4.0], [7.5, 9.0]]))


def test_orthogonality_by_hand():
    prev = [torch.tensor([[1.0, 0.0]]), torch.tensor([[1.0, 1.0]])]
    cur = torch.tensor([[0.0, 2.0]])
    # |cos| = 0 and 1 / sqrt 2: mean 0.5 / sqrt 2
    assert float(orthogonality(prev, cur)) == pytest.approx(0.5 / math.sqrt(2), rel=1e-6)
    assert float(orthogonality([], cur)) == 0.0


def test_distillation_by_hand_reaches_both_sides():
    s = torch.tensor([[0.0, 2.0]], requires_grad=True)
    t = torch.tensor([[2.0, 0.0]], requires_grad=True)
    p = torch.softmax(t.detach() / 2, 1)
    expected = -(p * torch.log_softmax(s.detach() / 2, 1)).sum()
    loss = distillation(s, t, 2.0)
    assert float(loss.detach()) == pytest.approx(float(expected))
    loss.backward()
    assert s.grad.abs().sum() > 0 and t.grad.abs().sum() > 0  # the official teacher is not detached


def _site(tags: dict) -> Site:
    lin = torch.nn.Linear(2, 2, bias=False)
    lin.weight.data.zero_()
    layer = LoRALayer(lin, "weight", {"all": (0, 2)})
    for tag, br in tags.items():
        layer.add("all", br, tag)
    return Site("image", 0, "q", layer, "all")


def test_selection_sums_only_the_selected_branches_and_weights_scale():
    one = Branch(torch.eye(2), torch.eye(2))
    two = WeightedBranch(torch.eye(2), 2 * torch.eye(2), weight=3.0)
    site = _site({"a": one, "b": two})
    adapter = LoRAAdapter([site])
    x, out = torch.tensor([[1.0, 2.0]]), torch.zeros(1, 2)
    assert torch.allclose(site.layer.apply_branches(x, out), 7 * x)
    with adapter.selected({"b"}):
        assert torch.allclose(site.layer.apply_branches(x, out), 6 * x)
        with adapter.selected({"a"}):
            assert torch.allclose(site.layer.apply_branches(x, out), x)
        assert torch.allclose(site.layer.apply_branches(x, out), 6 * x)
    assert site.layer.selected is None
    assert torch.allclose(two.delta_weight(), 6 * torch.eye(2))
    two.freeze()
    assert not any(p.requires_grad for p in two.parameters())
    rebuilt = WeightedBranch.from_spec(two.spec())
    assert rebuilt.spec() == two.spec()


def test_each_class_is_scored_in_its_own_tasks_feature_space(monkeypatch):
    """Task 0 (classes 0, 1) and task 1 (classes 2, 3) have the same prototypes e1, e2, but an image's features are
    e1 with task 0's branches and e2 with task 1's: class 0 and class 3 score 1, classes 1 and 2 score 0. One
    space for all classes would give two equal pairs; the shared prefix runs once."""
    active, calls = [], {"prefix": 0, "suffix": 0}

    class Adapter:
        @contextlib.contextmanager
        def selected(self, tags):
            active.append(set(tags))
            yield
            active.pop()

    def fake_prefix(vit, x, split):
        calls["prefix"] += 1
        return x

    def fake_suffix(vit, h, split, end=None):
        calls["suffix"] += 1
        k = 0 if "task0" in active[-1] else 1
        return torch.nn.functional.one_hot(torch.full((len(h),), k), 2).float()

    monkeypatch.setattr(cl_lora, "prefix", fake_prefix)
    monkeypatch.setattr(cl_lora, "suffix", fake_suffix)
    m = object.__new__(CLLoRA)
    m.model = type("M", (), {"adapter": Adapter(), "device": torch.device("cpu")})()
    m.run = type("R", (), {"classes": type("C", (), {"columns": staticmethod(
        lambda y, ids: torch.searchsorted(ids, y))})()})()
    m.vit, m.split = None, 1
    m.ids, m.owner = torch.tensor([0, 1, 2, 3]), torch.tensor([0, 0, 1, 1])
    m.protos = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0], [0.0, 1.0]])
    out = m.logits(torch.zeros(1, 5), torch.tensor([0, 1, 2, 3, 4]))
    assert torch.allclose(out[0, :4], torch.tensor([1.0, 0.0, 0.0, 1.0]))
    assert out[0, 4] == float("-inf")  # no prototype yet
    assert calls == {"prefix": 1, "suffix": 2}


@pytest.mark.slow
@pytest.mark.shared
@pytest.mark.parametrize("kd_step", ["separate", "summed"])
def test_cl_lora_keeps_shared_downs_fixed_and_steps_twice(tmp_path, monkeypatch, kd_step):
    from loracl.runs.runner import Runner

    start, seen = {}, {"kd_steps": 0, "loss_calls": 0, "grads": 0}
    setup, end_task, loss = CLLoRA.setup, CLLoRA.end_task, CLLoRA.loss
    optimizer_steps = []

    def recording_setup(self):
        setup(self)
        start.update({s.name: s.branches["shared"].down.detach().clone() for s in self.shared_sites})

    def recording_end_task(self, task):
        if task.index == 0:
            start.update({"up0": {s.name: s.branches["shared"].up.detach().clone() for s in self.shared_sites},
                          "spec0": {s.name: s.branches["task0"].up.detach().clone() for s in self.specific_sites}})
        end_task(self, task)

    def recording_loss(self, net, batch, task):
        seen["loss_calls"] += 1
        if task.index == 1 and not optimizer_steps:
            orig = self.run.optimizer_step

            def counted(value, after=None):
                seen["kd_steps"] += 1
                return orig(value, after)
            self.run.optimizer_step = counted
            optimizer_steps.append(True)
        return loss(self, net, batch, task)

    def recording_reassign(self):
        seen["grads"] += sum(s.branches["shared"].up.grad is not None for s in self.shared_sites)
        return reassign(self)

    reassign = CLLoRA.reassign
    monkeypatch.setattr(CLLoRA, "setup", recording_setup)
    monkeypatch.setattr(CLLoRA, "end_task", recording_end_task)
    monkeypatch.setattr(CLLoRA, "loss", recording_loss)
    monkeypatch.setattr(CLLoRA, "reassign", recording_reassign)
    cfg = load_config(preset="cifar100-mini", method="cl-lora",
                      sets=smoke_sets(**{"eval.max_per_task": None}) + TINY + [f"method.kd_step={kd_step}"])
    runner = Runner(cfg, tmp_path / "cl-lora", progress=False, log=lambda *a, **k: None)
    r = runner.run()
    assert r["status"] == "complete" and r["acc_matrix"][1][0] is not None
    m = runner.method
    assert m.split == 3 and {s.block for s in m.shared_sites} == {0, 1, 2}
    for s in m.shared_sites:
        down = s.branches["shared"].down
        assert torch.equal(down, start[s.name])  # fixed forever
        assert torch.allclose(down @ down.t(), torch.eye(4), atol=1e-5)
        assert not torch.equal(s.branches["shared"].up, start["up0"][s.name])  # the shared up trained on in task 1
        assert torch.equal(s.branches["previous"].up, start["up0"][s.name])  # the teacher: task 0's shared up
    for s in m.specific_sites:
        assert set(s.branches) == {"task0", "task1"}
        assert torch.equal(s.branches["task0"].up, start["spec0"][s.name])  # stored frozen
        assert not any(p.requires_grad for p in s.branches["task0"].parameters())
    assert len(m.ids) == 20 and m.owner.tolist() == [0] * 10 + [1] * 10
    task1_batches = seen["loss_calls"] // 2  # two equal tasks
    assert seen["kd_steps"] == (task1_batches if kd_step == "separate" else 0)  # one extra step per batch
    assert seen["grads"] == task1_batches * len(m.shared_sites)  # the reassignment saw every KD gradient
