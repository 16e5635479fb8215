"""Episodic memories of rehearsal methods (experience replay, A-GEM, task arithmetic's fine-tuning memory).

A memory keeps *rows*, never images: indices into the scenario's pool (every task's training set, concatenated
in task order). Images are decoded and augmented when a batch is drawn, so a memory costs a few integers per
sample in a checkpoint and resumes exactly.

Selection policies:
- class-balanced: every seen class gets an equal share of the capacity (or a fixed `k` per class); each class
  keeps one seeded random order of its candidates, so shrinking a class keeps a prefix of it.
- reservoir: Vitter's algorithm R over the training stream (Chaudhry et al. 2019, "On tiny episodic memories").
- random per task: `k` uniformly drawn rows of each task (A-GEM's patterns per experience).
"""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import torch

from ..data.datasets import ImageSet
from ..data.loader import TransformedSet


def balanced_quota(available: dict, capacity: int | None = None, per_class: int | None = None) -> dict:
    """How many samples each group (class) keeps: `per_class` each, or an equal share of `capacity`
    (water-filling: a group with fewer candidates keeps all of them and its unused share goes to the others;
    the remainder of an uneven split goes to the smallest keys)."""
    if (capacity is None) == (per_class is None):
        raise ValueError("give exactly one of capacity and per_class")
    if per_class is not None:
        return {c: min(n, per_class) for c, n in available.items()}
    quota = {c: 0 for c in available}
    open_ = sorted(c for c, n in available.items() if n > 0)
    left = capacity
    while open_ and left > 0:
        share, extra = divmod(left, len(open_))
        nxt = []
        for k, c in enumerate(open_):
            want = share + (1 if k < extra else 0)
            take = min(want, available[c] - quota[c])
            quota[c] += take
            left -= take
            if quota[c] < available[c]:
                nxt.append(c)
        open_ = nxt
    return quota


class EpisodicMemory:
    """Rows of the scenario's training pool kept for rehearsal, with the policies above."""

    def __init__(self, tasks):
        self.task_sets = [t.train for t in tasks]
        self.pool = ImageSet.concat(self.task_sets)
        self.offsets = np.cumsum([0] + [len(t.train) for t in tasks])
        self.rows = np.zeros(0, dtype=np.int64)
        self.candidates: dict[tuple[int, int], np.ndarray] = {}  # (task, class) -> rows, seeded order
        self.stream_seen = 0  # reservoir: samples of the stream offered so far

    @classmethod
    def over(cls, images: ImageSet) -> "EpisodicMemory":
        """A memory over one image set that is not a task of the scenario (a reference set), to draw batches from."""
        return cls([SimpleNamespace(train=images)])

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def targets(self) -> np.ndarray:
        return self.pool.targets[self.rows]

    def images(self) -> ImageSet:
        """The memory as an ImageSet (for a training phase over it, e.g. task arithmetic's fine-tuning)."""
        return self.pool.subset(self.rows)

    def pool_rows(self, task_index: int, rows) -> np.ndarray:
        """Pool indices of rows of task `task_index`'s training set."""
        return self.offsets[task_index] + np.asarray(rows, dtype=np.int64)

    def per_class(self) -> dict[int, int]:
        cls, n = np.unique(self.targets, return_counts=True)
        return {int(c): int(k) for c, k in zip(cls, n)}

    # ---- policies ----------------------------------------------------------------------------------
    def add_class_balanced(self, task, seed: int, capacity: int | None = None, per_class: int | None = None):
        """Offer task `task`'s training set; keep a class-balanced memory of `capacity` rows in all, or
        `per_class` rows of every class seen. Groups are (task, class), so a class met again in a later task
        (domain-incremental) is balanced over the tasks it came from."""
        rng = np.random.default_rng(seed)
        targets = task.train.targets
        keep = capacity if capacity is not None else per_class  # no group ever needs more candidates
        for c in sorted(set(int(x) for x in targets)):
            rows = np.nonzero(targets == c)[0]
            self.candidates[(task.index, c)] = self.pool_rows(task.index, rng.permutation(rows))[:keep]
        quota = balanced_quota({g: len(r) for g, r in self.candidates.items()}, capacity, per_class)
        self.rows = np.concatenate([self.candidates[g][:quota[g]] for g in sorted(self.candidates)]
                                   + [np.zeros(0, dtype=np.int64)])

    def add_random(self, task, k: int, seed: int) -> None:
        """Keep `k` uniformly drawn rows of `task` (A-GEM: patterns per experience), in addition to earlier ones."""
        rng = np.random.default_rng(seed)
        rows = np.sort(rng.permutation(len(task.train))[:k])
        self.rows = np.concatenate([self.rows, self.pool_rows(task.index, rows)])

    def add_reservoir(self, pool_rows, capacity: int, generator: torch.Generator | None = None) -> None:
        """Algorithm R: the n-th sample of the stream replaces a random slot with probability capacity / n."""
        rows = list(self.rows)
        for r in np.asarray(pool_rows, dtype=np.int64).tolist():
            self.stream_seen += 1
            if len(rows) < capacity:
                rows.append(r)
            else:
                j = int(torch.randint(self.stream_seen, (1,), generator=generator))
                if j < capacity:
                    rows[j] = r
        self.rows = np.asarray(rows, dtype=np.int64)

    # ---- drawing batches ---------------------------------------------------------------------------
    def sample(self, m: int, generator: torch.Generator | None = None) -> np.ndarray:
        """`m` distinct memory rows drawn uniformly (fewer if the memory is smaller)."""
        m = min(m, len(self.rows))
        pick = torch.randperm(len(self.rows), generator=generator)[:m].numpy()
        return self.rows[pick]

    def load(self, rows: np.ndarray, transform, generator: torch.Generator | None = None, keep: slice = slice(None)):
        """(uint8 images, global targets) of pool `rows[keep]`, each augmented with its own seed. The seeds
        are drawn for all `rows`, so a process loading its share draws what a single process would."""
        ts = TransformedSet(self.pool, transform)
        seeds = torch.randint(2 ** 62, (len(rows),), generator=generator).tolist()[keep]
        rows = rows[keep]
        xs = [ts[(int(r), s)][0] for r, s in zip(rows, seeds)]
        return torch.stack(xs), torch.as_tensor(self.pool.targets[rows], dtype=torch.long)

    def gather(self, rows: np.ndarray, decoded_rows) -> torch.Tensor | None:
        """uint8 images of pool `rows`, in order, gathered from each task's decoded training set with
        `decoded_rows(train_set, local_rows)` (the run's tensor pipeline); None where a task's set is not
        decoded or the sets are stored at different sizes (then `load` reads them with PIL)."""
        task_of = np.searchsorted(self.offsets, rows, side="right") - 1
        out = None
        for t in np.unique(task_of):
            sel = np.nonzero(task_of == t)[0]
            part = decoded_rows(self.task_sets[t], rows[sel] - self.offsets[t])
            if part is None or (out is not None and part.shape[1:] != out.shape[1:]):
                return None
            if out is None:
                out = part.new_empty((len(rows),) + tuple(part.shape[1:]))
            out[torch.as_tensor(sel, device=part.device)] = part
        return out

    # ---- resume ------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {"rows": self.rows.copy(), "candidates": {c: r.copy() for c, r in self.candidates.items()},
                "stream_seen": self.stream_seen}

    def load_state_dict(self, s: dict) -> None:
        self.rows = np.asarray(s["rows"], dtype=np.int64)
        self.candidates = {(int(g[0]), int(g[1])): np.asarray(r, dtype=np.int64) for g, r in s["candidates"].items()}
        self.stream_seen = int(s["stream_seen"])
