"""Tiny-ImageNet-200 (`tiny_imagenet`) and sentences made from its WordNet entries: the reference set ZSCL
distils on at small scale (ImageNet images and Conceptual Captions at paper scale; BASELINES.md 5).

Layout: `root/train.zip` (members `train/<wnid>/<file>`, read in place) or `root/train/<wnid>/`, `root/val/<wnid>/`,
and `root/classes.tsv` (index, wnid, words) ordering and naming the 200 classes.
"""

from __future__ import annotations

import csv
import zipfile
from pathlib import Path

import numpy as np

from ..config import DatasetSpec
from ..errors import DataError
from .datasets import IMG_EXTENSIONS
from .images import DatasetSplits, FileSource, ImageSet, ZipSource
from .registry import register


def _classes(root: Path) -> tuple[list[str], list[str]]:
    f = root / "classes.tsv"
    if not f.exists():
        raise DataError(f"tiny_imagenet: {f} does not exist (index, wnid and words of the 200 classes)")
    rows = [line.split("\t") for line in f.read_text().splitlines() if line.strip()]
    return [r[1] for r in rows], [r[2].split(",")[0].strip() for r in rows]


def _folder(root: Path, wnids: list[str], name: str) -> ImageSet:
    paths, targets = [], []
    for y, w in enumerate(wnids):
        for f in sorted((root / w).iterdir()) if (root / w).is_dir() else []:
            if f.suffix.lower() in IMG_EXTENSIONS:
                paths.append(str(f))
                targets.append(y)
    return ImageSet.from_source(FileSource(paths, name), np.asarray(targets))


@register("tiny_imagenet")
def _tiny_imagenet(spec: DatasetSpec) -> DatasetSplits:
    root = Path(spec.root).expanduser()
    wnids, names = _classes(root)
    name = spec.label or "tiny_imagenet"
    if (root / "train.zip").exists():
        with zipfile.ZipFile(root / "train.zip") as z:
            members = sorted(m for m in z.namelist() if m.lower().endswith(IMG_EXTENSIONS))
        col = {w: i for i, w in enumerate(wnids)}
        members = [m for m in members if Path(m).parent.name in col]
        train = ImageSet.from_source(ZipSource(root / "train.zip", members, f"{name}-train"),
                                     np.asarray([col[Path(m).parent.name] for m in members]))
    else:
        train = _folder(root / "train", wnids, f"{name}-train")
    test = _folder(root / "val", wnids, f"{name}-val")
    if not len(train):
        raise DataError(f"tiny_imagenet: no training images in {root}/train.zip or {root}/train/<wnid>/")
    return DatasetSplits(name, names, train, test, template="a photo of a {}.", class_keys=wnids)


def reference_sentences(path: str) -> list[str]:
    """Sentences for ZSCL's text side. A `wordnet.tsv` (index, wnid, lemmas, hypernyms, gloss, with a header):
    per class "a photo of a <lemma>." for each lemma, "a <lemma>, a kind of <hypernym>." and "a photo of a
    <hypernym>." for the three nearest hypernyms, and the gloss. Any other file: one sentence per line (a
    `.csv` / `.tsv` with a `caption` or `title` column: that column, as Conceptual Captions is shipped)."""
    p = Path(path).expanduser()
    if not p.exists():
        raise DataError(f"reference sentences {p} do not exist")
    lines = p.read_text(errors="replace").splitlines()
    if p.suffix in (".tsv", ".csv") and lines:
        rows = list(csv.DictReader(lines, delimiter="\t" if p.suffix == ".tsv" else ","))
        if rows and "lemmas" in rows[0]:
            out = []
            for r in rows:
                lemmas = [x.strip() for x in r["lemmas"].split(";") if x.strip()]
                hyper = [x.strip() for x in (r.get("hypernyms (nearest first)") or "").split(";") if x.strip()][:3]
                out += [f"a photo of a {lem}." for lem in lemmas]
                out += [f"a {lemmas[0]}, a kind of {h}." for h in hyper] + [f"a photo of a {h}." for h in hyper]
                out += [r["gloss"].strip()] if r.get("gloss", "").strip() else []
            return out
        for key in ("caption", "title"):
            if rows and key in rows[0]:
                return [r[key] for r in rows if r[key]]
    return [line.strip() for line in lines if line.strip()]
