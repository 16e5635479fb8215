"""Random images for benchmarks when a preset's data is absent: real `ImageSet`s whose images are decoded
like any other (PIL RGB, uint8), so both data paths do their full work on them.

Each image is drawn from its own seed (source seed, index), so a set is the same in every process and
every run, and only the images asked for are ever generated.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

from .datasets import ImageSet, ImageSource
from .scenarios import Scenario, Task


class RandomSource(ImageSource):
    """Image i: uniform random uint8 pixels, `size` x `size`, from seed (seed, i)."""

    def __init__(self, size: int, seed: int = 0, name: str = "synthetic"):
        self.size, self.seed = size, seed
        self.name = f"{name}-{size}px-seed{seed}"

    def load(self, index: int) -> Image.Image:
        rng = np.random.default_rng((self.seed, index))
        return Image.fromarray(rng.integers(0, 256, (self.size, self.size, 3), dtype=np.uint8), "RGB")


def synthetic_scenario(num_tasks: int, classes_per_task: int, train_per_task: int, test_per_task: int,
                       size: int, seed: int = 0) -> Scenario:
    """A class-incremental scenario of random images with labels cycling over each task's classes."""
    tasks, names = [], []
    for t in range(num_tasks):
        ids = list(range(t * classes_per_task, (t + 1) * classes_per_task))
        cls = [f"class{c}" for c in ids]
        names += cls
        sets = []
        for part, n in (("train", train_per_task), ("test", test_per_task)):
            targets = ids[0] + np.arange(n) % classes_per_task
            sets.append(ImageSet.from_source(RandomSource(size, seed * 1000 + 2 * t + (part == "test"),
                                                          name=f"synthetic-{part}"), targets))
        tasks.append(Task(t, f"task{t}", ids, cls, sets[0], sets[1], dataset="synthetic"))
    return Scenario("class-incremental", "synthetic", tasks, names)
