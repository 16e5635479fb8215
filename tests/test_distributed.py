"""Data-parallel training under torchrun (2 CPU processes, gloo) equals the single-process run."""

import json
import os
import subprocess
import sys

import pytest
import torch

from conftest import REPO, TINY_CLIP, clip_datasets, smoke_sets
from loracl.methods import lookup
from loracl.runs.statefile import load as load_checkpoint

pytestmark = [pytest.mark.slow, pytest.mark.shared]


def _run(out, nproc, sets, method="seq-lora", preset="cifar100-mini"):
    cmd = [sys.executable, "-m", "loracl", "run", "--preset", preset, "--method", method, "--out", str(out)]
    if nproc > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"] + cmd[1:]
    for s in sets:
        cmd += ["--set", s.replace("@OUT@", str(out))]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    p = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    # a failing process's own traceback comes first in stderr, the launcher's summary last
    assert p.returncode == 0, p.stderr[:4000] + "\n...\n" + p.stderr[-1500:]
    # a method that declares that every step uses every trained parameter: DDP does not search for unused ones
    # (it warns when told to and finds none)
    if lookup(method).cls.caps.all_params_every_step:
        assert "find_unused_parameters=True was specified" not in p.stderr
    return json.loads((out / "results.json").read_text())


# InfLoRA: its statistics passes cover the whole task (summed over processes before the SVD), so the
# task is cut to 16 training images per class to keep the test short
SMALL = 'benchmark.datasets=[{name: cifar100, root: "{data_root}/cifar100", max_per_class: {train: 16, test: 4}}]'
# Adam turns round-off in gradients that are zero in exact arithmetic (a key projection's bias: softmax
# ignores it) into whole steps, so methods that train such weights are compared under plain SGD
SGD = ["train.optimizer.name=sgd", "train.optimizer.lr=0.05"]
CLIP_DATA = clip_datasets(8, 10)
CASES = {
    "seq-lora": ("seq-lora", [], 6 + 4),  # six merged qkv weights, two head chunks
    "inflora": ("inflora", [SMALL], 6 + 4),
    # the cosine head outside the DDP-wrapped model, the batch-mean feature matrix's columns split by process
    "keeplora+": ("keeplora+", [SMALL] + SGD, None),
    # the KL term's features from the DDP forward; full fine-tuning on the memory
    "ta-lora-kl": ("ta-lora", [SMALL, "method.kl_weight=0.4"] + SGD, None),
    # the replay share of the global batch, the reservoir fed with every process's new samples
    "er-reservoir": ("er", [SMALL, "method.policy=reservoir"] + SGD, None),
    "agem": ("agem", [SMALL] + SGD, None),
    # the tensor pipeline: every process decodes whole sets (here: rank 0 writes the memory-mapped cache, the
    # others map it), augmentation parameters drawn for the global batch, replay samples from decoded copies
    "er-tensor": ("er", [SMALL, "data.pipeline=tensor", "data.cache_dir=@OUT@/decoded"] + SGD, None),
    # prompts owned by the model; L2P's official key loss sums over the whole batch, across the processes' shares
    "l2p": ("l2p", [SMALL], 2 + 4 + 1),  # keys and block 0's pool, two head chunks, the prompts' task index
    # DualPrompt's batch-summed key loss over the E-blocks; CODA-Prompt's frozen earlier components
    "dualprompt": ("dualprompt", [SMALL], None),
    "coda-prompt": ("coda-prompt", [SMALL], None),
    # SD-LoRA's magnitudes: one owned parameter shared by every layer, averaged by DDP like the branches. Under
    # Adam two processes drift from one (past the tolerance: 3% in one task-1 entry); under SGD they agree.
    # Full-batch gradients against the mean of two halves, 3 Adam steps in one process: the largest parameter
    # differences (1e-6) sit in `down` entries whose second-step gradient is 1e-9..1e-8, Adam's eps, with 1-2%
    # round-off between the two sums (`down` gets none while `up` is 0, then one through an `up` of size lr);
    # Adam's update there is about lr * g / eps and carries the round-off
    "sd-lora": ("sd-lora", [SMALL] + SGD, None),
    # CLIP (a random tiny one, two datasets of mini-mtil): ZSCL's text-side distillation is a softmax over the
    # batch's reference images, taken over the processes' features gathered with gradient
    "zscl": ("zscl", TINY_CLIP + [CLIP_DATA, "method.ref_batch=8"] + SGD, None),
    # MoE-Adapters: the gate noise drawn for the global batch, the balance loss's sums over it; the experts'
    # dropout masks are drawn per process (as any dropout under DDP), so the comparison runs without dropout
    "moe-adapters": ("moe-adapters", TINY_CLIP + [CLIP_DATA, "method.dropout=0", "method.experts=4",
                                                  "method.ref_steps=2", "method.ae_steps=2",
                                                  "method.reference={name: tiny_imagenet, root: "
                                                  "'{data_root}/tiny_imagenet32', max_per_class: {train: 1, test: 1}}",
                                                  "method.balance=1.0"] + SGD, None),
}
PRESET = {"zscl": "mini-mtil", "moe-adapters": "mini-mtil"}


@pytest.mark.parametrize("case", list(CASES))
def test_two_processes_match_one(tmp_path, case):
    method, extra, n_keys = CASES[case]
    sets = smoke_sets(**{"benchmark.num_tasks": 2, "train.max_steps_per_epoch": 3, "data.batch_size": 8,
                         "threads": 1}) + extra
    preset = PRESET.get(case, "cifar100-mini")
    one = _run(tmp_path / "one", 1, sets, method, preset)
    two = _run(tmp_path / "two", 2, sets, method, preset)
    a = load_checkpoint(tmp_path / "one" / "checkpoints" / "task_01.pt")["model"]
    b = load_checkpoint(tmp_path / "two" / "checkpoints" / "task_01.pt")["model"]
    assert set(a) == set(b)
    if n_keys is not None:
        assert len(a) == n_keys
    for k in a:
        torch.testing.assert_close(b[k], a[k], atol=2e-5, rtol=1e-4, msg=k)
    for ra, rb in zip(one["acc_matrix"], two["acc_matrix"]):
        for x, y in zip(ra, rb):
            assert (x is None and y is None) or abs(x - y) <= 100 / 40 + 1e-9  # at most one test image differs
    f1, f2 = one["cost"]["train_flops_per_task"], two["cost"]["train_flops_per_task"]
    if lookup(method).cls.caps.text_head:
        # every process encodes the class prompts whole in every step, and the meter counts the compute spent:
        # that pass once per process, the rest of the step once
        assert all(a < b < 1.5 * a for a, b in zip(f1, f2)), (f1, f2)
    else:
        assert f2 == pytest.approx(f1, rel=1e-6)
