"""Image transforms built from the backbone's pretrained data config (size, mean, std, interpolation, crop).

A pipeline has two halves: the geometric part runs on PIL images in the loader and ends in a uint8
tensor; `finish` (to float in [0, 1], then mean/std) runs on the model's device. Loaders therefore move
uint8 batches, and deterministic (test) images can be cached as uint8 once and reused.
"""

from __future__ import annotations

import math

import torch
from torchvision import transforms as T
from torchvision.transforms import InterpolationMode
from torchvision.transforms.functional import pil_to_tensor

from ..config import DataConfig


def _interp(name: str) -> InterpolationMode:
    return {"bicubic": InterpolationMode.BICUBIC, "bilinear": InterpolationMode.BILINEAR,
            "nearest": InterpolationMode.NEAREST}.get(name, InterpolationMode.BICUBIC)


class Pipeline:
    def __init__(self, geometric: list, mean=None, std=None, random: bool = False):
        self.geometric = T.Compose(geometric)
        self.random = random
        self.mean = None if mean is None else torch.tensor(mean).view(1, 3, 1, 1)
        self.std = None if std is None else torch.tensor(std).view(1, 3, 1, 1)
        self._dev: dict = {}

    def __call__(self, img) -> torch.Tensor:
        """PIL image -> uint8 tensor (3, H, W)."""
        return pil_to_tensor(self.geometric(img))

    def finish(self, x: torch.Tensor) -> torch.Tensor:
        """uint8 batch (B, 3, H, W) on any device -> float model input."""
        x = x.float().div_(255.0)
        if self.mean is None:
            return x
        key = x.device
        if key not in self._dev:
            self._dev[key] = (self.mean.to(x.device), self.std.to(x.device))
        m, s = self._dev[key]
        return x.sub_(m).div_(s)

    def __repr__(self) -> str:
        return f"Pipeline({self.geometric}, normalize={self.mean is not None})"


def crop_fraction(cfg: DataConfig, dc: dict) -> float:
    """Fraction of the shorter-side resized image the test transform's centre crop keeps (1.0: the whole
    shorter side; with `resize: resize` the image is squashed to a square instead)."""
    if cfg.resize == "resize":
        return 1.0
    if cfg.resize == "resize_crop":
        return 0.875
    return min(float(dc.get("crop_pct", 1.0)), 1.0)


def build_transforms(cfg: DataConfig, dc: dict) -> tuple[Pipeline, Pipeline]:
    """(train, test) pipelines. `dc`: size, mean, std, interpolation, crop_pct of the backbone."""
    size, interp = dc["size"], _interp(dc["interpolation"])
    if cfg.resize == "resize":
        resize = [T.Resize((size, size), interpolation=interp)]
    else:
        # timm's and CLIP's eval transform: shorter side to size / crop_pct, then a centre crop. With crop_pct 1
        # (CLIP) this is Resize(224) + CenterCrop(224), which keeps the aspect ratio of non-square images.
        pct = crop_fraction(cfg, dc)
        resize = [T.Resize(int(math.floor(size / pct)), interpolation=interp), T.CenterCrop(size)]
    norm = (dc["mean"], dc["std"]) if cfg.normalize else (None, None)
    test = Pipeline(resize, *norm)
    if cfg.train_augment == "none":
        geo, rnd = resize, False
    elif cfg.train_augment == "flip":
        geo, rnd = resize + [T.RandomHorizontalFlip()], True
    elif cfg.train_augment == "crop_flip":
        geo, rnd = [T.Resize((size, size), interpolation=interp), T.RandomCrop(size, padding=max(size // 8, 1)),
                    T.RandomHorizontalFlip()], True
    else:  # rrc_flip
        geo, rnd = [T.RandomResizedCrop(size, scale=tuple(cfg.rrc_scale), interpolation=interp),
                    T.RandomHorizontalFlip()], True
    return Pipeline(geo, *norm, random=rnd), test
