"""A run folder's results.json, read and checked at the boundary: `loracl compare`, `report`, `export` and
`predict` read it through here, so a file that parses but has the wrong shape (a list, a missing key, a string
where a number goes, matrices of the wrong size) is one error line naming the file and the key, not a traceback
somewhere later."""

from __future__ import annotations

import json
import math
from pathlib import Path

from ..errors import LoraclError


def _number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _maybe_number(v) -> bool:
    return v is None or _number(v)


def _numbers(v, n: int | None = None) -> bool:
    return isinstance(v, list) and (n is None or len(v) == n) and all(_maybe_number(x) for x in v)


def _matrix(v, n: int) -> bool:
    return isinstance(v, list) and len(v) == n and all(_numbers(row, n) for row in v)


def check_results(r, where: Path) -> dict:
    """`r` if it has the shape loracl writes, else LoraclError naming the first key that does not."""
    def bad(key: str, want: str):
        raise LoraclError(f"{where}: '{key}' must be {want}; the file is damaged or not a loracl results.json")

    if not isinstance(r, dict):
        bad("(top level)", "a JSON object")
    for key in ("method", "benchmark", "status"):
        if not isinstance(r.get(key), str):
            bad(key, "a string")
    if not isinstance(r.get("seed"), int) or isinstance(r.get("seed"), bool):
        bad("seed", "an integer")
    tasks = r.get("tasks")
    if not isinstance(tasks, list) or not tasks:
        bad("tasks", "a non-empty list")
    for i, t in enumerate(tasks):
        if not isinstance(t, dict) or not isinstance(t.get("name"), str):
            bad(f"tasks[{i}]", "an object with a name")
        if not isinstance(t.get("class_ids"), list) or not isinstance(t.get("class_names"), list) or \
                len(t["class_ids"]) != len(t["class_names"]):
            bad(f"tasks[{i}]", "an object with class_ids and class_names of equal length")
        if not isinstance(t.get("test_size", 0), int):
            bad(f"tasks[{i}].test_size", "an integer")
    T = len(tasks)
    if not _matrix(r.get("acc_matrix"), T):
        bad("acc_matrix", f"a {T} x {T} matrix of numbers or null")
    if r.get("acc_matrix_task_aware") is not None and not _matrix(r["acc_matrix_task_aware"], T):
        bad("acc_matrix_task_aware", f"a {T} x {T} matrix of numbers or null")
    metrics = r.get("metrics")
    if not isinstance(metrics, dict) or not all(isinstance(k, str) and _maybe_number(v) for k, v in metrics.items()):
        bad("metrics", "an object of numbers or null")
    cost = r.get("cost", {})
    if not isinstance(cost, dict):
        bad("cost", "an object")
    for key in ("train_seconds_per_task", "train_flops_per_task"):
        if key in cost and not _numbers(cost[key], T):
            bad(f"cost.{key}", f"a list of {T} numbers or null")
    return r


def read_results(run_dir: Path) -> dict:
    """results.json of a run folder, parsed and checked."""
    p = Path(run_dir) / "results.json"
    if not p.is_file():
        raise LoraclError(f"{run_dir} is not a run folder (no results.json)")
    try:
        r = json.loads(p.read_text())
    except (OSError, ValueError) as e:
        raise LoraclError(f"cannot read {p}: {e}") from None
    return check_results(r, p)
