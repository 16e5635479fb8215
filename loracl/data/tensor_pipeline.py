"""The fast data path: a dataset decoded once to uint8, kept in memory (on the GPU when it fits) or
memory-mapped on disk, and augmented in batches on the model's device.

The PIL pipeline (`transforms.Pipeline` + DataLoader) is the reference; this path stores every image as
the deterministic part of the test transform at a storage size (the central square that `Resize` +
`CenterCrop` would keep, or the whole image squashed for a plain `Resize`), capped at the images' own
resolution (CIFAR stays 32 px and is upsampled on the fly), and then cuts every view from that square
with one batched crop-and-resize:

- test: the central box the reference keeps, resized to the model size (exact for square sources);
- flip / crop_flip: as the reference, on the resized square (pad-and-crop is exact);
- rrc_flip: torchvision's random-resized-crop parameters drawn on the stored square (the reference draws
  them on the full original image, so non-square sources see slightly different crops).

Random parameters come from a generator seeded per batch, so runs are deterministic and resumable.
"""

from __future__ import annotations

import errno
import hashlib
import math
import os
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torchvision.ops import roi_align
from torchvision.transforms import CenterCrop, Resize

from .. import dist
from ..errors import DataError
from .datasets import ImageSet, image_side
from .loader import make_loader
from .transforms import Pipeline, _interp


def storage_size(images: ImageSet, size: int, crop_pct: float, sample: int = 32) -> int:
    """Side of the stored square: what the test transform keeps before its final resize, capped at the
    source resolution (read from a few image headers)."""
    target = size if crop_pct >= 1.0 else int(math.floor(size / crop_pct))
    sides = []
    for i in np.linspace(0, len(images) - 1, min(sample, len(images))).astype(int):
        src = images.sources[images.src[i]]
        if hasattr(src, "paths"):
            sides.append(image_side(src.paths[int(images.idx[i])]))
        else:
            sides.append(min(images.image(int(i)).size))
    return int(min(target, max(sides)))


def _decode_into(data: torch.Tensor, images: ImageSet, geo: Pipeline, workers: int) -> None:
    """Every image of `images`, in order, through `geo` into `data` (all of them, in every process)."""
    k = 0
    for x, _, _ in make_loader(images, geo, 256, num_workers=workers, augment=False, split=False):
        data[k:k + len(x)] = x
        k += len(x)


def _reserve(path: Path, nbytes: int) -> None:
    """Allocate the cache file's blocks before mapping it: pages of a sparse file written on a full disk
    kill the process with SIGBUS; here a full disk is one error line."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "wb") as f:
            try:
                os.posix_fallocate(f.fileno(), 0, nbytes)
            except OSError as e:
                if e.errno not in (errno.EOPNOTSUPP, errno.EINVAL):  # a filesystem without fallocate
                    raise
                f.truncate(nbytes)
    except OSError as e:
        path.unlink(missing_ok=True)
        raise DataError(f"cannot write the decoded-image cache {path} ({nbytes / 2**20:.0f} MiB): "
                        f"{e.strerror or e}; free space there, or set data.cache_dir to another folder or null") from None


class DecodedImages:
    """All images of an ImageSet as one uint8 tensor (N, 3, S, S), decoded once."""

    def __init__(self, images: ImageSet, store: int, interpolation: str, squash: bool, *, device: torch.device,
                 device_budget: int = 0, cache_dir: str | None = None, workers: int = 0):
        self.images, self.store = images, store
        self.targets = torch.as_tensor(images.targets, dtype=torch.long)
        n = len(images)
        nbytes = n * 3 * store * store
        path = None
        if cache_dir:
            key = hashlib.sha1(f"{images.fingerprint()}-{store}-{interpolation}-{squash}".encode()).hexdigest()[:20]
            path = Path(cache_dir).expanduser() / f"{key}.u8"
        interp = _interp(interpolation)
        geo = Pipeline([Resize((store, store), interpolation=interp)] if squash else
                       [Resize(store, interpolation=interp), CenterCrop(store)])
        shape = (n, 3, store, store)
        if path is None:  # under torchrun every process decodes the whole set into its own memory
            data = torch.empty(shape, dtype=torch.uint8)
            _decode_into(data, images, geo, workers)
        else:  # one process writes the file, then every process maps it
            if dist.is_main() and not (path.exists() and path.stat().st_size == nbytes):
                _reserve(path.with_suffix(".tmp"), nbytes)
                mm = np.memmap(path.with_suffix(".tmp"), dtype=np.uint8, mode="r+", shape=shape)
                _decode_into(torch.from_numpy(mm), images, geo, workers)
                mm.flush()
                path.with_suffix(".tmp").rename(path)
            dist.barrier()
            data = torch.from_numpy(np.memmap(path, dtype=np.uint8, mode="c", shape=shape))
        if device.type == "cuda" and nbytes <= device_budget:
            data = data.to(device)
        self.data = data
        self.on_device = data.device.type == device.type

    def __len__(self):
        return len(self.targets)

    def rows(self, idx: torch.Tensor) -> torch.Tensor:
        if self.data.device.type == "cpu" and idx.device.type == "cpu":
            return self.data[idx]
        return self.data[idx.to(self.data.device)]


def _crop_resize(x: torch.Tensor, boxes: torch.Tensor, out: int) -> torch.Tensor:
    """Cut box (x0, y0, x1, y1) of every image (float, stored pixel units) and resize it to out x out."""
    ids = torch.arange(len(x), device=x.device, dtype=x.dtype)[:, None]
    return roi_align(x, torch.cat([ids, boxes.to(x)], 1), output_size=(out, out), spatial_scale=1.0,
                     sampling_ratio=-1, aligned=True)


def rrc_params(n: int, side: int, gen: torch.Generator, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3)) -> torch.Tensor:
    """torchvision RandomResizedCrop.get_params for n square images of `side`, vectorised (10 tries, then
    the central crop with the ratio clamped; for a square that is the whole image)."""
    area = side * side
    tries = 10
    target = area * torch.empty(n, tries).uniform_(scale[0], scale[1], generator=gen)
    log_r = torch.empty(n, tries).uniform_(math.log(ratio[0]), math.log(ratio[1]), generator=gen)
    aspect = torch.exp(log_r)
    w = torch.round(torch.sqrt(target * aspect))
    h = torch.round(torch.sqrt(target / aspect))
    ok = (w > 0) & (w <= side) & (h > 0) & (h <= side)
    first = ok.float().argmax(1)
    found = ok.any(1)
    ww = w.gather(1, first[:, None])[:, 0]
    hh = h.gather(1, first[:, None])[:, 0]
    u = torch.rand(n, 2, generator=gen)
    top = torch.floor(u[:, 0] * (side - hh + 1))
    left = torch.floor(u[:, 1] * (side - ww + 1))
    boxes = torch.stack([left, top, left + ww, top + hh], 1)
    boxes[~found] = torch.tensor([0.0, 0.0, float(side), float(side)])
    return boxes


class BatchAugment:
    """The training / test views of a batch of stored squares, on the batch's device."""

    def __init__(self, kind: str, size: int, crop_pct: float, pipeline: Pipeline, rrc_scale=(0.08, 1.0)):
        self.kind, self.size, self.crop_pct, self.pipeline = kind, size, crop_pct, pipeline
        self.rrc_scale = tuple(rrc_scale)

    def test_boxes(self, n: int, side: int) -> torch.Tensor:
        """The central box CenterCrop(size) keeps of Resize(floor(size / crop_pct)), in stored pixels."""
        if self.crop_pct >= 1.0:
            keep, off = float(side), 0.0
        else:
            keep = self.size * side / math.floor(self.size / self.crop_pct)
            off = (side - keep) / 2
            if keep == int(keep):
                off = float(int(round(off)))
        return torch.tensor([[off, off, off + keep, off + keep]]).expand(n, 4)

    def __call__(self, u8: torch.Tensor, gen: torch.Generator | None, lo: int = 0,
                 total: int | None = None) -> torch.Tensor:
        """Views of `u8`, which holds positions lo .. lo + len(u8) of a batch of `total` (default: all of it).
        Random parameters are drawn for the whole batch and these positions' are used, so a process that
        augments its share of a global batch gets what a single process gets for those images."""
        n, side = len(u8), u8.shape[-1]
        total, pick = total or n, slice(lo, lo + n)
        x = u8.float()
        kind = self.kind if gen is not None else "none"
        if kind == "rrc_flip":
            x = _crop_resize(x, rrc_params(total, side, gen, self.rrc_scale)[pick], self.size)
        elif kind == "crop_flip":
            x = _crop_resize(x, torch.tensor([[0.0, 0.0, side, side]]).expand(n, 4), self.size)
            p = max(self.size // 8, 1)
            x = F.pad(x, (p, p, p, p))
            off = torch.randint(0, 2 * p + 1, (total, 2), generator=gen)[pick].to(x.device)
            ar = torch.arange(self.size, device=x.device)
            rows = (off[:, 0, None] + ar)[:, None, :, None].expand(n, 3, self.size, self.size + 2 * p)
            x = x.gather(2, rows)
            cols = (off[:, 1, None] + ar)[:, None, None, :].expand(n, 3, self.size, self.size)
            x = x.gather(3, cols)
        elif side != self.size or self.crop_pct < 1.0:
            x = _crop_resize(x, self.test_boxes(n, side), self.size)
        if kind in ("flip", "crop_flip", "rrc_flip"):
            flip = (torch.rand(total, generator=gen) < 0.5)[pick].to(x.device)
            x = torch.where(flip[:, None, None, None], x.flip(-1), x)
        return self.pipeline.finish(x.clamp_(0, 255).round_().to(torch.uint8) if x.dtype != torch.uint8 else x)
