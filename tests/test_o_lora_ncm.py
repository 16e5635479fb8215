"""O-LoRA's penalty on plain tensors; O-LoRA and NCM end to end on real images with the fixture backbone."""

import json

import pytest
import torch

from conftest import smoke_sets
from loracl.runs.assembly import load_config
from loracl.cl.subspace import cross_gram_l1

# 2 tasks of 10 CIFAR-100 classes, 20 training and 5 test images per class
TINY = ["benchmark.num_tasks=2", "benchmark.datasets=[{name: cifar100, root: '{data_root}/cifar100', classes: "
        f"{list(range(20))}, max_per_class: {{train: 20, test: 5}}}}]"]


def tiny_runner(tmp_path, method, *extra):
    from loracl.runs.runner import Runner

    cfg = load_config(preset="cifar100-mini", method=method, sets=smoke_sets(**{"eval.max_per_task": None}) + TINY
                      + list(extra))
    return Runner(cfg, tmp_path / method, progress=False, log=lambda *a, **k: None)


def test_cross_gram_penalty_equals_hand_computation():
    old = torch.tensor([[1.0, 2.0, 0.0], [0.0, 1.0, -1.0]])
    new = torch.tensor([[1.0, -1.0, 2.0], [0.5, 0.0, 0.0]])
    # old new^T = [[1 - 2 + 0, 0.5], [0 - 1 - 2, 0]] = [[-1, 0.5], [-3, 0]]
    assert float(cross_gram_l1(old, new)) == pytest.approx(1 + 0.5 + 3 + 0)
    assert float(cross_gram_l1(old, torch.tensor([[2.0, -1.0, -1.0]]))) == 0.0  # orthogonal to both rows


def test_penalty_gradient_step_pushes_new_rows_towards_orthogonality():
    g = torch.Generator().manual_seed(0)
    old = torch.randn(8, 32, generator=g, dtype=torch.float64)
    new = torch.randn(4, 32, generator=g, dtype=torch.float64).requires_grad_(True)
    start = new.detach().clone()
    values = [float(cross_gram_l1(old, new.detach()))]
    opt = torch.optim.SGD([new], lr=1e-3)
    for _ in range(5):
        opt.zero_grad()
        cross_gram_l1(old, new).backward()
        opt.step()
        values.append(float(cross_gram_l1(old, new.detach())))
    assert all(b < a for a, b in zip(values, values[1:])), values  # every step lowers it
    # the gradient sign(old new^T)^T old lies in the old rows' span: only the new rows' part inside it moves
    Q, _ = torch.linalg.qr(old.t())
    outside = lambda x: x - (x @ Q) @ Q.t()  # noqa: E731
    assert torch.allclose(outside(new.detach()), outside(start), atol=1e-12)
    assert (new.detach() @ Q).norm() < (start @ Q).norm()


@pytest.mark.slow
@pytest.mark.shared
def test_o_lora_keeps_frozen_branches_and_penalises_the_new_one(tmp_path):
    runner = tiny_runner(tmp_path, "o-lora")
    r = runner.run()
    assert r["status"] == "complete" and r["acc_matrix"][1][0] is not None
    m = runner.method
    sites = m.model.adapter.sites
    assert {s.kind for s in sites} == {"q", "v"} and all(list(s.branches) == ["task0", "task1"] for s in sites)
    assert all(not p.requires_grad for s in sites for br in s.branches.values() for p in (br.down, br.up))
    assert all(br.scale == 4.0 for s in sites for br in s.branches.values())  # alpha 32 / rank 8
    assert all(s.branches["task0"].up.abs().sum() > 0 for s in sites)  # task 0's branch trained and still live
    hand = sum(float((s.branches["task0"].down @ s.branches["task1"].down.t()).abs().sum()) for s in sites)
    assert float(m.penalty()) == pytest.approx(0.5 * hand, rel=1e-5)


@pytest.mark.slow
@pytest.mark.shared
def test_ncm_runs_without_training_and_scores_prototypes(tmp_path):
    runner = tiny_runner(tmp_path, "ncm")
    before = {k: v.clone() for k, v in runner.model.state_dict().items()}
    r = runner.run()
    assert r["status"] == "complete"
    assert r["cost"]["trainable_params_per_task"][:2] == [0, 0]
    a = r["acc_matrix"]
    assert a[0][0] > 30 and a[1][0] is not None and a[1][1] > 30  # 10-way, then 20-way NCM (chance 10, 5)
    after = runner.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before if "head" not in k)  # the backbone untouched
    m = runner.method
    assert m.ids.tolist() == list(range(20)) and m.counts.tolist() == [20.0] * 20
    json.dumps(m.state_dict()["ids"].tolist())
    # eval.ncm's score of the final backbone: here the backbone is the frozen one, so it is the run's final accuracy
    from loracl.engine.evaluator import ncm_accuracy

    tasks = runner.scenario.tasks
    acc = ncm_accuracy(m.run, m.model, [t.train for t in tasks], [t.test for t in tasks], list(range(20)))
    assert acc == pytest.approx(r["metrics"]["final_acc"], abs=1e-3)


@pytest.mark.slow
@pytest.mark.shared
def test_o_lora_resumes_mid_task_exactly(tmp_path):
    """Killed after a step checkpoint of task 1: the resumed run rebuilds the frozen and the live branch from the
    checkpoint, penalises the rebuilt ones and ends with the same results."""
    from loracl.methods import register
    from loracl.methods.o_lora import OLoRA

    @register
    class OLoRAKilled(OLoRA):
        name = "test-o-lora-killed"
        steps = 0

        def loss(self, net, batch, task):
            if task.index == 1:
                OLoRAKilled.steps += 1
                if OLoRAKilled.steps == 4:  # after the step checkpoint at step 2 of task 1
                    raise KeyboardInterrupt
            return super().loss(net, batch, task)

    sets = ["train.checkpoint_every=2", "train.epochs=2"]
    whole = tiny_runner(tmp_path, "o-lora", *sets).run()
    with pytest.raises(KeyboardInterrupt):
        tiny_runner(tmp_path, "test-o-lora-killed", *sets).run()
    assert (tmp_path / "test-o-lora-killed" / "checkpoints" / "step.pt").exists()
    from loracl.runs.runner import Runner

    cfg = load_config(preset="cifar100-mini", method="o-lora", sets=smoke_sets(**{"eval.max_per_task": None}) + TINY
                      + sets)
    resumed = Runner(cfg, tmp_path / "test-o-lora-killed", resume=True, progress=False, log=lambda *a, **k: None).run()
    assert resumed["acc_matrix"] == whole["acc_matrix"] and resumed["metrics"] == whole["metrics"]
