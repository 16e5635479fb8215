"""No host-device synchronisation inside a training step or an evaluation batch (issue 6): loracl's code turns
no tensor into a host value per step. On the CPU every tensor is a host tensor, so the test counts the
conversions that would wait for a GPU (`.item()`, `bool(t)`, `.tolist()`, `.cpu()`, ...) called from loracl's
own code during `fit` and `accuracy`, over a run of 2 steps per epoch and evaluation batches of 16 and one of
5 steps and batches of 4: whatever grows with the steps or batches happens in every one of them."""

import collections
import pathlib
import sys

import pytest
import torch

import loracl
from conftest import smoke_sets
from loracl.runs.assembly import load_config
from loracl.runs.runner import Runner

pytestmark = [pytest.mark.slow, pytest.mark.shared, pytest.mark.usefixtures("one_thread")]

PKG = str(pathlib.Path(loracl.__file__).parent)
CONVERSIONS = ["item", "tolist", "__bool__", "__int__", "__float__", "__index__", "numpy", "nonzero", "cpu"]
# tensors drawn from a CPU generator for the replay memory: host tensors whatever the training device
HOST_SIDE = {("cl/memory.py", "sample"), ("cl/memory.py", "load")}

CASES = {
    "inflora": ("inflora", []),
    "keeplora+": ("keeplora+", []),  # the cosine head's known classes, decided on the device
    "seq-lora-tensor": ("seq-lora", ["data.pipeline=tensor"]),  # batches cropped and flipped by the pipeline
    "er": ("er", []),
    "agem": ("agem", []),
    "ta-lora-kl": ("ta-lora", ["method.kl_weight=0.4"]),
}


def _conversions(tmp_path, method, extra, steps, eval_batch) -> collections.Counter:
    sets = smoke_sets(**{"train.max_steps_per_epoch": steps, "data.eval_batch_size": eval_batch,
                         "eval.max_per_task": 16, "benchmark.num_tasks": None,
                         "benchmark.class_order": list(range(20)), "benchmark.task_sizes": [10, 10]})
    small = 'benchmark.datasets=[{name: cifar100, root: "{data_root}/cifar100", max_per_class: {train: 16, test: 4}}]'
    cfg = load_config(preset="cifar100-mini", method=method, sets=sets + [small] + extra)
    r = Runner(cfg, tmp_path / f"{steps}-{eval_batch}", progress=False, log=lambda *a, **k: None)
    hits = collections.Counter()
    originals = {name: getattr(torch.Tensor, name) for name in CONVERSIONS}

    def spy(name, original):
        def conversion(self, *a, **k):
            code = sys._getframe(1).f_code
            where = (code.co_filename[len(PKG) + 1:], code.co_name)
            if code.co_filename.startswith(PKG) and where not in HOST_SIDE:
                hits[(name,) + where] += 1
            return original(self, *a, **k)
        return conversion

    def spied(fn):
        def call(*a, **k):
            for name in CONVERSIONS:
                setattr(torch.Tensor, name, spy(name, originals[name]))
            try:
                return fn(*a, **k)
            finally:
                for name, original in originals.items():
                    setattr(torch.Tensor, name, original)
        return call

    r.trainer.fit, r.evaluator.accuracy = spied(r.trainer.fit), spied(r.evaluator.accuracy)
    assert r.run()["status"] == "complete"
    return hits


@pytest.mark.parametrize("case", list(CASES))
def test_training_steps_wait_for_nothing(tmp_path, case):
    method, extra = CASES[case]
    short, long = _conversions(tmp_path, method, extra, 2, 16), _conversions(tmp_path, method, extra, 5, 4)
    per_step = {k: (short[k], long[k]) for k in set(short) | set(long) if short[k] != long[k]}
    assert not per_step, f"host conversions that grow with the steps and batches (short run, long run): {per_step}"
    assert sum(long.values()) > 0  # the spy sees the once-per-epoch reads (the epoch's loss)
