"""Images read lazily with PIL as 8-bit RGB, and the sets of them a dataset is made of.

An `ImageSet` is a list of (source, index, target) rows over one or more `ImageSource`s (files, or a
torchvision dataset); an unreadable file raises one DataError that names it. Every PIL mode becomes 8-bit RGB
(16-bit and float images scaled, not clipped).
"""

from __future__ import annotations

import hashlib
import io
import os
import sys
import zipfile
from dataclasses import dataclass

import numpy as np
from PIL import Image, UnidentifiedImageError

from ..errors import DataError


class ImageSource:
    name: str

    def load(self, index: int) -> Image.Image:
        raise NotImplementedError

    def describe(self, index: int) -> str:
        return f"{self.name}[{index}]"


def note(msg: str) -> None:
    """Tell the user, before training, about data that loracl left out (one process under torchrun)."""
    from .. import dist

    if dist.is_main():
        print(f"note: {msg}", file=sys.stderr)


def _few(names: list[str], k: int = 5) -> str:
    return ", ".join(names[:k]) + (f" and {len(names) - k} more" if len(names) > k else "")


def to_rgb(im: Image.Image) -> Image.Image:
    """8-bit RGB from any PIL mode. 16-bit and 32-bit images are scaled to 0..255 (PIL's own convert clips
    them, turning most pixels white); float images in 0..1 are scaled by 255."""
    if im.mode == "RGB":
        return im
    if im.mode.startswith("I") or im.mode == "F":
        a = np.asarray(im, dtype=np.float64)
        hi = float(a.max()) if a.size else 0.0
        if im.mode.startswith("I;16") or 255 < hi <= 65535:
            a = a / 257.0
        elif im.mode == "F" and hi <= 1.0:
            a = a * 255.0
        elif hi > 255:
            a = a * (255.0 / hi)
        return Image.fromarray(np.clip(np.round(a), 0, 255).astype(np.uint8), "L").convert("RGB")
    if im.mode == "P" and "transparency" in im.info:
        im = im.convert("RGBA")  # what PIL asks for; then the alpha is dropped as for any RGBA image
    return im.convert("RGB")


def load_image(path: str) -> Image.Image:
    """An image file as 8-bit RGB, or one DataError naming the file."""
    try:
        with Image.open(path) as im:
            im.load()  # decode here, while the file is open and its errors are caught
            out = to_rgb(im)
            # an RGB file comes back as the opened image itself: detach it from the file the `with` closes
            # (a closed ImageFile that is loaded again asserts on its file pointer)
            return out.copy() if out is im else out
    except Image.DecompressionBombError as e:
        raise DataError(f"image {path} is too large to decode ({e}); shrink it, or raise PIL's "
                        f"Image.MAX_IMAGE_PIXELS if it is trusted") from None
    except (OSError, UnidentifiedImageError, ValueError) as e:
        raise DataError(f"cannot read image {path}: {e.__class__.__name__}: {e}") from None


def image_side(path: str) -> int:
    """The shorter side of an image file, from its header (one DataError naming the file if unreadable)."""
    try:
        with Image.open(path) as im:
            return min(im.size)
    except Image.DecompressionBombError as e:
        raise DataError(f"image {path} is too large to decode ({e})") from None
    except (OSError, UnidentifiedImageError, ValueError) as e:
        raise DataError(f"cannot read image {path}: {e.__class__.__name__}: {e}") from None


class FileSource(ImageSource):
    def __init__(self, paths: list[str], name: str):
        self.paths, self.name = paths, name

    def load(self, index: int) -> Image.Image:
        return load_image(self.paths[index])

    def describe(self, index: int) -> str:
        return self.paths[index]


class ZipSource(ImageSource):
    """Members of one zip archive, read in place (Tiny-ImageNet's 100,000 training images as one file); each
    process opens its own handle."""

    def __init__(self, path: str, members: list[str], name: str):
        self.path, self.members, self.name = str(path), members, name
        self._zip, self._pid = None, None

    def __getstate__(self):  # data-loader workers open their own handle
        return {**self.__dict__, "_zip": None, "_pid": None}

    def load(self, index: int) -> Image.Image:
        try:
            if self._zip is None or self._pid != os.getpid():
                self._zip, self._pid = zipfile.ZipFile(self.path), os.getpid()
            img = Image.open(io.BytesIO(self._zip.read(self.members[index])))
            img.load()
        except (OSError, KeyError, zipfile.BadZipFile, UnidentifiedImageError, ValueError) as e:
            raise DataError(f"cannot read image {self.describe(index)}: {e.__class__.__name__}: {e}") from None
        return to_rgb(img)

    def describe(self, index: int) -> str:
        return f"{self.path}:{self.members[index]}"


class TorchvisionSource(ImageSource):
    def __init__(self, dataset, name: str):
        self.dataset, self.name = dataset, name

    def load(self, index: int) -> Image.Image:
        try:
            img = self.dataset[index][0]
        except (OSError, UnidentifiedImageError, ValueError) as e:
            raise DataError(f"cannot read image {self.describe(index)} of {self.name}: {e}") from None
        if not isinstance(img, Image.Image):
            img = Image.fromarray(np.asarray(img))
        return to_rgb(img)


class ImageSet:
    """Rows (source, index, target) over a list of sources; targets are global class ids once a scenario owns it."""

    def __init__(self, sources: list[ImageSource], src: np.ndarray, idx: np.ndarray, targets: np.ndarray):
        self.sources = sources
        self.src = np.asarray(src, dtype=np.int32)
        self.idx = np.asarray(idx, dtype=np.int64)
        self.targets = np.asarray(targets, dtype=np.int64)

    @classmethod
    def from_source(cls, source: ImageSource, targets) -> "ImageSet":
        n = len(targets)
        return cls([source], np.zeros(n), np.arange(n), targets)

    def __len__(self) -> int:
        return len(self.targets)

    def image(self, i: int) -> Image.Image:
        return self.sources[self.src[i]].load(int(self.idx[i]))

    def describe(self, i: int) -> str:
        return self.sources[self.src[i]].describe(int(self.idx[i]))

    def subset(self, rows) -> "ImageSet":
        rows = np.asarray(rows)
        return ImageSet(self.sources, self.src[rows], self.idx[rows], self.targets[rows])

    def with_targets(self, targets) -> "ImageSet":
        return ImageSet(self.sources, self.src, self.idx, targets)

    @staticmethod
    def concat(sets: list["ImageSet"]) -> "ImageSet":
        sources, src, idx, tg = [], [], [], []
        for s in sets:
            offset = len(sources)
            sources.extend(s.sources)
            src.append(s.src + offset)
            idx.append(s.idx)
            tg.append(s.targets)
        return ImageSet(sources, np.concatenate(src), np.concatenate(idx), np.concatenate(tg))

    def fingerprint(self) -> str:
        h = hashlib.sha1()
        for s in self.sources:
            h.update(s.name.encode())
        for a in (self.src, self.idx, self.targets):
            h.update(a.tobytes())
        return h.hexdigest()[:16]


@dataclass
class DatasetSplits:
    name: str
    class_names: list[str]  # as prompts and reports name them (MTIL's: underscores as spaces, ...)
    train: ImageSet
    test: ImageSet
    template: str | None = None
    templates: list[str] | None = None
    class_keys: list[str] | None = None  # as the data names them (folder names) where they differ
