"""The GPU path on a real GPU: bf16 autocast, the tensor pipeline on the device, torch.compile, and CUDA
against CPU on the same run. Skipped where CUDA is absent (CI has none); `scripts/device_check.sh` runs
them on a lent GPU machine. They read only the bundled demo data (`assets/`), which travels with the
repository, so they need no `../shared`.

`LORACL_TEST_DEVICE=cpu` runs the same code on the CPU (the comparisons are then CPU against CPU): it checks
the tests themselves where no GPU is at hand.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from loracl.runs.statefile import load as load_checkpoint
from loracl.runs.assembly import load_config
from loracl.runs.runner import Runner

DEVICE = os.environ.get("LORACL_TEST_DEVICE", "cuda")
pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(DEVICE == "cuda" and not torch.cuda.is_available(), reason="needs a CUDA GPU")]

TINY = ["benchmark.num_tasks=2", "train.epochs=1", "train.max_steps_per_epoch=4", "data.batch_size=32",
        "eval.max_per_task=100", "eval.retention=null", "train.optimizer.name=sgd", "train.optimizer.lr=0.05"]


def _run(tmp_path, name, method, sets):
    cfg = load_config(preset="demo", method=method, sets=TINY + sets)
    runner = Runner(cfg, tmp_path / name, progress=False, log=lambda *a, **k: None)
    res = runner.run()
    ckpt = load_checkpoint(tmp_path / name / "checkpoints" / "task_01.pt")["model"]
    return res, ckpt


def _close_runs(a, b, atol):
    (ra, wa), (rb, wb) = a, b
    assert set(wa) == set(wb) and wa
    for k in wa:
        torch.testing.assert_close(wb[k].float().cpu(), wa[k].float().cpu(), atol=atol, rtol=1e-3, msg=k)
    for row_a, row_b in zip(ra["acc_matrix"], rb["acc_matrix"]):
        for x, y in zip(row_a, row_b):
            assert (x is None and y is None) or abs(x - y) <= 2.0 + 1e-9  # two test images of 100


@pytest.mark.parametrize("method", ["inflora", "keeplora"])
def test_fp32_on_the_device_matches_the_cpu(tmp_path, method):
    """Same data path (PIL), fp32 on both: the device's kernels (SDPA, matmuls, the statistics passes) compute
    the run the CPU computes, to float tolerance (SGD: no Adam amplification of round-off)."""
    common = ["data.pipeline=pil", "train.amp=none"]
    cpu = _run(tmp_path, "cpu", method, common + ["device=cpu"])
    dev = _run(tmp_path, "dev", method, common + [f"device={DEVICE}"])
    _close_runs(cpu, dev, atol=2e-4)


def test_bf16_tensor_pipeline_run_on_the_device(tmp_path):
    """The GPU defaults (amp auto = bf16, pipeline auto = tensor, decoded data kept on the device): InfLoRA
    learns (finite, better than chance after a task), its statistics stay fp32, and its merged weights equal
    the sum of branches computed the official way."""
    res, w = _run(tmp_path, "bf16", "inflora", [f"device={DEVICE}", "train.optimizer.name=adam",
                                                "train.optimizer.lr=0.001", "train.max_steps_per_epoch=20"])
    assert res["status"] == "complete"
    a = res["acc_matrix"]
    assert a[0][0] > 15.0  # 10 classes per task: chance is 10%
    assert all(torch.isfinite(t.float()).all() for t in w.values())
    if DEVICE == "cuda":
        assert res["cost"]["peak_memory_kind"] == "cuda_max_allocated"
        assert res["machine"].get("gpu")


def test_tensor_pipeline_on_the_device_matches_the_cpu():
    """Random resized crops and flips drawn from the same seeded generator give the same images on the
    device as on the CPU (parameters are drawn on the host; roi_align may round one level apart)."""
    from loracl.config import DataConfig, DatasetSpec
    from loracl.data.datasets import load_dataset
    from loracl.data.tensor_pipeline import BatchAugment, DecodedImages
    from loracl.data.transforms import build_transforms

    root = os.path.join(os.path.dirname(__file__), "..", "assets", "cifar100-20")
    images = load_dataset(DatasetSpec(name="cifar100", root=root)).train.subset(np.arange(64))
    dc = {"size": 32, "mean": (0.5, 0.5, 0.5), "std": (0.25, 0.25, 0.25), "interpolation": "bicubic",
          "crop_pct": 1.0}
    train, _ = build_transforms(DataConfig(train_augment="rrc_flip"), dc)
    out = []
    for dev in ("cpu", DEVICE):
        dec = DecodedImages(images, 32, "bicubic", True, device=torch.device(dev), device_budget=1 << 30)
        assert dec.on_device
        aug = BatchAugment("rrc_flip", 32, 1.0, train)
        out.append(aug(dec.rows(torch.arange(64)), torch.Generator().manual_seed(7)).cpu())
    levels = (out[0] - out[1]).abs() * 0.25 * 255  # back to 0..255 pixel levels
    assert levels.max() <= 1.0 + 1e-3 and levels.mean() < 0.05


def test_compiled_training_matches_eager(tmp_path):
    """train.compile: the compiled forward trains what the eager one does (fp32, same data path)."""
    common = ["data.pipeline=pil", "train.amp=none", f"device={DEVICE}"]
    eager = _run(tmp_path, "eager", "seq-lora", common)
    compiled = _run(tmp_path, "compiled", "seq-lora", common + ["train.compile=true"])
    _close_runs(eager, compiled, atol=2e-4)
