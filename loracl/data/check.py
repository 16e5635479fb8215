"""`loracl data check PRESET`: whether the data a preset reads is all there, before anyone queues a sweep.

One line per dataset: where it is read from and which key points there, its image counts against the expected
ones (the preset's `expect:`, else the standard split of the full dataset where that is fixed), its split files
with their md5, and for what is missing where it comes from. Loading goes through the same loaders a run uses,
so what this calls complete is what a run reads (a run whose data is incomplete stops before training anyway).
"""

from __future__ import annotations

import hashlib
import time
from pathlib import Path

from ..config import DatasetSpec, RunConfig
from ..errors import LoraclError
from .registry import load_dataset

# image counts of the standard splits where they are fixed (the full datasets, no classes / max_per_class)
EXPECTED = {
    "cifar10": (50000, 10000), "cifar100": (50000, 10000), "mnist": (60000, 10000),
    "fashion_mnist": (60000, 10000), "imagenet-r": (24000, 6000), "aircraft": (6667, 3333),
    "dtd": (3760, 1880), "flowers102": (2040, 6149), "food101": (75750, 25250), "oxford_pets": (3680, 3669),
    "stanford_cars": (8144, 8041), "caltech101": (6941, 1736),
}
SOURCES = {
    "imagenet-r": "https://people.eecs.berkeley.edu/~hendrycks/imagenet-r.tar (the split files ship with loracl)",
    "domainnet": "http://ai.bu.edu/M3SDA/ (images and the <domain>_train.txt / _test.txt lists)",
    "pacs": "https://domaingeneralization.github.io/ (PACS, kfold images)",
    "imagefolder": "your own images: ROOT/train/<class>/ and ROOT/test/<class>/",
}
TORCHVISION = {"cifar10", "cifar100", "mnist", "fashion_mnist", "aircraft", "dtd", "flowers102", "food101",
               "oxford_pets", "stanford_cars", "caltech101", "eurosat", "sun397"}


def md5(path: Path) -> str:
    h = hashlib.md5()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def source_of(name: str) -> str:
    if name in SOURCES:
        return SOURCES[name]
    if name in TORCHVISION:
        return "torchvision downloads it: set the dataset's download: true (needs internet once)"
    return "see the dataset's loader in loracl/data"


def expected(spec: DatasetSpec) -> tuple[int, int] | None:
    if spec.expect:
        return spec.expect.get("train"), spec.expect.get("test")
    if spec.classes is None and spec.max_per_class is None and spec.holdout is None and spec.domain is None:
        return EXPECTED.get(spec.name)
    return None


def check_dataset(spec: DatasetSpec, key: str) -> tuple[bool, str]:
    """(complete, one line) for one dataset of a preset; `key` names the config key that points at it."""
    root = Path(spec.root).expanduser()
    label = spec.label or spec.domain or spec.name
    where = f"{label} ({spec.name}) at {root} [{key}]"
    splits = ""
    for part, f in sorted((spec.split_files or {}).items()):
        p = Path(f) if Path(f).is_absolute() else root / f
        splits += f"; {part} list {p.name} " + (f"md5 {md5(p)}" if p.is_file() else "MISSING")
    if not root.exists():
        return False, f"MISSING  {where}: no such folder; {source_of(spec.name)}"
    try:
        ds = load_dataset(spec.model_copy(update={"download": False}))  # a check never downloads
    except LoraclError as e:
        return False, f"MISSING  {where}: {e}; {source_of(spec.name)}"
    n = (len(ds.train), len(ds.test))
    want = expected(spec)
    counts = f"{n[0]} train / {n[1]} test images, {len(ds.class_names)} classes"
    if want is not None and tuple(w for w in want if w is not None) != tuple(
            c for c, w in zip(n, want) if w is not None):
        return False, f"INCOMPLETE {where}: {counts}, expected {want[0]} / {want[1]}{splits}"
    return "MISSING" not in splits, f"ok       {where}: {counts}" + (
        " (as expected)" if want is not None else "") + splits


def check_config(cfg: RunConfig) -> tuple[bool, list[str]]:
    lines, ok = [], True
    for i, spec in enumerate(cfg.benchmark.datasets):
        good, line = check_dataset(spec, f"benchmark.datasets[{i}].root")
        ok &= good
        lines.append(line)
    if cfg.eval.retention:
        root = Path(cfg.eval.retention)
        if root.is_dir():
            n = sum(1 for p in root.rglob("*") if p.is_file() and p.suffix.lower() in (".jpg", ".jpeg", ".png"))
            lines.append(f"ok       retention images at {root} [eval.retention]: {n} images")
        else:
            ok = False
            lines.append(f"MISSING  retention images at {root} [eval.retention]: no such folder; the backbone's "
                         f"pretraining domain (or --set eval.retention=null to skip the measure)")
    return ok, lines


def cmd_data(args) -> int:
    from ..runs.assembly import load_config

    if args.action != "check":
        raise LoraclError(f"loracl data: unknown action '{args.action}' (check)")
    sets = [f"data_root={args.data_root}"] if args.data_root else []
    t0 = time.perf_counter()
    cfg = load_config(args.config, preset=None if args.config else args.preset, sets=sets + (args.set or []))
    ok, lines = check_config(cfg)
    for line in lines:
        print(line)
    print(f"{cfg.name}: {'complete' if ok else 'incomplete'} ({time.perf_counter() - t0:.1f} s)")
    return 0 if ok else 1


def add_parser(sub) -> None:
    d = sub.add_parser("data", help="check that the data a preset reads is all there (before queueing runs)")
    d.add_argument("action", choices=["check"])
    d.add_argument("preset", nargs="?", help="preset name")
    d.add_argument("--config", help="a config file instead of a preset")
    d.add_argument("--data-root", help="where the datasets are (default: as a run would look)")
    d.add_argument("--set", action="append", metavar="KEY=VALUE")
    d.set_defaults(fn=cmd_data)
