"""InfLoRA's benchmark presets load and carry the official settings; the ImageNet-R and DomainNet loaders read
real images from tiny copies laid out as the full datasets are."""

import shutil
from pathlib import Path

import numpy as np
import pytest
import yaml

from conftest import DATA
from loracl.runs.assembly import load_config
from loracl.data.datasets import SPLIT_DIR, load_dataset

PRESETS = {"inflora-cifar100": (10, 20, 0.95), "inflora-imagenet-r-5": (5, 50, 0.98),
           "inflora-imagenet-r-10": (10, 50, 0.98), "inflora-imagenet-r-20": (20, 50, 0.98),
           "inflora-domainnet": (5, 5, 0.95)}


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_preset_loads_with_official_settings(preset, tmp_path):
    tasks, epochs, eps = PRESETS[preset]
    cfg = load_config(preset=preset, sets=[f"data_root={tmp_path}"])
    m = cfg.method
    assert m.name == "inflora" and m.rank == (30 if "domainnet" in preset else 10)
    assert m.targets == ["k", "v"] and m.blocks is None and m.eps == eps
    assert m.variant == "official" and m.memory == ("gpm" if "domainnet" in preset else "dualgpm")
    assert cfg.benchmark.num_tasks == tasks and cfg.train.epochs == epochs
    assert cfg.backbone.name == "vit_base_patch16_224.augreg_in21k" and cfg.backbone.pretrained is True
    assert cfg.data.batch_size == 128 and cfg.data.normalize is False and cfg.data.train_augment == "rrc_flip"
    assert cfg.train.model_mode == "eval" and cfg.train.loss_scope == "task"
    assert cfg.data.resize == ("resize" if preset == "inflora-cifar100" else "resize_crop")
    assert str(tmp_path) in cfg.benchmark.datasets[0].root
    if "domainnet" in preset:
        o = cfg.train.optimizer
        assert (o.name, o.lr, o.head_lr, o.momentum) == ("sgd", 0.005, 0.01, 0.9)
        assert cfg.train.schedule.name == "step" and cfg.train.schedule.milestones == [4]
    else:
        assert (cfg.train.optimizer.name, cfg.train.optimizer.lr) == ("adam", 0.0005)
        assert cfg.train.schedule.name == "inflora-cosine"
    if "imagenet-r" in preset:
        order = cfg.benchmark.class_order
        assert sorted(order) == list(range(200))


@pytest.mark.parametrize("preset,lr,eps,rank", [("inflora-cifar100", 0.001, 0.95, 10),
                                                ("inflora-imagenet-r-10", 0.0005, 0.99, 10),
                                                ("inflora-imagenet-r-20", 0.0005, 0.98, 10),
                                                ("inflora-domainnet", 0.005, 0.95, 30)])
def test_b5_overrides(preset, lr, eps, rank, tmp_path):
    cfg = load_config(preset=preset, method="inflora-b5", sets=[f"data_root={tmp_path}"])
    m = cfg.method
    assert m.name == "inflora-b5" and m.blocks == [0, 1, 2, 3, 4] and m.memory == "gpm"
    assert (cfg.train.optimizer.lr, m.eps, m.rank) == (lr, eps, rank)


def test_other_methods_run_on_the_inflora_presets(tmp_path):
    cfg = load_config(preset="inflora-imagenet-r-10", method="seq-lora", sets=[f"data_root={tmp_path}"])
    assert cfg.method.name == "seq-lora" and not hasattr(cfg.method, "eps")


def test_imagenet_r_class_order_is_sorted_wnids():
    """The official code numbers ImageNet-R classes by sorted wnid (ImageFolder); the preset's order does."""
    cfg = load_config(preset="inflora-imagenet-r-10", sets=["data_root=/nonexistent"])
    doc = yaml.safe_load((SPLIT_DIR / "imagenet-r" / "train.yaml").read_text())
    wnid = {}
    for f, y in zip(doc["data"], doc["targets"]):
        wnid.setdefault(int(y), Path(f).parent.name)
    names = [wnid[k] for k in cfg.benchmark.class_order]
    assert names == sorted(names)


def _real_images(n: int) -> list[Path]:
    files = sorted((DATA / "cifar100" / "train").glob("*/*.jpg"))[:n]
    assert len(files) == n
    return files


@pytest.mark.shared
def test_imagenet_r_loader_with_the_shipped_split(tmp_path):
    """A copy of ImageNet-R laid out as the download (`imagenet-r/<wnid>/<file>.jpg`), the first listed files
    real images (the others empty files, since a listed file that is absent stops the load): the shipped lists resolve to 24,000 / 6,000 files over 200 classes and images load."""
    from loracl.config import DatasetSpec

    train = yaml.safe_load((SPLIT_DIR / "imagenet-r" / "train.yaml").read_text())
    test = yaml.safe_load((SPLIT_DIR / "imagenet-r" / "test.yaml").read_text())
    src = _real_images(6)
    listed = train["data"][:3] + test["data"][:3]
    for f in train["data"] + test["data"]:  # every listed file exists (checked up front); the rest stay empty
        dst = tmp_path / "imagenet-r" / Path(*Path(f).parts[-2:])
        dst.parent.mkdir(parents=True, exist_ok=True)
        dst.touch()
    for f, img in zip(listed, src):
        shutil.copy(img, tmp_path / "imagenet-r" / Path(*Path(f).parts[-2:]))
    ds = load_dataset(DatasetSpec(name="imagenet-r", root=str(tmp_path)))  # root may hold imagenet-r/
    assert len(ds.class_names) == 200 and (len(ds.train), len(ds.test)) == (24000, 6000)
    for part, doc in (("train", train), ("test", test)):
        s = getattr(ds, part)
        for i in range(3):
            assert s.describe(i).endswith(str(Path(*Path(doc["data"][i]).parts[-2:])))
            assert int(s.targets[i]) == int(doc["targets"][i])
            assert ds.class_names[s.targets[i]] == Path(doc["data"][i]).parent.name
            assert s.image(i).size == (32, 32)


@pytest.mark.shared
def test_imagenet_r_scenario_from_split_files_and_preset_order(tmp_path):
    """The preset's benchmark over a tiny ImageNet-R (own split lists in the CODA-Prompt format): tasks follow
    the sorted-wnid order."""
    from loracl.data.scenarios import build_scenario

    src = _real_images(16)
    wnids = ["n09999999", "n01000001", "n05555555", "n03333333"]  # listed labels 0..3, not in sorted order
    docs = {"train": {"data": [], "targets": []}, "test": {"data": [], "targets": []}}
    for k, img in enumerate(src):
        label = k % 4
        part = "test" if k >= 12 else "train"
        rel = f"data/imagenet-r/{wnids[label]}/img_{k}.jpg"
        dst = tmp_path / "imagenet-r" / wnids[label] / f"img_{k}.jpg"
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(img, dst)
        docs[part]["data"].append(rel)
        docs[part]["targets"].append(label)
    for part, doc in docs.items():
        (tmp_path / f"{part}.yaml").write_text(yaml.safe_dump(doc))
    order = sorted(range(4), key=lambda k: wnids[k])
    cfg = load_config(preset="inflora-imagenet-r-10", sets=[
        f"data_root={tmp_path}", "benchmark.num_tasks=2", f"benchmark.class_order={order}",
        f"benchmark.datasets=[{{name: imagenet-r, root: {tmp_path}/imagenet-r, "
        f"split_files: {{train: {tmp_path}/train.yaml, test: {tmp_path}/test.yaml}}}}]"])
    sc = build_scenario(cfg.benchmark, 0)
    assert [t.class_names for t in sc.tasks] == [["n01000001", "n03333333"], ["n05555555", "n09999999"]]
    assert len(sc.tasks[0].train) == 6 and len(sc.tasks[1].test) == 2
    assert sc.tasks[0].train.image(0).size == (32, 32)


@pytest.mark.shared
def test_domainnet_loader(tmp_path):
    """DomainNet laid out as the download: root/<domain>/<class>/<file> and <domain>_{train,test}.txt lists."""
    from loracl.config import DatasetSpec

    src = iter(_real_images(12))
    classes = ["aircraft_carrier", "airplane", "alarm_clock"]
    for dom in ("clipart", "sketch"):
        for part in ("train", "test"):
            lines = []
            for c, name in enumerate(classes):
                img = next(src) if part == "train" or c == 0 else None
                if img is None:
                    continue
                rel = f"{dom}/{name}/{dom}_{c:03d}_{part}.jpg"
                (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy(img, tmp_path / rel)
                lines.append(f"{rel} {c}")
            (tmp_path / f"{dom}_{part}.txt").write_text("\n".join(lines) + "\n")
    ds = load_dataset(DatasetSpec(name="domainnet", root=str(tmp_path), domain="clipart,sketch"))
    assert ds.class_names == classes
    assert (len(ds.train), len(ds.test)) == (6, 2)
    assert np.array_equal(ds.train.targets, [0, 1, 2, 0, 1, 2])
    assert all(ds.train.image(i).size == (32, 32) for i in range(len(ds.train)))
    assert "sketch" in ds.test.describe(1)


@pytest.mark.parametrize("preset,method,want", [
    ("inflora-cifar100", "lora-drs", {"epochs": 20, "lr": 0.0005, "head_lr": 0.002, "lam": 0.05, "batch": 128}),
    ("inflora-imagenet-r-10", "lora-drs", {"epochs": [40] + [50] * 9, "lr": 0.0005, "head_lr": None, "lam": 0.2,
                                           "batch": 128}),
    ("inflora-cifar100", "hide-prompt", {"epochs": 50, "lr": 0.03 * 24 / 256, "head_lr": 0.003 * 24 / 256,
                                         "length": 5, "batch": 24, "schedule": "step"}),
    ("inflora-imagenet-r-20", "hide-prompt", {"epochs": 150, "lr": 0.03 * 24 / 256, "head_lr": 0.003 * 24 / 256,
                                              "length": 20, "batch": 24, "schedule": "cosine-epoch"})])
def test_paper_settings_of_the_2025_rows(preset, method, want, tmp_path):
    cfg = load_config(preset=preset, method=method, sets=[f"data_root={tmp_path}"])
    t = cfg.train
    assert cfg.method.name == method and t.epochs == want["epochs"] and cfg.data.batch_size == want["batch"]
    assert t.optimizer.lr == pytest.approx(want["lr"])
    assert t.optimizer.head_lr == (None if want["head_lr"] is None else pytest.approx(want["head_lr"]))
    if method == "lora-drs":
        assert (cfg.method.rank, cfg.method.targets, cfg.method.lam) == (10, ["k", "v"], want["lam"])
        assert t.schedule.name == "inflora-cosine"
    else:
        assert cfg.method.length == want["length"] and t.grad_clip == 1.0 and t.schedule.name == want["schedule"]
