"""Datasets and scenarios on the real images in ../shared/data: layouts, splits, class orders, errors."""

import shutil

import numpy as np
import pytest

from conftest import DATA
from loracl.config import BenchmarkConfig, DatasetSpec, DataConfig
from loracl.data.datasets import load_dataset, stratified_split
from loracl.data.loader import TransformedSet, derive_seed, make_loader
from loracl.data.scenarios import build_scenario
from loracl.data.transforms import build_transforms
from loracl.errors import ConfigError, DataError

pytestmark = pytest.mark.shared


def _ci(**kw):
    d = {"name": "c", "scenario": "class-incremental", "num_tasks": 10,
         "datasets": [{"name": "cifar100", "root": str(DATA / "cifar100")}]}
    d.update(kw)
    return BenchmarkConfig.model_validate(d)


def test_class_incremental_fixed_order_label_order():
    sc = build_scenario(_ci(), seed=0)
    assert len(sc) == 10 and sc.tasks[0].class_names[:3] == ["apple", "aquarium fish", "baby"]  # MTIL (CLIP) names
    assert sc.tasks[3].class_ids == list(range(30, 40))
    for t in sc.tasks:
        assert set(np.unique(t.train.targets)) == set(t.class_ids)
        assert len(t.train) == 2000 and len(t.test) == 1000
        # no image in both train and test
        tr = {t.train.describe(i) for i in range(len(t.train))}
        te = {t.test.describe(i) for i in range(len(t.test))}
        assert not tr & te
    assert sc.eval_classes(2, 4) == list(range(50)) and sc.eval_classes(5, 4) is None


def test_seeded_and_custom_orders():
    a = build_scenario(_ci(class_order="seeded"), seed=1)
    b = build_scenario(_ci(class_order="seeded"), seed=1)
    c = build_scenario(_ci(class_order="seeded"), seed=2)
    assert a.class_names == b.class_names != c.class_names
    order = list(range(99, -1, -1))
    d = build_scenario(_ci(class_order=order, num_tasks=None, task_sizes=[50, 30, 20]), seed=0)
    assert [len(t.class_ids) for t in d.tasks] == [50, 30, 20]
    assert d.tasks[0].class_names[0] == "worm"  # last class in label order comes first
    with pytest.raises(ConfigError, match="do not split"):
        build_scenario(_ci(num_tasks=7), seed=0)


def test_domain_incremental_pacs_stratified_split():
    cfg = BenchmarkConfig.model_validate({
        "name": "p", "scenario": "domain-incremental",
        "datasets": [{"name": "pacs", "root": str(DATA / "pacs"), "domain": d, "holdout": 0.2, "holdout_seed": 0}
                     for d in ("photo", "sketch")]})
    sc = build_scenario(cfg, 0)
    assert [t.name for t in sc.tasks] == ["pacs-photo", "pacs-sketch"]
    assert sc.tasks[0].class_ids == sc.tasks[1].class_ids == list(range(7))
    t = sc.tasks[0]
    for c in range(7):
        n_tr, n_te = (t.train.targets == c).sum(), (t.test.targets == c).sum()
        assert abs(n_te / (n_tr + n_te) - 0.2) < 0.02
    again = build_scenario(cfg, 5)  # the split depends on holdout_seed only, not the run seed
    assert again.tasks[0].test.describe(0) == t.test.describe(0)
    assert sc.eval_classes(1, 0) == list(range(7))


def test_cross_dataset_label_spaces():
    cfg = BenchmarkConfig.model_validate({
        "name": "x", "scenario": "cross-dataset",
        "datasets": [{"name": "cifar10", "root": str(DATA / "cifar10")},
                     {"name": "mnist", "root": str(DATA / "mnist")},
                     {"name": "cifar100", "root": str(DATA / "cifar100"), "classes": [3, 1, 2]}]})
    sc = build_scenario(cfg, 0)
    assert sc.tasks[1].class_ids == list(range(10, 20)) and sc.tasks[1].class_names[0] == "0 - zero"  # torchvision (MTIL) names
    assert sc.tasks[2].class_names == ["bear", "aquarium fish", "baby"]
    assert set(np.unique(sc.tasks[2].test.targets)) == {20, 21, 22}
    assert sc.eval_classes(2, 0) == [20, 21, 22]


def test_stratified_split_is_seeded_and_disjoint():
    y = np.repeat(np.arange(4), 25)
    a = stratified_split(y, 0.2, 7)
    b = stratified_split(y, 0.2, 7)
    assert (a[0] == b[0]).all() and not set(a[0]) & set(a[1]) and len(a[1]) == 20


def test_missing_root_and_unknown_dataset(tmp_path):
    with pytest.raises(DataError, match=r"root .*nowhere does not exist"):
        load_dataset(DatasetSpec(name="cifar100", root=str(tmp_path / "nowhere")))
    with pytest.raises(DataError, match="unknown dataset 'cifar1000'"):
        load_dataset(DatasetSpec(name="cifar1000", root=str(tmp_path)))


def test_corrupt_image_names_the_file(tmp_path):
    root = tmp_path / "folder"
    for part in ("train", "test"):
        for c in ("a", "b"):
            (root / part / c).mkdir(parents=True)
            src = sorted((DATA / "cifar10" / part / ("airplane" if c == "a" else "bird")).iterdir())[:3]
            for f in src:
                shutil.copy(f, root / part / c / f.name)
    bad = root / "train" / "b" / "broken.jpg"
    bad.write_bytes(b"not a jpeg at all")
    ds = load_dataset(DatasetSpec(name="imagefolder", root=str(root)))
    rows = [i for i in range(len(ds.train)) if ds.train.describe(i).endswith("broken.jpg")]
    with pytest.raises(DataError, match="broken.jpg"):
        ds.train.image(rows[0])


def test_split_files_imagefolder(tmp_path):
    root = tmp_path / "imgs"
    lines = {"train": [], "test": []}
    for k, c in enumerate(("cat", "dog")):
        (root / c).mkdir(parents=True)
        for j, f in enumerate(sorted((DATA / "cifar10" / "train" / c).iterdir())[:4]):
            shutil.copy(f, root / c / f.name)
            lines["train" if j < 3 else "test"].append(f"{c}/{f.name} {1 - k}")
    for part in lines:
        (tmp_path / f"{part}.txt").write_text("\n".join(lines[part]))
    ds = load_dataset(DatasetSpec(name="imagefolder", root=str(root),
                                  split_files={p: str(tmp_path / f"{p}.txt") for p in ("train", "test")}))
    assert ds.class_names == ["dog", "cat"]  # labels from the list, not sorted names
    assert len(ds.train) == 6 and len(ds.test) == 2
    ds.train.image(0)


def test_augmentation_is_per_sample_deterministic():
    sc = build_scenario(_ci(num_tasks=10), 0)
    tr, _ = build_transforms(DataConfig(train_augment="crop_flip"),
                             {"size": 32, "mean": (0.5,) * 3, "std": (0.5,) * 3, "interpolation": "bicubic"})
    ds = TransformedSet(sc.tasks[0].train, tr)
    x1, _, _ = ds[(5, 123)]
    x2, _, _ = ds[(5, 123)]
    x3, _, _ = ds[(5, 124)]
    assert (x1 == x2).all() and x1.dtype.is_floating_point is False
    assert any((ds[(5, s)][0] != x1).any() for s in range(124, 140))
    # resuming at batch 3 yields exactly batches 3.. of the uninterrupted epoch
    full = list(make_loader(sc.tasks[0].train.subset(np.arange(50)), tr, 8, seed=derive_seed(1, 2), shuffle=True))
    rest = list(make_loader(sc.tasks[0].train.subset(np.arange(50)), tr, 8, seed=derive_seed(1, 2), shuffle=True,
                            start=3))
    assert len(rest) == len(full) - 3
    for (xa, ya, ra), (xb, yb, rb) in zip(full[3:], rest):
        assert (xa == xb).all() and (ra == rb).all()


@pytest.mark.parametrize("name", ["cifar100", "dtd"])  # datasets.py's torchvision loader and an MTIL one
def test_failed_download_is_one_clear_error(tmp_path, monkeypatch, name):
    """Offline, a torchvision download fails inside urllib: one DataError naming the dataset, the folder and
    what to do, not a network traceback."""
    import urllib.error
    import urllib.request

    def offline(*a, **k):
        raise urllib.error.URLError("Name or service not known")

    monkeypatch.setattr(urllib.request, "urlopen", offline)
    spec = DatasetSpec(name=name, root=str(tmp_path / name), download=True)
    with pytest.raises(DataError, match=rf"dataset '{name}': could not download.*{tmp_path}.*download: false"):
        load_dataset(spec)
