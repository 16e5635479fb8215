"""Continual-learning metrics from the accuracy matrix.

`a[j][i]` is the accuracy (percent) on task i after training task j; None where it is not defined (a
class-incremental task not yet seen) or not measured. `n[i]` is task i's test size. `b[i]`, if given, is
the accuracy of the model before any training (zero-shot), used by forward transfer.
"""

from __future__ import annotations

import math
from typing import Optional

Matrix = list[list[Optional[float]]]


def _mean(xs):
    xs = [x for x in xs if x is not None]
    return sum(xs) / len(xs) if xs else None


def _row_complete(a: Matrix, j: int, upto: int) -> bool:
    return all(a[j][i] is not None for i in range(upto + 1))


def weighted_acc(a: Matrix, n: list[int], j: int, upto: int) -> Optional[float]:
    """Sample-weighted accuracy after task j over tasks 0..upto (top-1 over all their test samples)."""
    if not _row_complete(a, j, upto):
        return None
    tot = sum(n[: upto + 1])
    return sum(a[j][i] * n[i] for i in range(upto + 1)) / tot


def task_avg_acc(a: Matrix, j: int, upto: int) -> Optional[float]:
    if not _row_complete(a, j, upto):
        return None
    return sum(a[j][i] for i in range(upto + 1)) / (upto + 1)


def final_acc(a: Matrix, n: list[int]) -> Optional[float]:
    T = len(a)
    return weighted_acc(a, n, T - 1, T - 1)


def final_acc_task_avg(a: Matrix) -> Optional[float]:
    T = len(a)
    return task_avg_acc(a, T - 1, T - 1)


def avg_inc_acc(a: Matrix, n: list[int], weighted: bool = True) -> Optional[float]:
    """Mean over t of A_t, the accuracy over tasks 0..t after task t (InfLoRA's Abar_T)."""
    vals = [weighted_acc(a, n, t, t) if weighted else task_avg_acc(a, t, t) for t in range(len(a))]
    return None if any(v is None for v in vals) else sum(vals) / len(vals)


def learning_acc(a: Matrix) -> Optional[float]:
    """Learning accuracy (Riemer et al., ICLR 2019): mean over tasks of a[i][i], each task's accuracy right
    after it is learned. How well a method learns, apart from what it forgets later (plasticity)."""
    diag = [a[i][i] for i in range(len(a))]
    return None if not diag or any(x is None for x in diag) else sum(diag) / len(diag)


def forgetting(a: Matrix) -> Optional[float]:
    """Mean over old tasks of (best accuracy before the last task) - (final accuracy) (Chaudhry et al. 2018)."""
    T = len(a)
    if T < 2:
        return 0.0
    out = []
    for i in range(T - 1):
        prev = [a[j][i] for j in range(i, T - 1) if a[j][i] is not None]
        if not prev or a[T - 1][i] is None:
            return None
        out.append(max(prev) - a[T - 1][i])
    return sum(out) / len(out)


def bwt(a: Matrix) -> Optional[float]:
    """Backward transfer: mean over old tasks of a[T-1][i] - a[i][i] (Lopez-Paz & Ranzato 2017)."""
    T = len(a)
    if T < 2:
        return 0.0
    vals = [None if a[T - 1][i] is None or a[i][i] is None else a[T - 1][i] - a[i][i] for i in range(T - 1)]
    return None if any(v is None for v in vals) else sum(vals) / len(vals)


def fwt(a: Matrix, b: Optional[list[Optional[float]]]) -> Optional[float]:
    """Forward transfer: mean over i >= 1 of a[i-1][i] - b[i] (b: accuracy before any training)."""
    T = len(a)
    if T < 2 or b is None:
        return None
    vals = [None if a[i - 1][i] is None or b[i] is None else a[i - 1][i] - b[i] for i in range(1, T)]
    return None if any(v is None for v in vals) else sum(vals) / len(vals)


def transfer(a: Matrix) -> Optional[float]:
    """MTIL Transfer: mean over i >= 1 of the mean over j < i of a[j][i] (accuracy before training on i)."""
    T = len(a)
    per = []
    for i in range(1, T):
        col = [a[j][i] for j in range(i)]
        if any(x is None for x in col):
            return None
        per.append(sum(col) / len(col))
    return sum(per) / len(per) if per else None


def average(a: Matrix) -> Optional[float]:
    """MTIL Average: mean over tasks i of the mean over every step j of a[j][i]."""
    T = len(a)
    per = []
    for i in range(T):
        col = [a[j][i] for j in range(T)]
        if any(x is None for x in col):
            return None
        per.append(sum(col) / T)
    return sum(per) / T


def last(a: Matrix) -> Optional[float]:
    """MTIL Last: mean over tasks of the accuracy after the final task."""
    row = a[-1]
    return None if any(x is None for x in row) else sum(row) / len(row)


def all_metrics(a: Matrix, n: list[int], kind: str, before: Optional[list] = None) -> dict:
    out = {
        "final_acc": final_acc(a, n),
        "final_acc_task_avg": final_acc_task_avg(a),
        "avg_inc_acc": avg_inc_acc(a, n, weighted=True),
        "avg_inc_acc_task_avg": avg_inc_acc(a, n, weighted=False),
        "learning_acc": learning_acc(a),
        "forgetting": forgetting(a),
        "bwt": bwt(a),
        "fwt": fwt(a, before),
    }
    if kind == "cross-dataset":
        out.update(transfer=transfer(a), average=average(a), last=last(a))
    return {k: (None if v is None or (isinstance(v, float) and math.isnan(v)) else round(v, 4))
            for k, v in out.items()}
