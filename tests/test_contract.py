"""The method contract, checked for every registered method (named configurations included) on tiny real runs:

- a run killed right after a mid-task checkpoint and resumed ends with the uninterrupted run's results, FLOPs
  and final model, tensor for tensor;
- the method's state survives the checkpoint format unchanged;
- `param_groups` is a pure query (asking twice changes nothing, not even a requires_grad flag) and names what
  trains (nothing only for the methods that train nothing);
- evaluation never hands the method a label: predictions are the same when an evaluation batch's labels are
  shuffled;
- `loracl export` either writes a plain model or refuses in one line, as the method's capabilities say;
- `loracl predict` over the run's own test images gives its final accuracy, image for image.
"""

import contextlib

import numpy as np
import pytest
import torch

from conftest import TINY_CLIP, clip_datasets, interrupted_at_step_checkpoint, smoke_sets
from loracl.cli import main
from loracl.methods import list_methods, lookup
from loracl.runs.assembly import load_config
from loracl.runs.export import predict
from loracl.runs.runner import Runner
from loracl.runs.statefile import atomic_save, load

pytestmark = [pytest.mark.shared, pytest.mark.slow, pytest.mark.usefixtures("one_thread")]

METHODS = sorted(list_methods())
TRAINS_NOTHING = {"zeroshot", "ncm", "rail"}
TRAINS_FIRST_TASK_ONLY = {"ranpac"}  # its first-session adaptation
CLIP = TINY_CLIP + [clip_datasets(5, 3)]
VIT = ["benchmark.num_tasks=2", "benchmark.datasets=[{name: cifar100, root: '{data_root}/cifar100', "
       "classes: [0, 1, 2, 3, 4, 5, 6, 7], max_per_class: {train: 5, test: 3}}]"]


def _cfg(method: str):
    sets = smoke_sets(**{"data.batch_size": 4, "train.checkpoint_every": 1, "eval.max_per_task": None})
    clip = "timm" not in lookup(method).cls.caps.backbones or method == "zeroshot"
    fields = lookup(method).cls.Config.model_fields
    sets += ["method.rank=2"] if "rank" in fields else []
    sets += ["method.M=32"] if "M" in fields else []  # random features of the ridge heads
    return load_config(preset="mini-mtil" if clip else "cifar100-mini", method=method,
                       sets=sets + (CLIP if clip else VIT))


def _runner(method, out, **kw):
    return Runner(_cfg(method), out, progress=False, log=lambda *a, **k: None, **kw)


@contextlib.contextmanager
def _interrupted_after_first_task():
    from loracl.engine.checkpoints import CheckpointManager

    orig = CheckpointManager.save_task

    def save_then_stop(self, *a, **k):
        orig(self, *a, **k)
        raise KeyboardInterrupt

    CheckpointManager.save_task = save_then_stop
    try:
        yield
    finally:
        CheckpointManager.save_task = orig


def _equal(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.shape == b.shape and bool(torch.equal(a.cpu(), b.cpu()))
    if isinstance(a, np.ndarray):
        return np.array_equal(a, np.asarray(b))
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_equal(x, y) for x, y in zip(a, b))
    return a == b


def _predictions(runner, shuffle: bool) -> list[torch.Tensor]:
    """The method's predictions over the last row's evaluation, with the batches' labels shuffled or not."""
    seen, batches, logits = [], runner.data.eval_batches, runner.method.logits
    g = torch.Generator().manual_seed(0)

    def shuffled(images):
        for x, y in batches(images):
            yield x, (y[torch.randperm(len(y), generator=g)] if shuffle else y)

    def spy(x, ids, **kw):
        out = logits(x, ids, **kw)
        seen.append(out.argmax(-1))
        return out

    runner.data.eval_batches = shuffled
    try:
        runner.evaluator.evaluate_row(len(runner.scenario) - 1, spy)
    finally:
        runner.data.eval_batches = batches
    return seen


@pytest.mark.parametrize("method", METHODS)
def test_method_contract(method, tmp_path, capsys):
    whole = _runner(method, tmp_path / "whole")
    res = whole.run()
    assert res["status"] == "complete"
    if method in TRAINS_NOTHING:  # no steps: killed after the first task instead
        with _interrupted_after_first_task(), pytest.raises(KeyboardInterrupt):
            _runner(method, tmp_path / "cut").run()
    else:
        # step 2 of the joint task or of the only task that trains, else of the second task
        steps_before_kill = 2 if whole.caps.joint or method in TRAINS_FIRST_TASK_ONLY else 5
        with interrupted_at_step_checkpoint(steps_before_kill), pytest.raises(KeyboardInterrupt):
            _runner(method, tmp_path / "cut").run()
        assert (tmp_path / "cut" / "checkpoints" / "step.pt").exists()
    resumed = _runner(method, tmp_path / "cut", resume=True)
    again = resumed.run()
    for key in ("acc_matrix", "acc_before", "metrics", "method_extras"):
        assert again.get(key) == res.get(key), key
    for key in ("train_flops_per_task", "trainable_params_per_task"):
        assert again["cost"][key] == res["cost"][key], key
    last = f"task_{len(whole.scenario) - 1:02d}.pt"
    assert _equal(load(tmp_path / "whole" / "checkpoints" / last), load(tmp_path / "cut" / "checkpoints" / last)
                  | {"results": load(tmp_path / "whole" / "checkpoints" / last)["results"]})

    # the method's state through the checkpoint format and back
    state = whole.method.state_dict()
    atomic_save({"method": state}, tmp_path / "state.pt")
    whole.method.load_state_dict(load(tmp_path / "state.pt")["method"])
    assert _equal(whole.method.state_dict(), state)

    # param_groups: a pure query of what trains, after a fresh run's first begin_task
    fresh = _runner(method, tmp_path / "fresh")
    fresh.prepare()
    task = fresh.scenario.tasks[0]
    fresh.trainer.current_task = task
    fresh.method.begin_task(task)
    flags = [p.requires_grad for p in fresh.model.parameters()]
    first = fresh.method.param_groups(task)
    second = fresh.method.param_groups(task)
    assert [p.requires_grad for p in fresh.model.parameters()] == flags
    assert {k: [id(p) for p in v] for k, v in first.items()} == {k: [id(p) for p in v] for k, v in second.items()}
    assert any(p.requires_grad for ps in first.values() for p in ps) == (method not in TRAINS_NOTHING)

    # evaluation is label-free
    plain, shuffled = _predictions(resumed, False), _predictions(resumed, True)
    assert len(plain) > 0 and all(torch.equal(a, b) for a, b in zip(plain, shuffled))

    # export, or a one-line refusal that follows the declared capabilities
    rc = main(["export", str(tmp_path / "whole")])
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    exportable = whole.caps.export and not any(not getattr(m, "folds_into_branches", False)
                                               for m in whole.model.owned.values())
    if exportable:
        assert rc == 0 and (tmp_path / "whole" / "export" / "model.json").is_file(), err
    else:
        assert rc == 2 and len(err) == 1 and err[0].startswith("error:") and "predict works" in err[0]

    # predict reads images as evaluation does: the run's final accuracy, image for image (class-incremental:
    # one label space over every class, as predict's), classes named as the data names them (the folders)
    if whole.scenario.kind == "class-incremental":
        names = {i: n for t in res["tasks"] for i, n in zip(t["class_ids"], t.get("class_keys", t["class_names"]))}
        correct = total = 0
        for t in whole.scenario.tasks:
            images = whole.data.eval_subset(t.test)
            paths = [images.describe(i) for i in range(len(images))]
            rows = predict(tmp_path / "whole", paths, top_k=1, batch_size=whole.cfg.data.eval_batch_size)
            correct += sum(r["top"][0]["class"] == names[int(y)] for r, y in zip(rows, images.targets))
            total += len(rows)
        assert 100.0 * correct / total == pytest.approx(res["metrics"]["final_acc"], abs=1e-3)
