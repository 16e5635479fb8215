"""`loracl export` and `loracl predict`: the trained model of a finished run, out of loracl and in use.

Both rebuild the run's model from its `config.yaml` (pretrained backbone, then the final task checkpoint
on top) and fold every LoRA branch into its weight, so what remains is a plain timm or open_clip model
plus a classifier over the run's classes. Export writes it as files that load without loracl:

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

from .errors import LoraclError


def finished_run(run_dir: Path) -> dict:
    """results.json of a run that completed, else one error line."""
    p = Path(run_dir) / "results.json"
    if not p.is_file():
        raise LoraclError(f"{run_dir} is not a run folder (no results.json)")
    try:
        results = json.loads(p.read_text())
    except (OSError, ValueError) as e:
        raise LoraclError(f"cannot read {p}: {e}") from None
    if results.get("status") != "complete":
        raise LoraclError(f"run {run_dir} did not finish (results.json status '{results.get('status')}'); "
                          f"continue it with loracl run --resume --out {run_dir}")
    return results


def class_table(results: dict) -> tuple[list[int], list[str]]:
    """Every class id the run learnt, sorted, with its name."""
    names: dict[int, str] = {}
    for t in results["tasks"]:
        for i, n in zip(t["class_ids"], t["class_names"]):
            names.setdefault(int(i), str(n))
    ids = sorted(names)
    return ids, [names[i] for i in ids]


def load_run_model(run_dir: Path, device: str = "cpu"):
    """(config, results, model with every branch merged, class ids, class names) of a finished run."""
    from .checkpoint import load
    from .config import load_config
    from .data.loader import derive_seed
    from .methods import get_method
    from .methods.base import Method
    from .models.branches import Magnitudes
    from .models.model import build_model

    run_dir = Path(run_dir)
    results = finished_run(run_dir)
    cfg = load_config(run_dir / "config.yaml")
    method = cfg.method_name
    cls = get_method(method, str(run_dir / "config.yaml"))
    # a method that computes its own logits (other than KeepLoRA without its `+` head, which only
    # forwards to the model) is more than backbone + head
    if cls.logits is not Method.logits and getattr(cls, "plus", True):
        raise LoraclError(f"method '{method}' computes its logits itself; loracl cannot export it as a plain "
                          f"timm / open_clip model")
    last = len(results["tasks"]) - 1
    ckpt = run_dir / "checkpoints" / f"task_{last:02d}.pt"
    if not ckpt.is_file():
        raise LoraclError(f"run {run_dir} has no checkpoint of its last task ({ckpt})")
    state = load(ckpt)
    if "cosine" in state.get("method", {}) or cfg.head.kind == "cosine":
        raise LoraclError(f"method '{method}' scores classes with a cosine head of its own; loracl cannot "
                          f"export it as a plain timm / open_clip model")
    # the seed the runner builds the model under: tensors a run never changed are not in its checkpoints,
    # so a backbone without pretrained weights (tests, smoke runs) must come out of the same random draw
    torch.manual_seed(derive_seed(cfg.seed, "build"))
    model = build_model(cfg, torch.device("cpu"))
    # modules a method registers with the model (prompts, ...): only SD-LoRA's magnitudes, whose whole effect
    # is in the branches' merged weights, can go into a plain model
    structures = state["structure"].get("owned", {})
    owned = {k.split(".")[1] for k in state["model"] if k.startswith("owned.")} | set(structures)
    for name in sorted(owned):
        sub = structures.get(name, {})
        if sub.get("kind") != Magnitudes.kind:
            raise LoraclError(f"method '{method}' adds a module of its own ('{name}') to the model; loracl cannot "
                              f"export it as a plain timm / open_clip model")
        model.own(name, Magnitudes(sub["n"]))
    model.rebuild(state["structure"])
    missing, unexpected = model.load_state_dict(state["model"], strict=False)
    if unexpected:
        raise LoraclError(f"checkpoint {ckpt} does not fit the model of {run_dir / 'config.yaml'} "
                          f"(unexpected keys {unexpected[:3]})")
    if model.adapter is not None:
        model.adapter.merge_all()
    ids, names = class_table(results)
    model.eval().to(device)
    return cfg, results, model, ids, names


@torch.no_grad()
def head_matrix(model, ids: list[int]) -> tuple[torch.Tensor, torch.Tensor | None, bool]:
    """(weight N x D, bias N or None, whether features are L2-normalised first): logits = f @ W.T + b."""
    from .models.heads import LinearHead, TextHead

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
    from .data.transforms import crop_fraction

    dc = model.backbone.data_config()
    norm = cfg.data.normalize
    return {"input_size": [3, dc["size"], dc["size"]], "interpolation": dc["interpolation"],
            "mean": list(dc["mean"]) if norm else [0.0, 0.0, 0.0],
            "std": list(dc["std"]) if norm else [1.0, 1.0, 1.0],
            "crop_pct": crop_fraction(cfg.data, dc), "crop_mode": "squash" if cfg.data.resize == "resize" else "center"}


def export(run_dir: Path, out: Path | None = None) -> Path:
    from safetensors.torch import save_file

    run_dir = Path(run_dir)
    cfg, results, model, ids, names = load_run_model(run_dir)
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
            "classes": names, "class_ids": ids,
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
        out.mkdir(parents=True, exist_ok=True)
        save_file({k: v.detach().cpu().contiguous().clone() for k, v in state.items()}, str(out / weights))
        (out / "model.json").write_text(json.dumps(meta, indent=1))
        if bb.family == "open_clip":
            (out / "open_clip_config.json").write_text(json.dumps(oc, indent=1))
    except OSError as e:
        raise LoraclError(f"cannot write the export to {out}: {e.strerror or e}") from None
    return out


# ------------------------------------------------------------------------------------------------
# predict


def image_paths(items: list[str]) -> list[str]:
    """Files as given; folders searched recursively for images (sorted, hidden entries skipped)."""
    from .data.datasets import IMG_EXTENSIONS

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
    from .data.datasets import FileSource, ImageSet
    from .data.loader import make_loader
    from .data.transforms import build_transforms

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    paths = image_paths(items)
    cfg, _, model, ids, names = load_run_model(run_dir, device)
    _, test = build_transforms(cfg.data, model.backbone.data_config())
    images = ImageSet.from_source(FileSource(paths, "predict"), [0] * len(paths))
    class_ids = torch.tensor(ids, device=device)
    k = min(top_k, len(ids))
    rows = []
    for x, _, r in make_loader(images, test, batch_size, num_workers=workers, augment=False):
        probs = F.softmax(model(test.finish(x.to(device)), class_ids).float(), dim=-1)
        p, c = probs.topk(k, dim=-1)
        for row, pp, cc in zip(r.tolist(), p.tolist(), c.tolist()):
            rows.append({"path": paths[row], "top": [{"class": names[j], "prob": round(q, 6)} for j, q in zip(cc, pp)]})
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
