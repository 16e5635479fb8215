"""MTIL datasets: class-name and template tables, the seeded 80/20 split, and the loaders on tiny on-disk copies
in torchvision's own layouts, built from real images of ../shared/data."""

import json
import shutil
from itertools import cycle
from pathlib import Path

import numpy as np
import pytest
import torch

from loracl.config import DatasetSpec
from loracl.runs.assembly import load_config
from loracl.data import mtil
from loracl.data.datasets import load_dataset, random_split

from conftest import DATA

pytestmark = pytest.mark.shared

TEMPLATE_COUNTS = {"aircraft": 2, "caltech101": 34, "cifar100": 18, "dtd": 8, "eurosat": 3, "flowers102": 1,
                   "food101": 1, "mnist": 1, "oxford_pets": 1, "stanford_cars": 9, "sun397": 2}
FIRST_TEMPLATE = {"aircraft": "a photo of a {c}, a type of aircraft.", "caltech101": "a photo of a {c}.",
                  "cifar100": "a photo of a {c}.", "dtd": "a photo of a {c} thing.",
                  "eurosat": "a centered satellite photo of {c}.", "flowers102": "a photo of a {c}, a type of flower.",
                  "food101": "a photo of a {c}, a type of food.", "mnist": 'a photo of the number: "{c}".',
                  "oxford_pets": "a photo of a {c}, a type of pet.",
                  "stanford_cars": "a photo of the {c}, a type of car.", "sun397": "a photo of the {c}."}


def _images():
    """Real 32x32 JPEGs to fill the fake layouts with."""
    return cycle(sorted((DATA / "cifar10" / "train").glob("*/*.jpg"))[:50])


def test_tables():
    assert set(mtil.MTIL_ORDER_I) == set(mtil.MTIL_ORDER_II) == set(TEMPLATE_COUNTS)
    assert len(mtil.MTIL_ORDER_I) == 11
    for k, n in TEMPLATE_COUNTS.items():
        assert len(mtil.TEMPLATES[k]) == n, k
        assert mtil.TEMPLATES[k][0] == FIRST_TEMPLATE[k]
        assert all("{c}" in t for t in mtil.TEMPLATES[k])
    for k, names in mtil.FIXED_CLASSES.items():
        assert len(names) == mtil.NUM_CLASSES[k] and len(set(names)) == len(names), k
    assert sum(mtil.NUM_CLASSES.values()) == 1201
    assert mtil.FIXED_CLASSES["caltech101"][:4] == ["off-center face", "centered face", "leopard", "motorbike"]
    assert mtil.FIXED_CLASSES["eurosat"][-1] == "lake or sea"
    assert [len(e) for e in mtil.EPOCHS.values()] == [11] * 4


@pytest.mark.parametrize("n", [8677, 27000, 108754, 101])
def test_random_split_is_torch_random_split(n):
    """Same rows as torch.utils.data.random_split(range(n), [int(0.8 n), rest], Generator().manual_seed(42))."""
    k = int(0.8 * n)
    a, b = torch.utils.data.random_split(range(n), [k, n - k], generator=torch.Generator().manual_seed(42))
    tr, te = random_split(n, 0.2, 42)
    assert list(tr) == list(a.indices) and list(te) == list(b.indices)
    assert len(tr) == k


@pytest.mark.parametrize("order", ["1", "2"])
def test_presets_follow_the_official_orders(order):
    cfg = load_config(preset=f"keeplora-mtil-{order}", sets=["data_root=/nonexistent"])
    names = [d.name for d in cfg.benchmark.datasets]
    key = "I" if order == "1" else "II"
    assert names == mtil.mtil_names(key)
    assert cfg.train.epochs == mtil.EPOCHS[("keeplora", key)]
    assert (cfg.backbone.name, cfg.backbone.pretrained, cfg.head.kind) == ("ViT-B-16", "openai", "text")
    assert (cfg.train.optimizer.name, cfg.train.optimizer.lr, cfg.train.optimizer.weight_decay) == ("adamw", 1e-3, 0.01)
    assert cfg.train.schedule.name == "onecycle" and cfg.data.batch_size == 64 and cfg.data.train_augment == "none"
    assert cfg.method.name == "keeplora" and cfg.method.rank == 16
    plus = load_config(preset=f"keeplora-mtil-{order}", method="keeplora+", sets=["data_root=/nonexistent"])
    assert plus.train.epochs == mtil.EPOCHS[("keeplora+", key)]


# ---- loaders on tiny copies in torchvision's layouts ---------------------------------------------------------

def _copy(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(src, dst)


def _check(ds, names, n_train, n_test, template):
    assert ds.class_names == names
    assert (len(ds.train), len(ds.test)) == (n_train, n_test)
    assert ds.templates[0] == template
    im = ds.train.image(0)
    assert im.mode == "RGB" and im.size == (32, 32)
    assert set(ds.train.targets.tolist()) | set(ds.test.targets.tolist()) <= set(range(len(names)))


def test_aircraft(tmp_path):
    img = _images()
    base = tmp_path / "fgvc-aircraft-2013b" / "data"
    variants = ["707-320", "A300B4", "Tu-154"]
    (base / "images").mkdir(parents=True)
    (base / "variants.txt").write_text("\n".join(variants) + "\n")
    for split, n in (("train", 4), ("test", 2)):
        lines = []
        for v in variants:
            for k in range(n):
                iid = f"{split}{v}{k}".replace("-", "")
                _copy(next(img), base / "images" / f"{iid}.jpg")
                lines.append(f"{iid} {v}")
        (base / f"images_variant_{split}.txt").write_text("\n".join(lines) + "\n")
    ds = load_dataset(DatasetSpec(name="aircraft", root=str(tmp_path)))
    _check(ds, variants, 12, 6, "a photo of a {c}, a type of aircraft.")
    assert ds.train.targets.tolist() == [0] * 4 + [1] * 4 + [2] * 4


def test_caltech101_random_80_20(tmp_path):
    img = _images()
    root = tmp_path / "caltech101" / "101_ObjectCategories"
    cats = sorted(["Faces", "Faces_easy", "Leopards", "Motorbikes"] + [f"cat{k:03d}" for k in range(97)])
    for c in cats + ["BACKGROUND_Google"]:
        for k in range(1, 3 if c == "Faces" else 2):
            _copy(next(img), root / c / f"image_{k:04d}.jpg")
    ds = load_dataset(DatasetSpec(name="caltech101", root=str(tmp_path)))
    n = 102
    _check(ds, mtil.CALTECH101_CLASSES, int(0.8 * n), n - int(0.8 * n), "a photo of a {c}.")
    tr, te = random_split(n, 0.2, 42)
    targets = np.concatenate([[0, 0], np.arange(1, 101)])  # Faces has two images
    assert ds.train.targets.tolist() == targets[tr].tolist() and ds.test.targets.tolist() == targets[te].tolist()
    assert ds.test.idx.tolist() == te.tolist()


def test_caltech101_incomplete_copy_is_one_error(tmp_path):
    from loracl.errors import DataError

    root = tmp_path / "caltech101" / "101_ObjectCategories"
    for c in ("BACKGROUND_Google", "Faces", "ant"):
        _copy(next(_images()), root / c / "image_0001.jpg")
    with pytest.raises(DataError, match="incomplete"):
        load_dataset(DatasetSpec(name="caltech101", root=str(tmp_path)))


def test_dtd(tmp_path):
    img = _images()
    base = tmp_path / "dtd" / "dtd"
    classes = ["banded", "blotchy", "zigzagged"]
    for split, n in (("train", 3), ("test", 2)):
        lines = []
        for c in classes:
            for k in range(n):
                name = f"{c}_{split}{k}.jpg"
                _copy(next(img), base / "images" / c / name)
                lines.append(f"{c}/{name}")
        (base / "labels").mkdir(parents=True, exist_ok=True)
        (base / "labels" / f"{split}1.txt").write_text("\n".join(lines) + "\n")
    ds = load_dataset(DatasetSpec(name="dtd", root=str(tmp_path)))
    _check(ds, classes, 9, 6, "a photo of a {c} thing.")


def test_eurosat(tmp_path):
    img = _images()
    folders = ["AnnualCrop", "Forest", "HerbaceousVegetation", "Highway", "Industrial", "Pasture", "PermanentCrop",
               "Residential", "River", "SeaLake"]
    for c in folders:
        for k in range(3):
            _copy(next(img), tmp_path / "eurosat" / "2750" / c / f"{c}_{k}.jpg")
    ds = load_dataset(DatasetSpec(name="eurosat", root=str(tmp_path)))
    _check(ds, mtil.EUROSAT_CLASSES, 24, 6, "a centered satellite photo of {c}.")
    tr, _ = random_split(30, 0.2, 42)
    assert ds.train.targets.tolist() == (np.arange(30) // 3)[tr].tolist()


def test_food101_underscores_become_spaces(tmp_path):
    img = _images()
    base = tmp_path / "food-101"
    classes = ["apple_pie", "baby_back_ribs", "waffles"]
    for split, n in (("train", 3), ("test", 1)):
        meta = {}
        for c in classes:
            meta[c] = [f"{c}/{split}{k}" for k in range(n)]
            for r in meta[c]:
                _copy(next(img), base / "images" / f"{r}.jpg")
        (base / "meta").mkdir(parents=True, exist_ok=True)
        (base / "meta" / f"{split}.json").write_text(json.dumps(meta))
    ds = load_dataset(DatasetSpec(name="food101", root=str(tmp_path)))
    _check(ds, ["apple pie", "baby back ribs", "waffles"], 9, 3, "a photo of a {c}, a type of food.")


def test_oxford_pets(tmp_path):
    img = _images()
    base = tmp_path / "oxford-iiit-pet"
    breeds = [("Abyssinian", 1, 1), ("american_bulldog", 2, 2), ("Bengal", 3, 1)]
    (base / "annotations").mkdir(parents=True)
    for split, n in (("trainval", 2), ("test", 1)):
        lines = []
        for b, label, species in breeds:
            for k in range(n):
                iid = f"{b}_{split}{k}"
                _copy(next(img), base / "images" / f"{iid}.jpg")
                lines.append(f"{iid} {label} {species} 1")
        (base / "annotations" / f"{split}.txt").write_text("\n".join(lines) + "\n")
    ds = load_dataset(DatasetSpec(name="oxford_pets", root=str(tmp_path)))
    _check(ds, ["Abyssinian", "American Bulldog", "Bengal"], 6, 3, "a photo of a {c}, a type of pet.")


def test_sun397_split_is_reproducible(tmp_path):
    img = _images()
    base = tmp_path / "SUN397"
    classes = ["/a/abbey", "/a/apartment_building/outdoor", "/b/bakery/shop"]
    base.mkdir()
    (base / "ClassName.txt").write_text("\n".join(classes) + "\n")
    for c in classes:
        for k in range(5):
            _copy(next(img), base / c[1:] / f"sun_{c.replace('/', '')}{k}.jpg")
    ds = load_dataset(DatasetSpec(name="sun397", root=str(tmp_path)))
    _check(ds, ["abbey", "apartment building/outdoor", "bakery/shop"], 12, 3, "a photo of the {c}.")
    files = [ds.train.describe(i) for i in range(len(ds.train))]
    again = load_dataset(DatasetSpec(name="sun397", root=str(tmp_path)))
    assert [again.train.describe(i) for i in range(len(again.train))] == files


def test_scipy_datasets_without_scipy_say_so(tmp_path):
    from loracl.errors import DataError

    try:
        import scipy  # noqa: F401
        pytest.skip("scipy is installed")
    except ImportError:
        pass
    for name in ("flowers102", "stanford_cars"):
        with pytest.raises(DataError, match="needs the package 'scipy'"):
            load_dataset(DatasetSpec(name=name, root=str(tmp_path)))


def test_missing_dataset_is_one_error(tmp_path):
    from loracl.errors import DataError

    with pytest.raises(DataError, match="download: true"):
        load_dataset(DatasetSpec(name="dtd", root=str(tmp_path)))


def test_shared_cifar100_and_mnist_get_mtil_prompts():
    c = load_dataset(DatasetSpec(name="cifar100", root=str(DATA / "cifar100"), max_per_class={"train": 1, "test": 1}))
    assert "aquarium fish" in c.class_names and c.templates == mtil.TEMPLATES["cifar100"]
    m = load_dataset(DatasetSpec(name="mnist", root=str(DATA / "mnist"), max_per_class={"train": 1, "test": 1}))
    assert m.class_names[:2] == ["0 - zero", "1 - one"] and m.templates[0] == 'a photo of the number: "{c}".'
