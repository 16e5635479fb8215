"""LAE: the EMA and the ensemble on plain tensors; a tiny run on real images where the adapters stay put during
the calibration epoch, the offline copy is the step-by-step EMA of the online adapters, and the predictions are
the max of the two softmaxes."""

import pytest
import torch

from conftest import smoke_sets
from loracl.cl.ema import ema_update_, lent
from loracl.methods.lae import LAE, ensemble
from loracl.runs.assembly import load_config

TINY = ["benchmark.num_tasks=2", "benchmark.datasets=[{name: cifar100, root: '{data_root}/cifar100', classes: "
        f"{list(range(20))}, max_per_class: {{train: 20, test: 5}}}}]", "train.epochs=2",
        "method.num_freeze_epochs=1", "method.ema_decay=0.5"]


def test_ema_update_equals_hand_computation():
    avg = [torch.tensor([1.0, 2.0]), torch.tensor([[4.0]])]
    ema_update_(avg, [torch.tensor([3.0, -2.0]), torch.tensor([[0.0]])], decay=0.9)
    # 0.9 * 1 + 0.1 * 3, 0.9 * 2 + 0.1 * (-2), 0.9 * 4 + 0.1 * 0
    assert torch.allclose(avg[0], torch.tensor([1.2, 1.6])) and torch.allclose(avg[1], torch.tensor([[3.6]]))


def test_ensemble_is_the_elementwise_max_of_the_softmaxes():
    a = torch.tensor([[0.0, torch.log(torch.tensor(3.0))]])  # softmax [0.25, 0.75]
    b = torch.tensor([[torch.log(torch.tensor(4.0)), 0.0]])  # softmax [0.8, 0.2]
    assert torch.allclose(ensemble(a, b), torch.tensor([[0.8, 0.75]]))
    assert torch.equal(ensemble(a, b), ensemble(b, a))


def test_lent_values_are_used_inside_and_the_own_ones_come_back():
    p = torch.nn.Parameter(torch.ones(3))
    with lent([p], [torch.full((3,), 2.0)]):
        assert torch.equal(p.detach(), torch.full((3,), 2.0))
    assert torch.equal(p.detach(), torch.ones(3))


@pytest.mark.slow
@pytest.mark.shared
def test_lae_calibrates_with_frozen_adapters_and_keeps_their_ema(tmp_path, monkeypatch):
    from loracl.runs.runner import Runner

    snaps, head = {}, {}
    begin_task, begin_epoch, loss, end_task = LAE.begin_task, LAE.begin_epoch, LAE.loss, LAE.end_task

    def copy(m):
        return [p.detach().clone() for p in m.adapters()]

    def rec_begin_task(self, task):
        begin_task(self, task)
        if task.index == 1:
            snaps["start"], snaps["steps"] = copy(self), []
            head["start"] = self.model.head.weight.detach().clone() if hasattr(self.model.head, "weight") else None

    def rec_begin_epoch(self, task, epoch):
        begin_epoch(self, task, epoch)
        if task.index == 1:
            snaps[f"epoch{epoch}"] = copy(self)
            snaps[f"grad{epoch}"] = [p.requires_grad for p in self.adapters()]

    def rec_loss(self, net, batch, task):
        if task.index == 1:
            snaps["steps"].append(copy(self))  # the online adapters after the previous step
        return loss(self, net, batch, task)

    def rec_end_task(self, task):
        if task.index == 1:
            snaps["steps"].append(copy(self))
        end_task(self, task)

    for name, fn in (("begin_task", rec_begin_task), ("begin_epoch", rec_begin_epoch), ("loss", rec_loss),
                     ("end_task", rec_end_task)):
        monkeypatch.setattr(LAE, name, fn)
    cfg = load_config(preset="cifar100-mini", method="lae", sets=smoke_sets(**{"eval.max_per_task": None}) + TINY)
    runner = Runner(cfg, tmp_path / "lae", progress=False, log=lambda *a, **k: None)
    r = runner.run()
    assert r["status"] == "complete" and r["acc_matrix"][1][0] is not None
    m = runner.method
    sites = m.model.adapter.sites
    assert {(s.block, s.kind) for s in sites} == {(b, k) for b in range(5) for k in ("k", "v")}
    assert all(list(s.branches) == ["lae"] and s.branches["lae"].rank == 5 for s in sites)

    # calibration (epoch 0 of task 1): the adapters get no update, then they learn
    assert snaps["grad0"] == [False] * len(snaps["start"]) and all(snaps["grad1"])
    assert all(torch.equal(a, b) for a, b in zip(snaps["start"], snaps["epoch1"]))
    assert any(not torch.equal(a, b) for a, b in zip(snaps["epoch1"], snaps["steps"][-1]))

    # the offline copy: the EMA (decay 0.5) of the online adapters after every step of task 1, from their start
    steps = snaps["steps"][1:]  # after step 1, 2, ..., the last
    assert len(steps) == 6  # 2 epochs x 3 steps, calibration steps included
    expected = [t.clone() for t in snaps["start"]]
    for online in steps:
        expected = [0.5 * e + 0.5 * o for e, o in zip(expected, online)]
    assert all(torch.allclose(e, o, atol=1e-6) for e, o in zip(expected, m.offline))

    # prediction: the element-wise max of the online and the offline softmax
    x = next(iter(runner.data.eval_batches(runner.scenario.tasks[0].test)))[0]
    ids = runner.data.classes.tensor(list(range(20)))
    with torch.no_grad():
        online = m.model(x, ids).float().softmax(-1)
        with lent(m.adapters(), m.offline):
            offline = m.model(x, ids).float().softmax(-1)
        got = m.logits(x, ids).exp()
    assert not torch.allclose(online, offline)
    assert torch.allclose(got, torch.maximum(online, offline), atol=1e-6)


@pytest.mark.slow
@pytest.mark.shared
@pytest.mark.parametrize("kill_at", [8, 10])  # task 1: in its calibration epoch / in the epoch after it
def test_lae_resumed_across_the_calibration_switch_is_exact(tmp_path, kill_at):
    from conftest import interrupted_at_step_checkpoint
    from loracl.runs.runner import Runner

    cfg = load_config(preset="cifar100-mini", method="lae", sets=smoke_sets(
        **{"eval.max_per_task": None, "train.checkpoint_every": 1}) + TINY)

    def runner(out, **kw):
        return Runner(cfg.model_copy(deep=True), tmp_path / out, progress=False, log=lambda *a, **k: None, **kw)

    whole = runner("whole").run()
    with interrupted_at_step_checkpoint(kill_at), pytest.raises(KeyboardInterrupt):
        runner("cut").run()
    again = runner("cut", resume=True).run()
    assert again["acc_matrix"] == whole["acc_matrix"]
    assert again["cost"]["train_flops_per_task"] == whole["cost"]["train_flops_per_task"]
    f = whole["cost"]["train_flops_per_task"]
    assert f[1] < f[0]  # the calibration epoch has no backward through the adapters
