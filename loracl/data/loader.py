"""Deterministic, resumable data loading.

The order of an epoch is a permutation drawn from (seed, task, epoch, phase), and every sample's random
augmentation is drawn from its own seed, so a run resumed at batch k of an epoch sees exactly the images,
in exactly the augmentations, that the uninterrupted run saw, whatever the number of loader workers.
Under torchrun each process takes its share of every (global) batch of the same order.
"""

from __future__ import annotations

import hashlib

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from .. import dist
from .datasets import ImageSet


def derive_seed(*parts) -> int:
    h = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return int.from_bytes(h, "little") & 0x7FFF_FFFF_FFFF_FFFF


class TransformedSet(Dataset):
    """Item key (row, sample_seed) -> (image tensor, global target, row)."""

    def __init__(self, images: ImageSet, transform):
        self.images, self.transform = images, transform

    def __len__(self):
        return len(self.images)

    def __getitem__(self, key):
        row, seed = key if isinstance(key, tuple) else (key, None)
        img = self.images.image(row)
        if seed is None:
            x = self.transform(img)
        else:
            # only the CPU generator: torch.manual_seed would also queue a CUDA seeding (with a stack trace)
            with torch.random.fork_rng(devices=[]):
                torch.default_generator.manual_seed(seed)
                x = self.transform(img)
        return x, int(self.images.targets[row]), row


class EpochBatches(Sampler):
    """Batches of (row, sample_seed) of one epoch, starting at batch `start`.

    `batch_size` is the global batch: under torchrun each process takes its contiguous share of every
    batch, so a run on N processes sees the same batches, with the same augmentations, as on one.
    `equal_steps` (training) gives a process with nothing left in a short last batch one repeated
    sample, so that every process takes the same number of steps; otherwise it skips the batch.
    """

    def __init__(self, n: int, batch_size: int, seed: int, shuffle: bool, start: int = 0,
                 drop_last: bool = False, augment: bool = True, equal_steps: bool = False, split: bool = True):
        self.n, self.bs, self.seed, self.shuffle = n, batch_size, seed, shuffle
        self.start, self.drop_last, self.augment, self.equal_steps = start, drop_last, augment, equal_steps
        self.split = split  # False: every process reads every batch whole (decoding a data set once per process)

    def order(self) -> torch.Tensor:
        if not self.shuffle:
            return torch.arange(self.n)
        return torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed))

    def num_batches(self) -> int:
        full, rest = divmod(self.n, self.bs)
        return full + (0 if self.drop_last or rest == 0 else 1)

    def __len__(self):
        return max(self.num_batches() - self.start, 0)

    def shares(self):
        """(batch index, this process's rows, their offset in the global batch, the global batch's size)."""
        order = self.order().tolist()
        for b in range(self.start, self.num_batches()):
            chunk = order[b * self.bs:(b + 1) * self.bs]
            part = dist.share(len(chunk)) if self.split else slice(0, len(chunk))
            lo, mine = part.start, chunk[part]
            if not mine:
                if not self.equal_steps:
                    continue
                mine, lo = chunk[-1:], len(chunk) - 1
            yield b, mine, lo, len(chunk)

    def __iter__(self):
        for b, mine, lo, _ in self.shares():
            if self.augment:
                yield [(r, derive_seed(self.seed, b * self.bs + lo + j)) for j, r in enumerate(mine)]
            else:
                yield [(r, None) for r in mine]


def make_loader(images: ImageSet, transform, batch_size: int, *, seed: int = 0, shuffle: bool = False,
                start: int = 0, num_workers: int = 0, augment: bool = True, pin_memory: bool = False,
                drop_last: bool = False, equal_steps: bool = False, split: bool = True) -> DataLoader:
    sampler = EpochBatches(len(images), batch_size, seed, shuffle, start, drop_last, augment, equal_steps, split)
    # an own generator: without one, every new iterator draws its base seed from the global RNG, so a run
    # resumed mid-epoch (global RNG restored, then a new iterator) would draw dropout / replay samples
    # from a shifted stream
    return DataLoader(TransformedSet(images, transform), batch_sampler=sampler, num_workers=num_workers,
                      pin_memory=pin_memory, persistent_workers=False,
                      generator=torch.Generator().manual_seed(seed & 0x7FFF_FFFF))
