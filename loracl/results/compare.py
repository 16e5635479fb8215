"""`loracl compare`: a table of finished runs, mean +- std over seeds, with cost ratios."""

from __future__ import annotations

import hashlib
import json
import os
import statistics
from pathlib import Path

from ..errors import LoraclError
from .runfile import read_results

COLUMNS = [
    ("final_acc", "final acc"),
    ("final_acc_task_avg", "final acc (task avg)"),
    ("final_acc_task_aware", "task-aware final acc"),
    ("avg_inc_acc", "avg inc acc"),
    ("learning_acc", "learning acc"),
    ("learning_acc_task_aware", "task-aware learning acc"),
    ("forgetting", "forgetting"),
    ("bwt", "BWT"),
    ("transfer", "Transfer"),
    ("average", "Average"),
    ("last", "Last"),
    ("pretrained_retention", "pretrained retention"),
]


def find_runs(dirs: list[Path]) -> list[Path]:
    runs = []
    for d in dirs:
        if not d.exists():
            raise LoraclError(f"no such folder: {d}")
        if (d / "results.json").exists():
            runs.append(d)
        else:
            runs.extend(sorted(p.parent for p in d.rglob("results.json")))
    if not runs:
        raise LoraclError(f"no results.json under {', '.join(map(str, dirs))}")
    return runs


def _config_key(run: Path) -> str:
    """What a run computed, as a hash of its config: read through today's config model, so a run written
    before a key existed (and so at its default) groups with later runs of the same experiment."""

    from ..runs.assembly import load_config

    p = run / "config.yaml"
    if not p.exists():
        return ""
    try:
        cfg = load_config(p).model_dump(mode="json")
    except LoraclError:  # a config of an older or newer loracl: compare it as written
        cfg = _raw_config(run)
    for k in ("seed", "out", "data_root", "weights_root", "threads", "device", "tensorboard", "published"):
        cfg.pop(k, None)
    # execution settings that do not change what is computed: runs differing only here are one group
    section = lambda k: cfg[k] if isinstance(cfg.get(k), dict) else {}  # noqa: E731
    for k in ("eval_batch_size", "num_workers", "cache_dir", "host_cache_mb", "device_cache_mb"):
        section("data").pop(k, None)
    section("eval").pop("cache_mb", None)
    section("train").pop("compile", None)
    section("train").pop("ddp_find_unused", None)
    return hashlib.sha1(json.dumps(cfg, sort_keys=True, default=str).encode()).hexdigest()[:8]


def _derive_metrics(r: dict) -> None:
    """Metrics that are functions of the stored accuracy matrices alone, filled in for runs written before
    loracl reported them (so old and new seeds of one experiment compare on every column)."""
    from .metrics import learning_acc

    m = r["metrics"]
    for key, matrix in (("learning_acc", "acc_matrix"), ("learning_acc_task_aware", "acc_matrix_task_aware")):
        if m.get(key) is None and r.get(matrix) is not None:
            v = learning_acc(r[matrix])
            m[key] = None if v is None else round(v, 4)


def _mean_std(xs):
    xs = [x for x in xs if x is not None]
    if not xs:
        return None, None
    return statistics.fmean(xs), (statistics.stdev(xs) if len(xs) > 1 else None)  # no spread from one seed


def summarize(runs: list[Path]) -> list[dict]:
    groups: dict[tuple, list[dict]] = {}
    where: dict[tuple, set] = {}
    configs: dict[tuple, dict] = {}
    for run in runs:
        r = read_results(run)
        if r.get("status") != "complete":
            continue
        _derive_metrics(r)
        key = (r["benchmark"], r["method"], _config_key(run))
        groups.setdefault(key, []).append(r)
        where.setdefault(key, set()).add(run.parent.name if run.name.startswith("seed") else run.name)
        configs.setdefault(key, _raw_config(run))
    by_method: dict[tuple, int] = {}
    for b, m, _ in groups:
        by_method[(b, m)] = by_method.get((b, m), 0) + 1
    rows = []
    for key, rs in groups.items():
        b, m, _ = key
        label = m if by_method[(b, m)] == 1 else f"{m} ({'/'.join(sorted(where[key]))})"
        row = {"benchmark": b, "method": label, "seeds": sorted(r["seed"] for r in rs), "metrics": {},
               "base_method": m, "config": configs[key]}
        for k, _ in COLUMNS:
            row["metrics"][k] = _mean_std([r["metrics"].get(k) for r in rs])
        secs = [sum(x or 0 for x in r["cost"]["train_seconds_per_task"]) / max(sum(1 for x in r["cost"]["train_seconds_per_task"] if x), 1) for r in rs]
        flops = [sum(x or 0 for x in r["cost"]["train_flops_per_task"]) for r in rs]
        row["seconds_per_task"] = _mean_std(secs)
        row["total_flops"] = _mean_std(flops)
        rows.append(row)
    rows.sort(key=lambda r: (r["benchmark"], r["method"]))
    return rows


def _cell(ms, nd=2):
    m, s = ms
    if m is None:
        return "–"
    return f"{m:.{nd}f}" if s is None else f"{m:.{nd}f} ± {s:.{nd}f}"


# the columns a newcomer reads first (`loracl demo` prints these; the written comparison has every column)
FIRST_COLUMNS = ("final_acc", "forgetting", "transfer", "last", "pretrained_retention")


def render(rows: list[dict], ref: str | None = None, columns: tuple[str, ...] | None = None) -> str:
    used = [(k, h) for k, h in COLUMNS if any(r["metrics"][k][0] is not None for r in rows)
            and (columns is None or k in columns)]
    head = ["benchmark", "method", "seeds"] + [h for _, h in used] + ["train s/task", "train TFLOPs (all tasks)",
                                                                      "FLOPs ratio"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for bench in sorted({r["benchmark"] for r in rows}):
        rs = [r for r in rows if r["benchmark"] == bench]
        base = next((r for r in rs if ref and r["method"] == ref), None)
        if ref and base is None:
            raise LoraclError(f"compare --ref {ref}: no run of '{ref}' on {bench} (methods there: "
                              f"{', '.join(r['method'] for r in rs)})")
        base = base or rs[0]
        bf = base["total_flops"][0]
        for r in rs:
            f = r["total_flops"][0]
            ratio = f"{f / bf:.2f}x" if f and bf else "–"
            cells = [bench, r["method"], ",".join(map(str, r["seeds"]))]
            cells += [_cell(r["metrics"][k]) for k, _ in used]
            cells += [_cell(r["seconds_per_task"], 1), _cell((f / 1e12 if f else None, r["total_flops"][1] / 1e12 if r["total_flops"][1] is not None else None), 3),
                      ratio]
            lines.append("| " + " | ".join(cells) + " |")
    note = f"FLOPs ratio: relative to {'`' + ref + '`' if ref else 'the first row of each benchmark'}; " \
           "mean ± std over seeds; accuracies in %."
    return "\n".join(lines) + "\n\n" + note


def _raw_config(run: Path) -> dict:
    import yaml

    try:
        cfg = yaml.safe_load((run / "config.yaml").read_text()) or {}
    except (OSError, ValueError):
        return {}
    return cfg if isinstance(cfg, dict) else {}  # not a config: compared as if it had none


def _published_of(cfg: dict) -> list[dict]:
    """The published rows a run's config carries, or (a run made before configs carried them) its preset's,
    each checked as the config checks them (a row without a value is one error line, not a traceback)."""
    from pydantic import ValidationError

    from ..config import PublishedRow
    from ..runs.assembly import PRESET_DIR, load_doc

    if "published" in cfg:
        rows = cfg["published"] or []
    else:
        p = PRESET_DIR / f"{cfg.get('name', '')}.yaml"
        try:
            rows = (load_doc(p).get("published") or []) if p.is_file() else []
        except LoraclError:
            rows = []
    if not isinstance(rows, list):
        raise LoraclError(f"config '{cfg.get('name', '?')}': 'published' must be a list of rows")
    out = []
    for i, row in enumerate(rows):
        try:
            out.append(PublishedRow.model_validate(row).model_dump())
        except ValidationError as e:
            err = e.errors()[0]
            raise LoraclError(f"config '{cfg.get('name', '?')}': published[{i}]."
                              f"{'.'.join(map(str, err['loc'])) or '(row)'}: {err['msg']}") from None
    return out


def _dotted(cfg: dict, key: str):
    for k in key.split("."):
        cfg = cfg.get(k) if isinstance(cfg, dict) else None
    return cfg


def render_published(rows: list[dict]) -> str:
    """Each benchmark's published numbers beside the measured mean +- std of the runs they describe."""
    lines = []
    for bench in sorted({r["benchmark"] for r in rows}):
        rs = [r for r in rows if r["benchmark"] == bench]
        pubs, seen = [], set()
        for r in rs:
            for p in _published_of(r["config"]):
                key = json.dumps(p, sort_keys=True)
                if key not in seen:
                    seen.add(key)
                    pubs.append(p)
        for p in pubs:
            when = p.get("when") or {}
            pv = f"{p['value']:.2f}" + (f" ± {p['std']:.2f}" if p.get("std") is not None else "")
            cond = f" ({', '.join(f'{k}={v}' for k, v in when.items())})" if when else ""
            match = [r for r in rs if r["base_method"] == p["method"]
                     and all(_dotted(r["config"], k) == v for k, v in when.items())]
            for r in match or [None]:
                ms = r["metrics"].get(p["metric"], (None, None)) if r else (None, None)
                diff = f"{ms[0] - p['value']:+.2f}" if ms[0] is not None else "–"
                lines.append(f"| {bench} | {r['method'] if r else p['method']}{cond} | {p['metric']} | {pv} | "
                             f"{_cell(ms)} | {diff} | {p['source']} |")
    if not lines:
        return ""
    head = "| benchmark | method | metric | published | measured | difference | source |"
    return "\n".join(["Published beside measured (difference: measured mean - published; – : not run here)", "",
                      head, "|" + "---|" * 7] + lines)


def compare(dirs: list[Path], out: Path | None = None, ref: str | None = None, first_columns: bool = False) -> str:
    """The table of the runs under `dirs` (written to `out` in full, with a .json beside it); `first_columns`:
    the text returned holds only the columns a newcomer reads first."""
    runs = find_runs(dirs)
    rows = summarize(runs)
    if not rows:
        raise LoraclError("no complete runs to compare (results.json with status 'complete')")
    text = render(rows, ref)
    pub = render_published(rows)
    if pub:
        text += "\n\n" + pub
    if out is None:
        common = Path(os.path.commonpath([str(p.resolve()) for p in runs]))
        out = (common if common.is_dir() else common.parent) / "comparison.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text + "\n")
    out.with_suffix(".json").write_text(json.dumps([{k: v for k, v in r.items() if k != "config"} for r in rows],
                                                   indent=1))
    if first_columns:
        text = render(rows, ref, FIRST_COLUMNS) + (("\n\n" + pub) if pub else "")
        return text + f"\n\n(every column: {out})"
    return text + f"\n\n(written to {out})"
