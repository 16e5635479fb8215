"""C-LoRA: the self-regularisation on plain tensors; a tiny run on real images where the kept sum of merged
updates equals what the merges added to the pretrained weights."""

import pytest
import torch

from conftest import smoke_sets
from loracl.methods.c_lora import CLoRA, overlap_penalty
from loracl.runs.assembly import load_config

TINY = ["benchmark.num_tasks=2", "benchmark.datasets=[{name: cifar100, root: '{data_root}/cifar100', classes: "
        f"{list(range(20))}, max_per_class: {{train: 20, test: 5}}}}]", "method.rank=4"]


def test_overlap_penalty_equals_hand_computation():
    prev = torch.tensor([[1.0, 0.0], [2.0, -1.0]])
    delta = torch.tensor([[3.0, 5.0], [0.5, 2.0]])
    # (prev * delta) = [[3, 0], [1, -2]] -> 9 + 0 + 1 + 4
    assert float(overlap_penalty(prev, delta)) == pytest.approx(14.0)


def test_penalty_gradient_is_zero_where_earlier_tasks_changed_nothing():
    g = torch.Generator().manual_seed(0)
    prev = torch.randn(6, 5, generator=g, dtype=torch.float64)
    prev[:, :2] = 0  # two input columns no earlier task touched
    up = torch.randn(6, 3, generator=g, dtype=torch.float64, requires_grad=True)
    down = torch.randn(3, 5, generator=g, dtype=torch.float64, requires_grad=True)
    overlap_penalty(prev, up @ down).backward()
    delta = (up @ down).detach()
    # d/d(delta) = 2 prev^2 delta, chained through the factors
    grad_delta = 2 * prev.pow(2) * delta
    assert torch.allclose(up.grad, grad_delta @ down.detach().t())
    assert torch.allclose(down.grad, up.detach().t() @ grad_delta)
    assert torch.equal(down.grad[:, :2], torch.zeros(3, 2, dtype=torch.float64))  # free entries are not pushed


@pytest.mark.slow
@pytest.mark.shared
def test_c_lora_merges_each_task_and_keeps_the_sum_of_its_updates(tmp_path, monkeypatch):
    from loracl.runs.runner import Runner

    start, penalties = {}, []
    setup, loss = CLoRA.setup, CLoRA.loss

    def recording_setup(self):
        setup(self)
        start.update({s.name: s.weight().detach().clone() for s in self.model.adapter.sites})

    def recording_loss(self, net, batch, task):
        if task.index == 1:
            with torch.no_grad():
                penalties.append(float(sum(overlap_penalty(p, s.branches["task1"].delta_weight())
                                           for p, s in zip(self.previous, self.model.adapter.sites))))
        return loss(self, net, batch, task)

    monkeypatch.setattr(CLoRA, "setup", recording_setup)
    monkeypatch.setattr(CLoRA, "loss", recording_loss)
    cfg = load_config(preset="cifar100-mini", method="c-lora", sets=smoke_sets(**{"eval.max_per_task": None}) + TINY)
    runner = Runner(cfg, tmp_path / "c-lora", progress=False, log=lambda *a, **k: None)
    r = runner.run()
    assert r["status"] == "complete" and r["acc_matrix"][1][0] is not None
    m = runner.method
    sites = m.model.adapter.sites
    assert {s.kind for s in sites} == {"q", "k", "v", "out"} and all(len(s.branches) == 0 for s in sites)  # merged
    assert len(m.previous) == len(sites)
    for p, s in zip(m.previous, sites):
        added = s.weight().detach() - start[s.name]
        assert added.abs().max() > 0  # both tasks trained
        assert torch.allclose(p, added, atol=1e-6)
    assert penalties[0] == 0.0 and penalties[-1] > 0  # the new branch starts at zero, then overlaps the old sum
