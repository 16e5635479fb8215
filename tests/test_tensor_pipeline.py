"""The decode-once tensor pipeline against the PIL reference, on real images."""

import numpy as np
import pytest
import torch

from conftest import DATA
from loracl.config import DataConfig, DatasetSpec
from loracl.data.datasets import load_dataset
from loracl.data.loader import TransformedSet
from loracl.data.tensor_pipeline import BatchAugment, DecodedImages, rrc_params, storage_size
from loracl.data.transforms import build_transforms, crop_fraction

pytestmark = pytest.mark.shared
DC = {"size": 32, "mean": (0.5, 0.5, 0.5), "std": (0.25, 0.25, 0.25), "interpolation": "bicubic", "crop_pct": 1.0}


def _decode(images, cfg, dc):
    pct = crop_fraction(cfg, dc)
    store = storage_size(images, dc["size"], pct)
    return DecodedImages(images, store, dc["interpolation"], pct >= 1.0, device=torch.device("cpu")), pct


@pytest.mark.parametrize("name,resize,size", [("cifar10", "resize", 32), ("pacs", "resize_crop", 32),
                                              ("pacs", "resize_crop", 56), ("pacs", "resize", 48)])
def test_test_views_match_pil(name, resize, size):
    spec = DatasetSpec(name=name, root=str(DATA / name), domain="photo" if name == "pacs" else None)
    images = load_dataset(spec).test.subset(np.arange(24))
    cfg = DataConfig(resize=resize, train_augment="none")
    dc = dict(DC, size=size)
    _, test = build_transforms(cfg, dc)
    dec, pct = _decode(images, cfg, dc)
    ref = test.finish(torch.stack([TransformedSet(images, test)[i][0] for i in range(len(images))]))
    got = BatchAugment("none", size, pct, test)(dec.rows(torch.arange(len(images))), None)
    assert got.shape == ref.shape
    diff = (got - ref).abs() * 0.25 * 255  # back to 0..255 pixel units
    if dec.store == size:  # nothing to resample: exact
        assert diff.max() == 0
    else:  # one resampling (bilinear on device vs bicubic in PIL): close in value
        assert diff.mean() < 6


def test_crop_flip_is_exact_pad_and_crop():
    images = load_dataset(DatasetSpec(name="cifar10", root=str(DATA / "cifar10"))).train.subset(np.arange(8))
    cfg = DataConfig(train_augment="crop_flip", normalize=False)
    train, _ = build_transforms(cfg, DC)
    dec, pct = _decode(images, cfg, DC)
    u8 = dec.rows(torch.arange(8))
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    aug = BatchAugment("crop_flip", 32, pct, train)
    x = aug(u8, g1)
    assert torch.equal(x, aug(u8, g2))  # seeded: deterministic
    off = torch.randint(0, 9, (8, 2), generator=torch.Generator().manual_seed(3))
    pad = torch.nn.functional.pad(u8.float(), (4, 4, 4, 4))
    for k in range(8):
        crop = pad[k, :, off[k, 0]:off[k, 0] + 32, off[k, 1]:off[k, 1] + 32] / 255
        assert torch.allclose(x[k], crop) or torch.allclose(x[k], crop.flip(-1))


def test_rrc_parameters_follow_torchvision():
    boxes = rrc_params(4000, 32, torch.Generator().manual_seed(0))
    w, h = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
    assert (boxes[:, :2] >= 0).all() and (boxes[:, 2:] <= 32).all() and (w >= 1).all() and (h >= 1).all()
    area = w * h / 1024
    assert 0.45 < area.mean() < 0.6  # E[scale] of U(0.08, 1) is 0.54 (rounding moves it a little)
    ratio = w / h
    assert ratio.min() > 0.6 and ratio.max() < 1.7
    full = rrc_params(5, 32, torch.Generator().manual_seed(0), scale=(1.0, 1.0), ratio=(1.0, 1.0))
    assert torch.equal(full, torch.tensor([[0.0, 0.0, 32.0, 32.0]] * 5))


def test_memory_mapped_cache_is_reused(tmp_path):
    images = load_dataset(DatasetSpec(name="cifar10", root=str(DATA / "cifar10"))).test.subset(np.arange(16))
    a = DecodedImages(images, 32, "bicubic", True, device=torch.device("cpu"), cache_dir=str(tmp_path))
    files = list(tmp_path.glob("*.u8"))
    assert len(files) == 1
    mtime = files[0].stat().st_mtime_ns
    b = DecodedImages(images, 32, "bicubic", True, device=torch.device("cpu"), cache_dir=str(tmp_path))
    assert files[0].stat().st_mtime_ns == mtime and torch.equal(a.data, b.data)


@pytest.mark.slow
def test_run_with_tensor_pipeline(tmp_path):
    """A whole run on the tensor pipeline; evaluation views are exact here (32 px sources, 32 px model), so the
    untrained model's accuracy equals the PIL pipeline's."""
    from conftest import smoke_sets
    from loracl.cli import main
    import json

    outs = {}
    for pipe in ("pil", "tensor"):
        sets = smoke_sets(**{"benchmark.num_tasks": 2, "data.pipeline": pipe, "eval.retention_per_class": 4})
        sets = [x for x in sets if not x.startswith("eval.retention=")] + [
            f"eval.retention={DATA}/tiny_imagenet32/val", f"eval.retention_classes={DATA}/tiny_imagenet32/classes.tsv"]
        args = ["run", "--preset", "cifar100-mini", "--method", "seq-lora", "--out", str(tmp_path / pipe)]
        for x in sets:
            args += ["--set", x]
        assert main(args) == 0
        outs[pipe] = json.loads((tmp_path / pipe / "results.json").read_text())
    assert outs["tensor"]["metrics"]["pretrained_retention_initial"] == outs["pil"]["metrics"]["pretrained_retention_initial"]
    assert outs["tensor"]["status"] == "complete"
