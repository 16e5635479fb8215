"""Episodic memories, experience replay, A-GEM and the full fine-tuning joint bound."""

import numpy as np
import pytest
import torch

from loracl.runs.statefile import load as load_checkpoint
from loracl.runs.assembly import load_config
from loracl.cl.memory import EpisodicMemory, balanced_quota
from loracl.methods.agem import agem_project
from test_task_arithmetic import needs_data, tiny_sets


def _quiet():
    return lambda *a, **k: None


def _runner(tmp_path, method, sets=()):
    from loracl.runs.runner import Runner

    cfg = load_config(preset="cifar10-mini-5", method=method, sets=tiny_sets() + list(sets))
    return Runner(cfg, tmp_path, progress=False, log=_quiet())


def test_balanced_quota_water_fills():
    assert balanced_quota({0: 50, 1: 50, 2: 50}, capacity=100) == {0: 34, 1: 33, 2: 33}
    assert balanced_quota({0: 5, 1: 50, 2: 50}, capacity=100) == {0: 5, 1: 48, 2: 47}
    assert balanced_quota({0: 5, 1: 3}, capacity=100) == {0: 5, 1: 3}
    assert balanced_quota({0: 5, 1: 30}, per_class=10) == {0: 5, 1: 10}


@needs_data
def test_memory_is_class_balanced_with_exactly_k_per_class():
    from loracl.data.scenarios import build_scenario

    cfg = load_config(preset="cifar10-mini-5")
    tasks = build_scenario(cfg.benchmark, 0).tasks
    mem = EpisodicMemory(tasks)
    for t in range(3):
        mem.add_class_balanced(tasks[t], seed=t, per_class=10)
        assert mem.per_class() == {c: 10 for c in range(2 * (t + 1))}
        assert len(set(mem.rows.tolist())) == len(mem)  # no image twice
    # the rows point at training images of the right class
    for r in mem.rows[:5]:
        assert mem.pool.targets[r] == tasks[int(np.searchsorted(mem.offsets, r, side="right") - 1)].train.targets[
            r - mem.offsets[np.searchsorted(mem.offsets, r, side="right") - 1]]
    # fixed capacity: an equal share per seen class, and shrinking keeps what was kept before
    cap = EpisodicMemory(tasks)
    cap.add_class_balanced(tasks[0], seed=0, capacity=200)
    assert cap.per_class() == {0: 100, 1: 100}
    before = set(cap.rows.tolist())
    cap.add_class_balanced(tasks[1], seed=1, capacity=200)
    cap.add_class_balanced(tasks[2], seed=2, capacity=200)
    assert cap.per_class() == {0: 34, 1: 34, 2: 33, 3: 33, 4: 33, 5: 33}
    assert {r for r in cap.rows.tolist() if r < len(tasks[0].train)} <= before
    # state holds rows only and restores the same memory
    again = EpisodicMemory(tasks)
    again.load_state_dict(cap.state_dict())
    assert np.array_equal(again.rows, cap.rows)
    assert all(isinstance(v, np.ndarray) and v.dtype == np.int64 for v in cap.state_dict()["candidates"].values())


def test_reservoir_keeps_a_uniform_sample():
    class T:  # a task with 1000 training rows
        def __init__(self):
            from loracl.data.datasets import ImageSet

            self.train = ImageSet([], np.zeros(1000), np.arange(1000), np.zeros(1000))
            self.index = 0

    g = torch.Generator().manual_seed(0)
    hits = np.zeros(1000)
    for _ in range(200):
        mem = EpisodicMemory([T()])
        for k in range(0, 1000, 50):
            mem.add_reservoir(np.arange(k, k + 50), capacity=100, generator=g)
        assert len(mem) == 100 and mem.stream_seen == 1000
        hits[mem.rows] += 1
    # every stream position is kept with probability 100/1000: early and late halves alike
    assert abs(hits[:500].mean() / 200 - 0.1) < 0.01 and abs(hits[500:].mean() / 200 - 0.1) < 0.01


def test_agem_projection():
    g = torch.Generator().manual_seed(0)
    for _ in range(100):
        grad, ref = torch.randn(50, generator=g), torch.randn(50, generator=g)
        out = agem_project(grad, ref)
        assert float(out @ ref) >= -1e-5  # never increases the memory loss to first order
        if float(grad @ ref) >= 0:
            assert torch.equal(out, grad)  # already agreeing: the plain gradient, bit for bit
        else:
            assert float(out @ ref) == pytest.approx(0.0, abs=1e-4)
            # the smallest change: only the component along ref was removed
            torch.testing.assert_close(out, grad - (grad @ ref) / (ref @ ref) * ref)
    v = torch.randn(50, generator=g)
    assert torch.equal(agem_project(v, v.clone()), v)
    assert torch.allclose(agem_project(v, -v), torch.zeros(50), atol=1e-6)


@pytest.mark.slow
@needs_data
@pytest.mark.parametrize("share,n_new,n_mem", [(0.5, 16, 16), (0.25, 12, 4), (0.2, 16, 4), (0.0, 16, 0)])
def test_er_batches_hold_the_configured_share_of_memory(tmp_path, share, n_new, n_mem):
    from loracl.engine import Batch

    run = _runner(tmp_path, "er", [f"method.replay_share={share}"])
    m = run.method
    m.setup()
    task = run.scenario.tasks[1]
    m.memory.add_class_balanced(run.scenario.tasks[0], seed=0, capacity=200)
    m.begin_task(task)
    x = torch.zeros(n_new, 3, 32, 32)
    y = torch.full((n_new,), task.class_ids[0])
    mixed, k = m.mixed_batch(Batch(x, y, torch.arange(n_new)))
    assert k == n_mem and len(mixed.y) == n_new + n_mem
    is_mem = mixed.rows == -1
    assert int(is_mem.sum()) == n_mem
    if n_mem:
        assert is_mem.float().mean().item() == pytest.approx(share)
        # memory samples are real, transformed images of earlier classes
        assert set(mixed.y[is_mem].tolist()) <= set(run.scenario.tasks[0].class_ids)
        assert mixed.x[is_mem].abs().sum() > 0
    # the loss covers every seen class
    assert m.seen.tolist() == run.scenario.seen_classes(1)


@pytest.mark.slow
@needs_data
def test_er_reservoir_run_resumes_mid_task_exactly(tmp_path):
    from loracl.runs.runner import Runner

    sets = tiny_sets(train=12, test=5) + ["method.policy=reservoir", "method.memory_size=8",
                                          "train.max_steps_per_epoch=null", "train.checkpoint_every=1",
                                          "data.batch_size=8", "method.finetune=lora"]
    cfg = load_config(preset="cifar10-mini-5", method="er", sets=sets)
    out = tmp_path / "er"
    res = Runner(cfg, out, progress=False, log=_quiet()).run()
    # memory of 8 over a stream of 48 samples; replay from the first steps on
    state = load_checkpoint(out / "checkpoints" / "task_01.pt")["method"]["memory"]
    assert len(state["rows"]) == 8 and state["stream_seen"] == 48
    # FLOPs counted at each step's real size: task 0's first step has an empty memory (8 samples), the
    # other 2 replay 8 (16 samples): 40 sample passes; task 1: 3 x 16 = 48
    flops = res["cost"]["flops_by_phase_per_task"]
    assert flops[1]["train"] / flops[0]["train"] == pytest.approx(48 / 40, rel=0.01)

    # stop in the middle of task 1 (keep task 0's checkpoint and a step checkpoint of task 1), then resume
    import shutil
    cut = tmp_path / "cut"
    shutil.copytree(out, cut)
    (cut / "checkpoints" / "task_01.pt").unlink()
    run = Runner(cfg, cut, resume=True, progress=False, log=_quiet())
    _stop_after_steps(run, task=1, steps=2)
    res2 = Runner(cfg, cut, resume=True, progress=False, log=_quiet()).run()
    assert res2["acc_matrix"] == res["acc_matrix"]
    state2 = load_checkpoint(cut / "checkpoints" / "task_01.pt")["method"]["memory"]
    assert np.array_equal(state2["rows"], state["rows"])


class _Stop(Exception):
    pass


def _stop_after_steps(run, task, steps):
    """Run until `steps` training steps of `task` are done (each checkpointed), then stop as a crash would."""
    orig = run.checkpoints.save_step

    def save_and_maybe_stop(t, opt, sched, scaler, epoch, batch, step, method):
        orig(t, opt, sched, scaler, epoch, batch, step, method)
        if t.index == task and step >= steps:
            raise _Stop

    run.checkpoints.save_step = save_and_maybe_stop
    with pytest.raises(_Stop):
        run.run()
    assert (run.out / "checkpoints" / "step.pt").exists()


@pytest.mark.slow
@needs_data
def test_agem_and_joint_full_runs(tmp_path):
    from loracl.runs.runner import Runner

    cfg = load_config(preset="cifar10-mini-5", method="agem",
                      sets=tiny_sets(train=12, test=5) + ["method.patterns_per_task=6", "method.sample_size=4",
                                                          "train.max_steps_per_epoch=null", "train.checkpoint_every=1"])
    res = Runner(cfg, tmp_path / "agem", progress=False, log=_quiet()).run()
    f = res["cost"]["flops_by_phase_per_task"]
    # 24 images per task in steps of 16 and 8; task 1 adds a reference gradient on 4 memory samples to each
    # step, whatever its size: (16 + 4) + (8 + 4) sample passes against task 0's 16 + 8
    assert f[1]["train"] / f[0]["train"] == pytest.approx(32 / 24, rel=0.01)
    state = load_checkpoint(tmp_path / "agem" / "checkpoints" / "task_01.pt")["method"]["memory"]
    assert len(state["rows"]) == 12
    assert res["acc_matrix"][1][0] is not None
    # stopped after the first step of task 1 and resumed: the projection acts on the rebuilt parameters
    import shutil
    cut = tmp_path / "agem-cut"
    shutil.copytree(tmp_path / "agem", cut)
    (cut / "checkpoints" / "task_01.pt").unlink()
    _stop_after_steps(Runner(cfg, cut, resume=True, progress=False, log=_quiet()), task=1, steps=1)
    res2 = Runner(cfg, cut, resume=True, progress=False, log=_quiet()).run()
    assert res2["acc_matrix"] == res["acc_matrix"]
    a = load_checkpoint(tmp_path / "agem" / "checkpoints" / "task_01.pt")["model"]
    b = load_checkpoint(cut / "checkpoints" / "task_01.pt")["model"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    cfg = load_config(preset="cifar10-mini-5", method="joint-full", sets=tiny_sets(train=12, test=5))
    res = Runner(cfg, tmp_path / "joint-full", progress=False, log=_quiet()).run()
    assert res["acc_matrix"][1][0] is not None and res["acc_matrix"][1][1] is not None
    assert res["cost"]["trainable_params_per_task"][1] > 1_000_000  # the whole backbone, not a LoRA


@pytest.mark.slow
@needs_data
@pytest.mark.parametrize("method", ["er", "agem"])
def test_memory_batches_through_the_tensor_pipeline_match_pil(tmp_path, method):
    """With the tensor pipeline, replay samples come from the decoded copies of every task's training set (no
    PIL decode per step): the same images and targets as the PIL path (test views: nothing random), in the
    rows' order, across tasks."""
    runs = {p: _runner(tmp_path / p, method, ["data.train_augment=none", f"data.pipeline={p}"])
            for p in ("pil", "tensor")}
    for run in runs.values():
        run.method.setup()
    rows = None
    got = {}
    for p, run in runs.items():
        mem = run.method.memory
        if rows is None:  # rows from both tasks, out of order
            rows = np.array([mem.offsets[1] + 5, mem.offsets[0] + 1, mem.offsets[1] + 7, mem.offsets[0] + 3])
        got[p] = run.services.memory_batch(mem, rows)
    assert torch.equal(got["tensor"].y, got["pil"].y)
    assert torch.allclose(got["tensor"].x, got["pil"].x, atol=1e-6)
    assert runs["tensor"].method.memory.gather(rows, runs["tensor"].data.decoded_rows) is not None
    assert runs["pil"].method.memory.gather(rows, runs["pil"].data.decoded_rows) is None
    # a process's share equals its slice of the whole batch
    part = runs["tensor"].services.memory_batch(runs["tensor"].method.memory, rows, keep=slice(1, 3))
    assert torch.equal(part.y, got["tensor"].y[1:3])


@pytest.mark.slow
@needs_data
def test_an_empty_share_of_the_memory_is_an_empty_batch(tmp_path):
    """Under torchrun a process can hold none of a small replay sample: an empty batch of the model's input
    shape, not a crash."""
    run = _runner(tmp_path, "er")
    run.method.setup()
    b = run.services.memory_batch(run.method.memory, np.array([3], dtype=np.int64), keep=slice(1, 1))
    assert b.x.shape == (0, 3, 32, 32) and b.y.shape == (0,)
