"""`loracl export` and `loracl predict`: the trained model of a finished run, out of loracl and in use.

Both restore the finished run through its own method: a Runner over the run's tasks as `results.json` lists
them (no training images needed), set up and restored from the last task checkpoint, as a resume would.
`predict` then scores images with the method's own logits, reading and transforming them as evaluation does,
so it works for every method. `export` needs a method whose predictor is the model itself (declared in its
capabilities; modules it owns must fold into the branches): every branch is folded into its weight, and what
remains is a plain timm or open_clip model plus a classifier over the run's classes, written as files that load
without loracl:

- `model.safetensors` (timm) or `open_clip_model.safetensors` plus `open_clip_config.json` (open_clip's
  `local-dir:` layout): the backbone's state dict, keys as timm / open_clip name them; timm's holds the
  classifier as `head.weight` / `head.bias`, so `timm.create_model(**kwargs)` takes it as it is;
- `model.json`: how to build it (family, name, kwargs), the class names (row k of the head is class k),
  the head again as plain numbers and the test-time preprocessing in timm's data-config terms.
"""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from ..errors import LoraclError


def finished_run(run_dir: Path) -> dict:
    """results.json of a run that completed (checked: `results.runfile`), else one error line."""
    from ..results.runfile import read_results

    results = read_results(run_dir)
    if results.get("status") != "complete":
        raise LoraclError(f"run {run_dir} did not finish (results.json status '{results.get('status')}'); "
                          f"continue it with loracl run --resume --out {run_dir}")
    return results


def tasks_of(results: dict, where: Path) -> list[dict]:
    """The tasks results.json lists, checked: each with a name, and class ids and names of equal length."""
    tasks = results.get("tasks")
    ok = isinstance(tasks, list) and tasks
    for t in tasks if ok else []:
        ok = ok and isinstance(t, dict) and isinstance(t.get("class_ids"), list) and \
            isinstance(t.get("class_names"), list) and len(t["class_ids"]) == len(t["class_names"]) and \
            all(isinstance(i, int) and i >= 0 for i in t["class_ids"]) and \
            all(isinstance(n, str) for n in t["class_names"]) and \
            (t.get("class_keys") is None or (isinstance(t["class_keys"], list) and
                                             len(t["class_keys"]) == len(t["class_ids"]) and
                                             all(isinstance(n, str) for n in t["class_keys"])))
    if not ok:
        raise LoraclError(f"{where}: 'tasks' must list each task's class_ids and class_names (equal lengths)")
    return tasks


def class_table(results: dict, where: Path = Path("results.json"), keys: bool = False) -> tuple[list[int], list[str]]:
    """Every class id the run learnt, sorted, with its name (with `keys`: as the data names it, its folder)."""
    names: dict[int, str] = {}
    for t in tasks_of(results, where):
        for i, n in zip(t["class_ids"], (t.get("class_keys") or t["class_names"]) if keys else t["class_names"]):
            if names.setdefault(int(i), str(n)) != str(n):
                raise LoraclError(f"{where}: class {i} is named both '{names[int(i)]}' and '{n}'")
    ids = sorted(names)
    return ids, [names[i] for i in ids]


def scenario_of(results: dict, where: Path):
    """The run's scenario as results.json describes it: its tasks and classes, without images."""
    from ..data.datasets import FileSource, ImageSet
    from ..data.scenarios import Scenario, Task

    ids, names = class_table(results, where)
    table = [""] * (max(ids) + 1)
    for i, n in zip(ids, names):
        table[i] = n
    empty = ImageSet.from_source(FileSource([], "none"), [])
    tasks = [Task(k, str(t.get("name", f"task{k}")), [int(i) for i in t["class_ids"]], list(t["class_names"]),
                  empty, empty, dataset=str(t.get("dataset", ""))) for k, t in enumerate(tasks_of(results, where))]
    return Scenario(str(results.get("scenario", "class-incremental")), str(results.get("benchmark", "")), tasks,
                    table)


def restore_run(run_dir: Path, device: str = "cpu"):
    """The Runner of a finished run, its method set up and restored from its last task checkpoint."""
    from .assembly import load_config
    from .runner import Runner

    run_dir = Path(run_dir)
    results = finished_run(run_dir)
    cfg = load_config(run_dir / "config.yaml")
    cfg.device = device
    cfg.eval.retention = None
    scenario = scenario_of(results, run_dir / "results.json")
    last = len(scenario) - 1
    ckpt = run_dir / "checkpoints" / f"task_{last:02d}.pt"
    if not ckpt.is_file():
        raise LoraclError(f"run {run_dir} has no checkpoint of its last task ({ckpt})")
    runner = Runner(cfg, run_dir, resume=True, progress=False, log=lambda *a, **k: None, scenario=scenario)
    start, _ = runner.prepare()
    if start != len(scenario):
        raise LoraclError(f"the checkpoint of the last task, {ckpt}, is damaged (truncated, foreign or holding NaN "
                          f"or inf): run {run_dir} cannot be restored")
    saved = runner.record.results.get("tasks")  # the checkpoint's own copy of the run's class table
    if saved is not None and [(t.get("class_ids"), t.get("class_names")) for t in saved] != \
            [(t["class_ids"], t["class_names"]) for t in results["tasks"]]:
        raise LoraclError(f"{run_dir / 'results.json'}: its classes differ from those its last checkpoint was "
                          f"trained on; the file was edited or belongs to another run")
    runner.model.eval()
    return runner


def load_run_model(run_dir: Path, device: str = "cpu"):
    """(config, results, model with every branch merged, class ids, class names) of a finished run whose
    method exports as a plain model; else one error line saying why not."""
    run_dir = Path(run_dir)
    results = finished_run(run_dir)
    runner = restore_run(run_dir, device)
    cfg, model, cfg_method = runner.cfg, runner.model, runner.cfg.method_name
    if not runner.caps.export:
        raise LoraclError(f"method '{cfg_method}' does not predict with its model alone (its capabilities say so); "
                          f"loracl cannot export it as a plain timm / open_clip model. loracl predict works with it")
    for name, module in model.owned.items():
        # only modules whose whole effect is in the branches (SD-LoRA's magnitudes) go into a plain model
        if not getattr(module, "folds_into_branches", False):
            raise LoraclError(f"method '{cfg_method}' adds a module of its own ('{name}') to the model; loracl "
                              f"cannot export it as a plain timm / open_clip model. loracl predict works with it")
    if cfg.head.kind == "cosine":
        raise LoraclError(f"run {run_dir} scores classes with a cosine head (head.kind cosine); loracl cannot "
                          f"export it as a plain timm / open_clip model. loracl predict works with it")
    if model.adapter is not None:
        try:
            model.adapter.merge_all()
        except TypeError as e:  # a parallel adapter
            raise LoraclError(f"method '{cfg_method}' keeps branches that cannot be merged ({e})") from None
    model.owned = torch.nn.ModuleDict()
    ids, names = class_table(results, run_dir / "results.json")
    return cfg, results, model, ids, names


@torch.no_grad()
def head_matrix(model, ids: list[int]) -> tuple[torch.Tensor, torch.Tensor | None, bool]:
    """(weight N x D, bias N or None, whether features are L2-normalised first): logits = f @ W.T + b."""
    from ..models.heads import LinearHead, TextHead

    head, idx = model.head, torch.tensor(ids)
    if isinstance(head, LinearHead):
        w = torch.cat([c.weight for c in head.chunks])
        b = torch.cat([c.bias for c in head.chunks])
        cols = head.column_of.cpu()[idx]
        return w.cpu()[cols].float(), b.cpu()[cols].float(), False
    if isinstance(head, TextHead):
        emb = head.text_embeddings(idx.to(model.backbone.logit_scale.device))
        return (model.backbone.logit_scale.exp().float() * emb).cpu(), None, True
    raise LoraclError(f"head {type(head).__name__} cannot be exported")


def preprocessing(cfg, model) -> dict:
    """The test transform as timm data-config keys: `timm.data.create_transform(**it)` rebuilds it."""
    from ..data.transforms import crop_fraction

    dc = model.backbone.data_config()
    norm = cfg.data.normalize
    return {"input_size": [3, dc["size"], dc["size"]], "interpolation": dc["interpolation"],
            "mean": list(dc["mean"]) if norm else [0.0, 0.0, 0.0],
            "std": list(dc["std"]) if norm else [1.0, 1.0, 1.0],
            "crop_pct": crop_fraction(cfg.data, dc), "crop_mode": "squash" if cfg.data.resize == "resize" else "center"}


def export(run_dir: Path, out: Path | None = None) -> Path:
    from safetensors.torch import save

    from .files import write_file

    run_dir = Path(run_dir)
    cfg, results, model, ids, names = load_run_model(run_dir)
    root = Path(out) if out else run_dir  # the default export folder must stay inside the run folder
    out = Path(out) if out else run_dir / "export"
    w, b, normalized = head_matrix(model, ids)
    bb = model.backbone
    state = {k: v for k, v in bb.model.state_dict().items() if ".lora" not in k}
    kwargs = dict(cfg.backbone.kwargs)
    if bb.family == "timm":
        name = (getattr(bb.model, "pretrained_cfg", None) or {}).get("classifier") or "head"
        state[f"{name}.weight"], state[f"{name}.bias"] = w, b
        kwargs["num_classes"] = len(ids)
    meta = {"format": "loracl-export/1", "family": bb.family, "name": cfg.backbone.name, "kwargs": kwargs,
            "classes": names, "class_ids": ids, "class_keys": class_table(results, keys=True)[1],
            "head": {"weight": w.tolist(), "bias": None if b is None else b.tolist(),
                     "normalize_features": normalized},
            "preprocess": preprocessing(cfg, model),
            "source": {"run": str(run_dir.resolve()), "method": cfg.method_name, "benchmark": results["benchmark"],
                       "seed": cfg.seed, "final_acc": results["metrics"].get("final_acc")}}
    weights = "model.safetensors"
    if bb.family == "open_clip":
        # open_clip's own folder layout: create_model_and_transforms("local-dir:OUT") reads these two files
        from open_clip.factory import get_model_config

        weights = "open_clip_model.safetensors"
        p = meta["preprocess"]
        oc = {"model_cfg": get_model_config(cfg.backbone.name),
              "preprocess_cfg": {"size": p["input_size"][-1], "mean": p["mean"], "std": p["std"],
                                 "interpolation": p["interpolation"],
                                 "resize_mode": "squash" if p["crop_mode"] == "squash" else "shortest"}}
    meta["weights"] = weights
    try:
        if root is run_dir:
            from .files import check_inside

            check_inside(run_dir, out / "model.json")
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise LoraclError(f"cannot write the export to {out}: {e.strerror or e}") from None
    # every file a fresh one renamed into place: a symlink planted in the folder is replaced, not written through
    write_file(out / weights, save({k: v.detach().cpu().contiguous().clone() for k, v in state.items()}), root=root)
    write_file(out / "model.json", json.dumps(meta, indent=1), root=root)
    if bb.family == "open_clip":
        write_file(out / "open_clip_config.json", json.dumps(oc, indent=1), root=root)
    return out


# ------------------------------------------------------------------------------------------------
# predict


def image_paths(items: list[str]) -> list[str]:
    """Files as given; folders searched recursively for images (sorted, hidden entries skipped)."""
    from ..data.datasets import IMG_EXTENSIONS

    paths = []
    for it in items:
        p = Path(it)
        if p.is_dir():
            found = sorted(str(f) for f in p.rglob("*") if f.is_file() and f.suffix.lower() in IMG_EXTENSIONS
                           and not any(part.startswith(".") for part in f.relative_to(p).parts))
            if not found:
                raise LoraclError(f"no images in folder {p}")
            paths += found
        elif p.is_file():
            paths.append(str(p))
        else:
            raise LoraclError(f"no such image or folder: {p}")
    return paths


@torch.no_grad()
def predict(run_dir: Path, items: list[str], top_k: int = 5, batch_size: int = 64, device: str = "auto",
            workers: int = 0) -> list[dict]:
    """Top-k classes of every image with the finished run's final model, through its method's own logits; the
    images are read and transformed by the run's evaluation path (the same pixels its accuracy was measured on)."""
    from ..data.datasets import FileSource, ImageSet

    for flag, v in (("--top-k", top_k), ("--batch-size", batch_size)):
        if v < 1:
            raise LoraclError(f"predict: {flag} must be at least 1 (got {v})")
    if workers < 0:
        raise LoraclError(f"predict: --workers must be 0 or more (got {workers})")
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    elif device not in ("cpu", "cuda"):
        raise LoraclError(f"predict: --device must be auto, cpu or cuda (got '{device}')")
    paths = image_paths(items)
    runner = restore_run(run_dir, device)
    results = finished_run(Path(run_dir))
    ids, names = class_table(results, Path(run_dir) / "results.json")
    keys = class_table(results, keys=True)[1]
    cfg = runner.cfg
    cfg.data.eval_batch_size, cfg.data.num_workers, cfg.eval.max_per_task = batch_size, workers, None
    images = ImageSet.from_source(FileSource(paths, "predict"), [0] * len(paths))
    class_ids = runner.data.classes.tensor(ids)
    k = min(top_k, len(ids))
    rows = []
    with runner.precision.context():
        for x, _ in runner.data.eval_batches(images):
            probs = F.softmax(runner.method.logits(x, class_ids).float(), dim=-1)
            p, c = probs.topk(k, dim=-1)
            for pp, cc in zip(p.tolist(), c.tolist()):
                rows.append({"path": paths[len(rows)], "top": [
                    {"class": keys[j], **({"name": names[j]} if names[j] != keys[j] else {}), "prob": round(q, 6)}
                    for j, q in zip(cc, pp)]})
    return rows


def write_predictions(rows: list[dict], out: str | None, fmt: str | None) -> None:
    fmt = fmt or (Path(out).suffix.lstrip(".").lower() if out else "csv")
    if fmt not in ("csv", "json"):
        raise LoraclError(f"predictions are written as csv or json, not '{fmt}' ({out})")
    try:
        f = open(out, "w", newline="") if out else sys.stdout
    except OSError as e:
        raise LoraclError(f"cannot write predictions to {out}: {e.strerror or e}") from None
    try:
        if fmt == "json":
            json.dump(rows, f, indent=1)
            f.write("\n")
        else:
            k = max((len(r["top"]) for r in rows), default=0)
            w = csv.writer(f)
            w.writerow(["path"] + [h for i in range(1, k + 1) for h in (f"class_{i}", f"prob_{i}")])
            for r in rows:
                w.writerow([r["path"]] + [v for t in r["top"] for v in (t["class"], t["prob"])])
    finally:
        if out:
            f.close()
