"""InfLoRA end to end on real images and the pretrained fixture ViT (tiny subsets of CIFAR-100, 2 tasks):
the interference-free property on the real adapted layers, merged == sum of branches, resume."""

import shutil

import pytest
import torch

from conftest import smoke_sets
from loracl.runs.statefile import load
from loracl.runs.assembly import load_config
from loracl.cl.subspace import DualGPM
from loracl.runs.runner import Runner

pytestmark = [pytest.mark.slow, pytest.mark.shared]

TINY = ["benchmark.num_tasks=2", "train.max_steps_per_epoch=4", "data.batch_size=16",
        "benchmark.datasets=[{name: cifar100, root: '{data_root}/cifar100', classes: "
        f"{list(range(20))}, max_per_class: {{train: 12, test: 5}}}}]"]


def _run(out, *extra):
    sets = smoke_sets(**{"eval.max_per_task": None}) + TINY + list(extra)
    cfg = load_config(preset="cifar100-mini", method="inflora", out=str(out), sets=sets)
    runner = Runner(cfg, out, progress=False, log=lambda *a, **k: None)
    runner.run()
    return runner


@pytest.fixture(scope="module")
def merged_run(tmp_path_factory):
    torch.set_num_threads(1)
    return _run(tmp_path_factory.mktemp("inflora") / "merged")


def _qkv(state, block):
    return state["model"][f"backbone.model.blocks.{block}.attn.qkv.weight"].double()


def test_later_task_leaves_old_memory_subspace_unchanged(merged_run):
    """After task 1, W x == W' x for every x in the memory built after task 0, for k and v of every block;
    q (not adapted) is untouched; and the update is not zero."""
    ck = merged_run.out / "checkpoints"
    s0, s1 = load(ck / "task_00.pt"), load(ck / "task_01.pt")
    mem = DualGPM(0.95, 2)
    mem.load_state_dict(s0["method"]["memory"])
    d = 128
    assert set(mem.basis) == {f"image.{b}.k+v" for b in range(6)}
    for b in range(6):
        M = mem.old_space(f"image.{b}.k+v").double()
        assert 0 < M.shape[1] < d
        dW = _qkv(s1, b) - _qkv(s0, b)
        assert dW[:d].abs().max() == 0  # q
        for rows in (slice(d, 2 * d), slice(2 * d, 3 * d)):  # k, v
            assert dW[rows].abs().max() > 1e-6
            assert (dW[rows] @ M).abs().max() < 1e-4 * dW[rows].abs().max()


def test_merged_equals_sum_of_branches(merged_run, tmp_path):
    """The official way (every task's branch kept and summed in each forward) computes the same model."""
    torch.set_num_threads(1)
    kept = _run(tmp_path / "kept", "method.merge=false")
    assert kept.model.adapter.live_branches() == 2 * len(kept.model.adapter.sites)
    assert merged_run.model.adapter.live_branches() == 0
    x = torch.rand(6, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    x = merged_run.data.test_tf.finish((x * 255).to(torch.uint8))
    with torch.no_grad():
        a, b = merged_run.model.features(x), kept.model.features(x)
    torch.testing.assert_close(a, b, atol=1e-3, rtol=1e-3)
    assert merged_run.results["acc_matrix"] == kept.results["acc_matrix"]
    for k in merged_run.method.memory.basis:
        assert merged_run.method.memory.kind[k] == kept.method.memory.kind[k]
        assert merged_run.method.memory.basis[k].shape == kept.method.memory.basis[k].shape


def test_resume_after_first_task_gives_the_same_run(merged_run, tmp_path):
    """The memory travels in the task checkpoint: resuming after task 0 ends where the uninterrupted run did."""
    torch.set_num_threads(1)
    out = tmp_path / "resumed"
    (out / "checkpoints").mkdir(parents=True)
    shutil.copy(merged_run.out / "checkpoints" / "task_00.pt", out / "checkpoints" / "task_00.pt")
    sets = smoke_sets(**{"eval.max_per_task": None}) + TINY
    cfg = load_config(preset="cifar100-mini", method="inflora", out=str(out), sets=sets)
    r = Runner(cfg, out, resume=True, progress=False, log=lambda *a, **k: None)
    r.run()
    assert r.results["acc_matrix"] == merged_run.results["acc_matrix"]
    for k, B in merged_run.method.memory.basis.items():
        torch.testing.assert_close(r.method.memory.basis[k] @ r.method.memory.basis[k].t(), B @ B.t(),
                                   atol=1e-5, rtol=0)
    w = {n: p for n, p in r.model.named_parameters()}
    for n, p in merged_run.model.named_parameters():
        torch.testing.assert_close(w[n], p, atol=1e-6, rtol=0)


@pytest.mark.parametrize("head,encoders", [("linear", "[image]"), ("text", "null")])
def test_runs_on_open_clip(tmp_path, head, encoders):
    """The same method on a (tiny, random) open_clip CLIP: image encoder only with linear heads, and both
    encoders with the text head (text layers' statistics come from the task's prompts)."""
    torch.set_num_threads(1)
    r = _run(tmp_path / head, "backbone={kind: open_clip, name: loracl-tiny-clip, pretrained: false}",
             f"head.kind={head}", f"method.encoders={encoders}")
    dims = r.method.memory.dims()
    expect = {f"image.{b}.k+v" for b in range(2)} | ({f"text.{b}.k+v" for b in range(2)} if head == "text" else set())
    assert set(dims) == expect and all(n > 0 for n, _ in dims.values())
    assert r.results["status"] == "complete"
