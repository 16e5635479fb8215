"""iCaRL's exemplar selection by herding (Rebuffi et al., CVPR 2017, Algorithm 4), and a memory of one herded
set per task that shrinks by keeping prefixes (Algorithm 5), over `cl.memory.EpisodicMemory`'s rows.

Herding picks, one at a time, the sample whose addition brings the mean of the picked features closest to the
mean of all features: p_k = argmin_x || mu - (x + sum_{j<k} p_j) / k ||. The order matters: the first m of a set
are its best m, so reducing a set to a smaller share keeps a prefix.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from .memory import EpisodicMemory, balanced_quota

GROUP = -1  # the class slot of a task's group in `EpisodicMemory.candidates`: one set per task, labels unused


def herding_order(features: torch.Tensor, m: int) -> np.ndarray:
    """Indices of `m` rows of `features` (n, d), in herding order, on L2-normalised features."""
    f = F.normalize(features.double(), dim=-1)
    mu = f.mean(0)
    free = torch.ones(len(f), dtype=torch.bool)
    picked, total = [], torch.zeros_like(mu)
    for k in range(1, min(m, len(f)) + 1):
        d = ((mu - (f + total) / k) ** 2).sum(-1)
        d[~free] = float("inf")
        i = int(d.argmin())
        picked.append(i)
        free[i] = False
        total += f[i]
    return np.asarray(picked, dtype=np.int64)


def keep_herded(memory: EpisodicMemory, task_index: int, pool_rows: np.ndarray, capacity: int) -> None:
    """Add task `task_index`'s set (pool rows in herding order) and share `capacity` equally among the tasks
    seen (each keeps the prefix of its order that fits; a task with fewer rows leaves its share to the others)."""
    memory.candidates[(task_index, GROUP)] = np.asarray(pool_rows, dtype=np.int64)[:capacity]
    quota = balanced_quota({g: len(r) for g, r in memory.candidates.items()}, capacity)
    memory.rows = np.concatenate([memory.candidates[g][:quota[g]] for g in sorted(memory.candidates)]
                                 + [np.zeros(0, dtype=np.int64)])
