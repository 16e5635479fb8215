"""Datasets by name: image folders (with or without split files) and torchvision datasets that download.

A dataset resolves to `DatasetSplits`: class names plus a train and a test `ImageSet`. An `ImageSet` is
a list of (source, index, target) rows over one or more `ImageSource`s; images are read lazily with PIL,
and an unreadable file raises one DataError that names it. Every PIL mode becomes 8-bit RGB (16-bit and
float images scaled, not clipped). What a folder holds besides classes of images (hidden or `__MACOSX`
folders, empty class folders, other files) is skipped and reported by name before training starts.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import numpy as np

from ..config import DatasetSpec
from ..errors import DataError
from .images import (  # noqa: F401  (the image API, re-exported for the modules that take it from here)
    DatasetSplits,
    FileSource,
    ImageSet,
    ImageSource,
    TorchvisionSource,
    _few,
    image_side,
    load_image,
    note,
    to_rgb,
)
from .registry import LOADERS, load_dataset, register  # noqa: F401  (re-exported)

IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm")


def stratified_split(targets: np.ndarray, test_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Seeded per-class split: the first round(f * n_c) of each class's permutation go to test."""
    rng = np.random.default_rng(seed)
    train, test = [], []
    for c in np.unique(targets):
        rows = np.nonzero(targets == c)[0]
        perm = rng.permutation(rows)
        k = int(round(test_fraction * len(rows)))
        test.extend(perm[:k])
        train.extend(perm[k:])
    return np.sort(np.asarray(train, dtype=np.int64)), np.sort(np.asarray(test, dtype=np.int64))


def random_split(n: int, test_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """torch.utils.data.random_split(range(n), [n_train, n - n_train], generator=manual_seed(seed)) as row
    indices (train, test), the way MTIL's Caltech101/EuroSAT/SUN397 splits are made: n_train is
    int((1 - test_fraction) * n), truncated like the official int(0.8 * len(dataset)) (Caltech101: 6941, not 6942)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    n_train = int((1.0 - test_fraction) * n)
    perm = torch.randperm(n, generator=g).numpy()
    return perm[:n_train], perm[n_train:]


def _not_a_class(name: str) -> bool:
    return name.startswith(".") or name == "__MACOSX"  # .ipynb_checkpoints, .git, macOS zip debris


def scan_folder(root: Path) -> tuple[list[str], list[str], list[int]]:
    """`root/<class>/<image>` -> (sorted class names, file paths, targets). Hidden and `__MACOSX` folders are
    not classes, class folders without images are not classes, and files that are not images are not
    samples: each is left out and reported by name."""
    if not root.is_dir():
        raise DataError(f"image folder {root} does not exist")
    dirs = sorted(p.name for p in root.iterdir() if p.is_dir())
    skipped = [d for d in dirs if _not_a_class(d)]
    files = {}
    other: list[str] = []
    for c in dirs:
        if c in skipped:
            continue
        files[c] = []
        for f in sorted((root / c).iterdir()):
            if f.is_file() and f.suffix.lower() in IMG_EXTENSIONS:
                files[c].append(str(f))
            elif not f.name.startswith("."):  # .DS_Store and the like: nobody meant them as samples
                other.append(f"{c}/{f.name}")
    empty = [c for c in files if not files[c]]
    if skipped:
        note(f"image folder {root}: folders that are not classes left out: {_few(skipped)}")
    if empty:
        note(f"image folder {root}: class folders without images left out (not classes): {_few(empty)}")
    if other:
        note(f"image folder {root}: {len(other)} entries that are not images left out: {_few(other)}")
    classes = [c for c in files if files[c]]
    if not classes:
        raise DataError(f"image folder {root} has no class sub-folders with images "
                        f"({IMG_EXTENSIONS[0]}, {IMG_EXTENSIONS[1]}, ...)")
    paths, targets = [], []
    for k, c in enumerate(classes):
        paths += files[c]
        targets += [k] * len(files[c])
    return classes, paths, targets


def _split_dir(root: Path, names: tuple[str, ...]) -> Path | None:
    for n in names:
        if (root / n).is_dir():
            return root / n
    return None


def read_split_file(path: Path, base: Path) -> tuple[list[str], list[int] | None]:
    """A split list: YAML with `data:`/`targets:` (CODA-Prompt's ImageNet-R) or text lines `path [label]`."""
    if not path.is_file():
        raise DataError(f"split file {path} does not exist")
    if path.suffix in (".yaml", ".yml"):
        import yaml

        try:
            doc = yaml.safe_load(path.read_text())
        except yaml.YAMLError as e:
            raise DataError(f"split file {path} is not valid YAML: {str(e).splitlines()[0]}") from None
        if not isinstance(doc, dict) or "data" not in doc:
            raise DataError(f"split file {path} must hold 'data:' (and 'targets:') lists")
        files = [str(f) for f in doc["data"]]
        if "targets" not in doc:
            return files, None
        labels = [_label(y, path, f"targets[{i}]") for i, y in enumerate(doc["targets"])]
        if len(labels) != len(files):
            raise DataError(f"split file {path} lists {len(files)} images but {len(labels)} targets")
        return files, labels
    files, labels = [], []
    for n, line in enumerate(path.read_text(encoding="utf-8-sig", errors="replace").splitlines(), 1):
        line = line.strip()
        if not line:
            continue
        parts = line.rsplit(None, 1)
        if len(parts) == 1 or line.lower().endswith(IMG_EXTENSIONS):  # no label (the path may hold spaces)
            files.append(line)
        else:
            files.append(parts[0])
            labels.append(_label(parts[1], path, f"line {n}"))
    if labels and len(labels) != len(files):
        raise DataError(f"split file {path}: {len(files) - len(labels)} of {len(files)} lines have no label")
    return files, labels if labels else None


def _label(y, path: Path, where: str) -> int:
    try:
        v = int(y)
    except (TypeError, ValueError):
        v = -1
    if v < 0 or str(y).strip() not in (str(v), f"{v}.0"):
        raise DataError(f"split file {path}, {where}: label '{y}' is not a class index (an integer >= 0)")
    return v


def _check_listed(paths: list[str], split_file: str) -> None:
    """Every image a split file lists exists, checked before training (not an hour into it)."""
    missing = [p for p in paths if not Path(p).is_file()]
    if missing:
        raise DataError(f"split file {split_file} lists {len(missing)} images that do not exist: {_few(missing, 3)}")


def folder_with_splits(spec: DatasetSpec, root: Path, name: str) -> DatasetSplits:
    """Image-folder datasets in any of the layouts users have:
    split files; `root/train|test/<class>`; or one `root/<class>` folder with a seeded holdout split."""
    if spec.split_files:
        if set(spec.split_files) != {"train", "test"}:
            raise DataError(f"dataset '{name}': split_files needs both 'train' and 'test'")
        parts = {}
        for part, f in spec.split_files.items():
            files, labels = read_split_file(Path(f).expanduser(), root)
            parts[part] = (files, labels)
        # class names: by the listed label when the lists carry labels (ImageNet-R's are not in sorted
        # wnid order), else the sorted parent-folder names
        by_label: dict[int, str] = {}
        for fs, ls in parts.values():
            for f, y in zip(fs, ls or []):
                if by_label.setdefault(int(y), Path(f).parent.name) != Path(f).parent.name:
                    raise DataError(f"split files of '{name}' give label {y} to two folders")
        if by_label:
            classes = [by_label.get(k, f"class_{k}") for k in range(max(by_label) + 1)]
        else:
            classes = sorted({Path(f).parent.name for fs, _ in parts.values() for f in fs})
        sets = {}
        for part, (files, labels) in parts.items():
            strip = _listed_prefix(root, files[0]) if files else 0
            paths = [str(root.joinpath(*Path(f).parts[strip:])) if not Path(f).is_absolute() else f for f in files]
            tg = labels if labels is not None else [classes.index(Path(f).parent.name) for f in files]
            _check_listed(paths, spec.split_files[part])
            sets[part] = ImageSet.from_source(FileSource(paths, f"{name}/{part}"), tg)
        return DatasetSplits(name, classes, sets["train"], sets["test"])
    tr = _split_dir(root, ("train",))
    te = _split_dir(root, ("test", "val"))
    if tr is not None and te is not None:
        classes, p_tr, t_tr = scan_folder(tr)
        classes_te, p_te, t_te = scan_folder(te)
        if classes_te != classes:
            only = sorted(set(classes) ^ set(classes_te))
            raise DataError(f"dataset '{name}': the classes of {tr} and {te} differ"
                            + (f" ({_few(only)} in only one)" if only else " (in order)"))
        return DatasetSplits(name, classes, ImageSet.from_source(FileSource(p_tr, f"{name}/train"), t_tr),
                             ImageSet.from_source(FileSource(p_te, f"{name}/test"), t_te))
    classes, paths, targets = scan_folder(root)
    if spec.holdout is None:
        raise DataError(f"dataset '{name}' at {root} has no train/ and test/ folders and no split files; "
                        f"set 'holdout: 0.2' for a seeded stratified split")
    src = FileSource(paths, name)
    full = ImageSet.from_source(src, targets)
    tr_rows, te_rows = stratified_split(np.asarray(targets), spec.holdout, spec.holdout_seed)
    return DatasetSplits(name, classes, full.subset(tr_rows), full.subset(te_rows))


def _listed_prefix(root: Path, f: str) -> int:
    """Split lists name files relative to various bases (`data/imagenet-r/<wnid>/x.jpg`): how many leading
    parts to drop so that the file is found under root (default: keep `<class>/<file>`)."""
    p = Path(f)
    for k in range(max(len(p.parts) - 1, 1)):
        if root.joinpath(*p.parts[k:]).exists():
            return k
    return max(len(p.parts) - 2, 0)


@register("imagefolder")
def _imagefolder(spec: DatasetSpec) -> DatasetSplits:
    root = Path(spec.root).expanduser()
    return folder_with_splits(spec, root, spec.label or root.name)


# torchvision datasets: (class, kwargs for train, kwargs for test, folder layout name)
TORCHVISION = {
    "cifar10": ("CIFAR10", {"train": True}, {"train": False}),
    "cifar100": ("CIFAR100", {"train": True}, {"train": False}),
    "mnist": ("MNIST", {"train": True}, {"train": False}),
    "fashion_mnist": ("FashionMNIST", {"train": True}, {"train": False}),
}


@contextlib.contextmanager
def torchvision_errors(spec: DatasetSpec, cls_name: str):
    """The errors a user can cause while torchvision opens a data set, as one DataError line."""
    root = Path(spec.root).expanduser()
    try:
        yield
    except RuntimeError as e:  # "Dataset not found or corrupted. You can use download=True ..."
        raise DataError(f"dataset '{spec.name}' not found under {root} ({str(e).splitlines()[0]}); set "
                        f"'download: true' to fetch it, or point 'root' at a copy") from None
    except ValueError as e:  # Stanford Cars: "The original URL is broken ..."
        raise DataError(f"dataset '{spec.name}' under {root}: {str(e).splitlines()[0]} Place the data there "
                        f"by hand (the layout torchvision's {cls_name} reads) and set 'download: false'") from None
    except OSError as e:  # a download that could not reach its server (URLError), or a disk error
        raise DataError(f"dataset '{spec.name}': could not download or read it under {root} ({e}); without "
                        f"internet, place a copy there by hand (the layout torchvision's {cls_name} reads) "
                        f"and set 'download: false'") from None
    except ImportError as e:  # Flowers102 and Stanford Cars read .mat files with scipy
        raise DataError(f"dataset '{spec.name}' needs the package '{e.name}' (pip install {e.name})") from None


def torchvision_splits(spec: DatasetSpec, cls_name: str, train_kw: dict, test_kw: dict,
                       class_names: list[str] | None = None) -> DatasetSplits:
    import torchvision.datasets as tvd

    cls = getattr(tvd, cls_name)
    root = Path(spec.root).expanduser()
    out = []
    for kw, part in ((train_kw, "train"), (test_kw, "test")):
        with torchvision_errors(spec, cls_name):
            ds = cls(str(root), download=spec.download, **kw)
        out.append((ds, dataset_targets(ds)))
    names = class_names or [str(c) for c in getattr(out[0][0], "classes", [])]
    if not names:
        names = [str(i) for i in range(int(max(out[0][1])) + 1)]
    train, test = (ImageSet.from_source(TorchvisionSource(ds, f"{spec.name}/{p}"), t)
                   for (ds, t), p in zip(out, ("train", "test")))
    return DatasetSplits(spec.name, names, train, test)


def dataset_targets(ds) -> np.ndarray:
    """Labels of a torchvision dataset without decoding its images."""
    for attr in ("targets", "_labels", "labels", "y", "_targets"):
        t = getattr(ds, attr, None)
        if t is not None:
            return np.asarray(t.tolist() if hasattr(t, "tolist") else list(t), dtype=np.int64)
    for attr in ("_samples", "samples", "imgs"):
        s = getattr(ds, attr, None)
        if s is not None:
            return np.asarray([x[1] for x in s], dtype=np.int64)
    return np.asarray([ds[i][1] for i in range(len(ds))], dtype=np.int64)


def _make_builtin(name: str):
    cls_name, tr, te = TORCHVISION[name]

    def load(spec: DatasetSpec) -> DatasetSplits:
        root = Path(spec.root).expanduser()
        if (root / "train").is_dir():  # image-folder copy (../shared/data layout)
            ds = folder_with_splits(spec, root, name)
            ds.name = name
            return ds
        return torchvision_splits(spec, cls_name, tr, te)

    register(name)(load)


for _n in TORCHVISION:
    _make_builtin(_n)


@register("pacs")
def _pacs(spec: DatasetSpec) -> DatasetSplits:
    """PACS: root/<domain>/<class>/<image>; no official split, so a seeded stratified holdout (default 20%)."""
    if not spec.domain:
        raise DataError("dataset 'pacs' needs 'domain' (art_painting, cartoon, photo, sketch)")
    root = Path(spec.root).expanduser() / spec.domain
    if not root.is_dir():
        raise DataError(f"PACS domain folder {root} does not exist")
    holdout = spec.holdout if spec.holdout is not None else 0.2
    classes, paths, targets = scan_folder(root)
    full = ImageSet.from_source(FileSource(paths, f"pacs/{spec.domain}"), targets)
    tr, te = stratified_split(np.asarray(targets), holdout, spec.holdout_seed)
    return DatasetSplits(f"pacs-{spec.domain}", classes, full.subset(tr), full.subset(te))


SPLIT_DIR = Path(__file__).resolve().parent / "splits"


@register("imagenet-r")
def _imagenet_r(spec: DatasetSpec) -> DatasetSplits:
    """ImageNet-R with CODA-Prompt's standard 80/20 split (the lists ship with loracl)."""
    root = Path(spec.root).expanduser()
    if (root / "imagenet-r").is_dir():
        root = root / "imagenet-r"
    if not spec.split_files:
        spec = spec.model_copy(update={"split_files": {p: str(SPLIT_DIR / "imagenet-r" / f"{p}.yaml")
                                                       for p in ("train", "test")}})
    ds = folder_with_splits(spec, root, "imagenet-r")
    missing = [ds.train.describe(i) for i in range(min(len(ds.train), 1)) if not Path(ds.train.describe(i)).exists()]
    if missing:
        raise DataError(f"ImageNet-R image {missing[0]} listed in the split is missing under {root}")
    return ds


@register("domainnet")
def _domainnet(spec: DatasetSpec) -> DatasetSplits:
    """DomainNet: root/<domain>/<class>/<image> with the official `<domain>_train.txt` / `_test.txt` lists.
    `domain` may be one domain or a comma list (InfLoRA's class-incremental DomainNet uses all six)."""
    root = Path(spec.root).expanduser()
    domains = (spec.domain or "clipart,infograph,painting,quickdraw,real,sketch").split(",")
    sets = {"train": [], "test": []}
    classes = None
    for dom in domains:
        for part in ("train", "test"):
            f = root / f"{dom}_{part}.txt"
            files, labels = read_split_file(f, root)
            if labels is None:
                raise DataError(f"DomainNet split file {f} must have a label column")
            paths = [str(root / x) for x in files]
            _check_listed(paths, str(f))
            sets[part].append(ImageSet.from_source(FileSource(paths, f"domainnet/{dom}/{part}"), labels))
            if classes is None:
                by_label = {}
                for x, y in zip(files, labels):
                    by_label.setdefault(y, Path(x).parent.name)
                classes = [by_label[k] for k in sorted(by_label)]
    return DatasetSplits("domainnet", classes, ImageSet.concat(sets["train"]), ImageSet.concat(sets["test"]))
