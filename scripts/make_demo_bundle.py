#!/usr/bin/env python3
"""Build the small real benchmark and backbone that `make demo` runs on, from ../shared, into assets/.

What it copies (and records, with checksums, in assets/PROVENANCE.md):
- the pretrained ViT fixture `weights/vit-s6-tin32` (model.safetensors + card.json), unchanged;
- `cifar100-20/`: the first 20 CIFAR-100 classes in label order, the first TRAIN / TEST files (sorted by
  name) of each class from shared/data/cifar100/{train,test};
- `tiny-imagenet-val-5/`: the first 5 validation images (sorted) of each of the 200 Tiny-ImageNet classes
  from shared/data/tiny_imagenet32/val, with classes.tsv (the backbone head's class order), used to measure
  how much of the pretrained knowledge a method keeps.

Run from the repository root:  python scripts/make_demo_bundle.py [--shared ../shared]
"""

from __future__ import annotations

import argparse
import hashlib
import shutil
from pathlib import Path

CLASSES = 20
TRAIN, TEST, RETENTION = 120, 40, 5


# assets/clip-tin32 is not part of the demo bundle; the note keeps it listed when the bundle is rebuilt
CLIP_FIXTURE_NOTE = (
    "## clip-tin32/ (not part of the demo bundle)\n\n"
    "The small pretrained CLIP fixture (`loracl-clip-tin32`, an open_clip model) that the `mini-mtil-clip` preset "
    "and `tests/test_clip_fixture.py` use. Made by `python scripts/make_clip_fixture.py` from "
    "`shared/data/tiny_imagenet32` (train.zip, wordnet.tsv) and `vit-s6-tin32/` above (its image tower's "
    "initialisation); `clip-tin32/card.json` has the recipe and zero-shot accuracies, `clip-tin32/PROVENANCE.md` "
    "the exact command, git commit and md5 sums.")


def md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def copy_first(src: Path, dst: Path, n: int) -> int:
    dst.mkdir(parents=True, exist_ok=True)
    files = sorted(p for p in src.iterdir() if p.is_file())[:n]
    for f in files:
        shutil.copy2(f, dst / f.name)
    return len(files)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shared", default="../shared")
    ap.add_argument("--out", default="assets")
    args = ap.parse_args()
    shared, out = Path(args.shared), Path(args.out)
    # only the folders made here: assets/clip-tin32 comes from scripts/make_clip_fixture.py and stays
    for sub in ("vit-s6-tin32", "cifar100-20", "tiny-imagenet-val-5"):
        if (out / sub).exists():
            shutil.rmtree(out / sub)
    out.mkdir(exist_ok=True)

    wsrc = shared / "weights" / "vit-s6-tin32"
    (out / "vit-s6-tin32").mkdir()
    for f in ("model.safetensors", "card.json"):
        shutil.copy2(wsrc / f, out / "vit-s6-tin32" / f)

    classes = sorted(p.name for p in (shared / "data" / "cifar100" / "train").iterdir())[:CLASSES]
    counts = {}
    for part, n in (("train", TRAIN), ("test", TEST)):
        counts[part] = sum(copy_first(shared / "data" / "cifar100" / part / c, out / "cifar100-20" / part / c, n)
                           for c in classes)

    rsrc = shared / "data" / "tiny_imagenet32"
    ret = 0
    for d in sorted((rsrc / "val").iterdir()):
        ret += copy_first(d, out / "tiny-imagenet-val-5" / d.name, RETENTION)
    shutil.copy2(rsrc / "classes.tsv", out / "tiny-imagenet-val-5" / "classes.tsv")

    total = sum(p.stat().st_size for sub in ("vit-s6-tin32", "cifar100-20", "tiny-imagenet-val-5")
                for p in (out / sub).rglob("*") if p.is_file())
    lines = [
        "# Provenance of the embedded demo bundle",
        "",
        "Made by `python scripts/make_demo_bundle.py` from the project's shared read-only inputs (`../shared`).",
        f"Total size: {total / 2**20:.1f} MiB.",
        "",
        "| folder | source | selection | files |",
        "|---|---|---|---|",
        f"| `vit-s6-tin32/` | `shared/weights/vit-s6-tin32` | unchanged (see its `card.json`: a ViT pretrained from "
        f"scratch on Tiny-ImageNet-200 at 32 px, 32.9% top-1) | 2 |",
        f"| `cifar100-20/` | `shared/data/cifar100` (CIFAR-100, 32x32 JPEG) | first {CLASSES} classes in label order; "
        f"first {TRAIN} train and {TEST} test files of each, sorted by name | {counts['train']} + {counts['test']} |",
        f"| `tiny-imagenet-val-5/` | `shared/data/tiny_imagenet32/val` (Tiny-ImageNet-200 validation, 32 px) | first "
        f"{RETENTION} files of each class, sorted; `classes.tsv` copied | {ret} |",
        "",
        f"CIFAR-100 classes: {', '.join(classes)}.",
        "",
        f"md5 of model.safetensors: `{md5(out / 'vit-s6-tin32' / 'model.safetensors')}`",
    ]
    if (out / "clip-tin32" / "card.json").is_file():
        lines += ["", CLIP_FIXTURE_NOTE]
    (out / "PROVENANCE.md").write_text("\n".join(lines) + "\n")
    print(f"wrote {out} ({total / 2**20:.1f} MiB)")


if __name__ == "__main__":
    main()
