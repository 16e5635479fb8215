"""Shared fixtures: the real data and backbone from ../shared, and tiny models built from configs."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent
SHARED = Path(os.environ.get("LORACL_SHARED", REPO.parent / "shared"))
DATA = SHARED / "data"
WEIGHTS = SHARED / "weights" / "vit-s6-tin32" / "model.safetensors"
# presets name {data_root} / {weights_root}: give them the shared folders even where those are absent, so
# config tests run everywhere (tests that read the files are marked `shared` and skipped without them)
os.environ.setdefault("LORACL_DATA_ROOT", str(DATA))
os.environ.setdefault("LORACL_WEIGHTS_ROOT", str(SHARED / "weights"))

# two threads on two cores; one when the machine is already busy (OpenMP threads that spin on an
# oversubscribed CPU make every step many times slower)
torch.set_num_threads(1 if os.getloadavg()[0] > 1.5 else min(2, torch.get_num_threads()))


def pytest_collection_modifyitems(config, items):
    if not DATA.exists():
        skip = pytest.mark.skip(reason=f"needs the shared data at {DATA}")
        for item in items:
            if "shared" in item.keywords:
                item.add_marker(skip)


@pytest.fixture
def tiny_vit():
    """A small timm ViT with random weights (same family as the fixture backbone)."""
    import timm

    torch.manual_seed(0)
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, embed_dim=48,
                             depth=2, num_heads=3, num_classes=0).eval()


@pytest.fixture
def tiny_clip():
    """A tiny open_clip CLIP built from a config (random weights, no download)."""
    from loracl.config import BackboneConfig
    from loracl.models.backbones import create_backbone

    torch.manual_seed(0)
    return create_backbone(BackboneConfig(kind="open_clip", name="loracl-tiny-clip", pretrained=False)).eval()


# the tiny random CLIP (no weights file) with the text head: `--set`s a CLIP test adds its datasets to
TINY_CLIP = ["backbone.kind=open_clip", "backbone.name=loracl-tiny-clip", "backbone.pretrained=false",
             "backbone.file=null", "backbone.kwargs={}", "backbone.cfg_overlay={}", "head.kind=text"]


def clip_datasets(train: int, test: int) -> str:
    """The --set of the two small datasets the tiny-CLIP runs use: CIFAR-10 and MNIST classes 0-3, `train` and
    `test` images per class."""
    per = f"max_per_class: {{train: {train}, test: {test}}}"
    return (f"benchmark.datasets=[{{name: cifar10, root: '{{data_root}}/cifar10', classes: [0, 1, 2, 3], {per}}}, "
            f"{{name: mnist, root: '{{data_root}}/mnist', classes: [0, 1, 2, 3], {per}}}]")


def smoke_sets(**extra) -> list[str]:
    """--set overrides that make a preset run in seconds (tiny subsets, one short epoch)."""
    base = {"train.epochs": 1, "train.max_steps_per_epoch": 3, "eval.max_per_task": 40, "data.batch_size": 16,
            "eval.retention": None}
    base.update(extra)
    out = []
    for k, v in base.items():
        out.append(f"{k}={'null' if v is None else v}")
    return out


@contextlib.contextmanager
def interrupted_at_step_checkpoint(n: int):
    """Ctrl-C right after a run's n-th mid-task checkpoint is written (what a user's interrupt leaves behind)."""
    from loracl.engine.checkpoints import CheckpointManager

    orig, saves = CheckpointManager.save_step, {"n": 0}

    def save_then_stop(self, *a, **k):
        orig(self, *a, **k)
        saves["n"] += 1
        if saves["n"] == n:
            raise KeyboardInterrupt

    CheckpointManager.save_step = save_then_stop
    try:
        yield
    finally:
        CheckpointManager.save_step = orig


@pytest.fixture
def one_thread():
    """Tiny matrices: one thread avoids OpenMP spinning on a shared CPU (seconds instead of a minute)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
