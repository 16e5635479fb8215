"""Pretrain the small CLIP fixture `loracl-clip-tin32` (an open_clip model) on Tiny-ImageNet-200 at 32 px.

    python scripts/make_clip_fixture.py --threads 1 --epochs 24           # CPU, about 40 min
    python scripts/make_clip_fixture.py --device cuda --unlock-epochs 10   # GPU: also fine-tune the image tower

Writes into --out (default assets/clip-tin32): `loracl-clip-tin32.json` (the open_clip model config; register
it with `open_clip.add_model_config(PATH)`, then `open_clip.create_model("loracl-clip-tin32",
pretrained=".../model.safetensors")`), `model.safetensors`, `card.json` (architecture, data, recipe, seconds,
zero-shot accuracies) and `PROVENANCE.md`.

Recipe. The image tower is the ViT fixture (`assets/vit-s6-tin32`, pretrained supervised on the same
100,000 images) converted into open_clip's VisionTransformer, which has the same blocks. With it locked, the
text tower and both projections are trained contrastively, as in LiT (Zhai et al. 2022): the image tower's
pooled features are computed once per view (the image and its mirror), so one CPU epoch costs a text-tower
pass instead of a ViT backward. `--unlock-epochs N` then trains every weight for N more epochs with crop
and flip augmentation (meant for a GPU); with `--unlock-blocks K` only the image tower's last K blocks train
(with ln_post, the projections and the text side), on their inputs computed once per view: a CPU option.
`--init-image none` starts the image tower from random weights.

Resumable: after every epoch the weights, optimiser, schedule and batch generator go to `OUT/.resume` (`--work`),
with the locked phase's image features; the same command continues a stopped or killed run from its last finished
epoch and draws the batches an uninterrupted run draws. `--stop-after N` stops after N epochs (a session's
share of a long run). The folder is removed once the card is written.

Captions come from `wordnet.tsv`: the class's lemmas in photo templates, its nearest hypernyms ("a bullfrog,
a kind of frog.", "a photo of a frog."), and its gloss. The loss is InfoNCE with a learned temperature, both
directions; every caption of the same class in the batch counts as a positive (200 classes make same-class
pairs common in a batch of 256).
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import math
import random
import re
import shutil
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
NAME = "loracl-clip-tin32"
MEAN = (0.48145466, 0.4578275, 0.40821073)  # open_clip's default preprocessing (OpenAI CLIP's)
STD = (0.26862954, 0.26130258, 0.27577711)

MODEL_CFG = {
    "embed_dim": 128,
    # the ViT fixture's shape; timm's ViT has no pre-norm and LayerNorm eps 1e-6
    "vision_cfg": {"image_size": 32, "layers": 6, "width": 128, "head_width": 32, "mlp_ratio": 4.0,
                   "patch_size": 4, "no_ln_pre": True, "norm_kwargs": {"eps": 1e-6}},
    # the 49408 x width token table is most of the file: width 64 keeps it at 3.2 M parameters
    "text_cfg": {"context_length": 24, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 4},
}

LEMMA_TEMPLATES = ["a photo of a {}.", "a photo of the {}.", "a {}.", "a blurry photo of a {}.",
                   "a good photo of a {}.", "a close-up photo of a {}.", "a photo of a small {}.",
                   "a photo of a big {}.", "a low resolution photo of a {}.", "a cropped photo of the {}."]
HYPERNYM_TEMPLATES = ["a {l}, a kind of {h}.", "a photo of a {l}, a type of {h}.", "a photo of a {h}."]
# hypernyms too general to name what is in a picture
GENERIC = {"entity", "physical entity", "object", "whole", "abstraction", "artifact", "living thing", "organism",
           "matter", "instrumentality", "unit", "part", "substance", "solid", "thing", "causal agent", "group",
           "attribute", "psychological feature", "location", "region", "geological formation", "natural object",
           "food", "foodstuff", "commodity", "consumer goods", "device", "structure", "construction", "covering",
           "container", "implement", "equipment", "conveyance", "transport", "chordate", "vertebrate"}


def log(*a):
    print(time.strftime("%H:%M:%S"), *a, flush=True)


# ---------------------------------------------------------------------------------------------- data

def read_wordnet(path: Path) -> list[dict]:
    rows = []
    for line in path.read_text().splitlines()[1:]:
        idx, wnid, lemmas, hyper, gloss = line.split("\t")
        rows.append({"index": int(idx), "wnid": wnid, "lemmas": [s.strip() for s in lemmas.split(";")],
                     "hypernyms": [s.strip() for s in hyper.split(";")], "gloss": gloss.strip()})
    assert [r["index"] for r in rows] == list(range(len(rows)))
    return rows


def class_name(row: dict) -> str:
    """The name zero-shot prompts use: the first lemma."""
    return row["lemmas"][0]


def captions(row: dict, k: int = 24, hypernyms: int = 3) -> list[str]:
    """k captions for one class: half lemma templates, a quarter the `hypernyms` nearest non-generic hypernyms
    (0: all of the chain), a quarter the gloss."""
    binomial = re.compile(r"^[A-Z][a-z]+ [a-z]+$")  # Latin names ("Rana catesbeiana") teach no common word
    lemmas = [row["lemmas"][0]] + [l for l in row["lemmas"][1:3] if not binomial.match(l)]
    hypers = [h for h in row["hypernyms"] if h not in GENERIC][:hypernyms or None]
    lem = [t.format(l) for l in lemmas for t in LEMMA_TEMPLATES]
    hyp = [t.format(l=lemmas[0], h=h) for h in hypers for t in HYPERNYM_TEMPLATES] or lem
    glo = [f"a photo of a {l}, {row['gloss']}." for l in lemmas] + [f"{row['gloss']}."]
    out = []
    for group, n in ((lem, k // 2), (hyp, k // 4), (glo, k - k // 2 - k // 4)):
        out += [group[i % len(group)] for i in range(n)]
    return out


def decode_zip(path: Path, wnids: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """All training images as one uint8 array (N, 32, 32, 3), decoded once from the zip in memory."""
    label = {w: i for i, w in enumerate(wnids)}
    with zipfile.ZipFile(path) as z:
        names = sorted(n for n in z.namelist() if n.endswith(".jpg"))
        x = np.empty((len(names), 32, 32, 3), np.uint8)
        y = np.empty(len(names), np.int64)
        for i, n in enumerate(names):
            with Image.open(io.BytesIO(z.read(n))) as im:
                x[i] = np.asarray(im.convert("RGB"))
            y[i] = label[n.split("/")[-2]]
    return x, y


def to_input(x_uint8: torch.Tensor) -> torch.Tensor:
    """(B, H, W, 3) uint8 -> normalised (B, 3, H, W) float."""
    x = x_uint8.permute(0, 3, 1, 2).float().div_(255)
    mean = torch.tensor(MEAN, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(STD, device=x.device).view(1, 3, 1, 1)
    return (x - mean) / std


def augment(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Random crop with 4 px zero padding and horizontal flip, on a uint8 (B, H, W, 3) batch."""
    b, h, w, _ = x.shape
    pad = F.pad(x.permute(0, 3, 1, 2), (4, 4, 4, 4))
    dy = torch.randint(0, 9, (b,), generator=gen)
    dx = torch.randint(0, 9, (b,), generator=gen)
    flip = torch.rand(b, generator=gen) < 0.5
    out = torch.empty_like(x.permute(0, 3, 1, 2))
    for i in range(b):
        crop = pad[i, :, dy[i]:dy[i] + h, dx[i]:dx[i] + w]
        out[i] = crop.flip(-1) if flip[i] else crop
    return out.permute(0, 2, 3, 1)


# ---------------------------------------------------------------------------------------------- model

def register_config(out_dir: Path) -> Path:
    import open_clip

    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{NAME}.json"
    path.write_text(json.dumps(MODEL_CFG, indent=2) + "\n")
    open_clip.add_model_config(path)
    return path


def vit_fixture_to_open_clip(visual, state: dict) -> None:
    """Copy a timm ViT state dict (the vit-s6-tin32 fixture) into open_clip's VisionTransformer.

    timm normalises inputs with ImageNet's mean/std and has a patch-embedding bias; open_clip uses CLIP's
    mean/std and no bias. Both differences are affine per input channel, so they fold exactly into the
    patch weights and the positional embedding of the patch tokens."""
    from timm.data import IMAGENET_DEFAULT_MEAN as m1, IMAGENET_DEFAULT_STD as s1

    m1, s1 = torch.tensor(m1), torch.tensor(s1)
    m2, s2 = torch.tensor(MEAN), torch.tensor(STD)
    w = state["patch_embed.proj.weight"]  # (D, 3, p, p)
    # x_timm = x_clip * s2/s1 + (m2 - m1)/s1, per channel
    w_new = w * (s2 / s1).view(1, 3, 1, 1)
    shift = (w * ((m2 - m1) / s1).view(1, 3, 1, 1)).sum((1, 2, 3)) + state["patch_embed.proj.bias"]
    pos = state["pos_embed"][0].clone()
    pos[1:] += shift
    sd = {"conv1.weight": w_new, "class_embedding": state["cls_token"].view(-1), "positional_embedding": pos,
          "ln_post.weight": state["norm.weight"], "ln_post.bias": state["norm.bias"]}
    for i in range(len(visual.transformer.resblocks)):
        t, o = f"blocks.{i}.", f"transformer.resblocks.{i}."
        for a, b in (("norm1", "ln_1"), ("norm2", "ln_2"), ("attn.qkv", "attn.in_proj"),
                     ("attn.proj", "attn.out_proj"), ("mlp.fc1", "mlp.c_fc"), ("mlp.fc2", "mlp.c_proj")):
            sep = "_" if b == "attn.in_proj" else "."
            sd[o + b + sep + "weight"] = state[t + a + ".weight"]
            sd[o + b + sep + "bias"] = state[t + a + ".bias"]
    missing, unexpected = visual.load_state_dict(sd, strict=False)
    assert set(missing) == {"proj"} and not unexpected, (missing, unexpected)


def pooled(visual):
    """The image tower's pooled output before its projection, as a function of a normalised batch."""
    def fn(x: torch.Tensor) -> torch.Tensor:
        proj, visual.proj = visual.proj, None
        try:
            return visual(x)
        finally:
            visual.proj = proj
    return fn


@torch.no_grad()
def every_image(fn, x: np.ndarray, device, views: int, dtype=torch.float32, batch: int = 500) -> torch.Tensor:
    """(views, N, ...): `fn` of every image (and of its mirror with 2 views), a batch at a time, kept on the CPU
    as `dtype`."""
    out = []
    for flip in (False, True)[:views]:
        parts = []
        for k in range(0, len(x), batch):
            xb = torch.from_numpy(x[k:k + batch]).to(device)
            parts.append(fn(to_input(xb.flip(2) if flip else xb)).to(dtype).cpu())
        out.append(torch.cat(parts))
    return torch.stack(out)


def split_at(visual, blocks: int):
    """The image tower cut before its last `blocks` blocks: `head(x)` gives the tokens entering them (computed once
    and cached when only those blocks train), `tail(tokens)` the projected pooled output from there."""
    cut = len(visual.transformer.resblocks) - blocks

    @torch.no_grad()
    def head(x: torch.Tensor) -> torch.Tensor:
        t = visual._embeds(x)
        for blk in visual.transformer.resblocks[:cut]:
            t = blk(t)
        return t

    def tail(t: torch.Tensor) -> torch.Tensor:
        for blk in visual.transformer.resblocks[cut:]:
            t = blk(t)
        return visual._pool(t)[0] @ visual.proj

    return head, tail


# ---------------------------------------------------------------------------------------------- training

def clip_loss(img: torch.Tensor, txt: torch.Tensor, labels: torch.Tensor, logit_scale) -> torch.Tensor:
    """Symmetric InfoNCE; same-class pairs are all positives (the target spreads over them)."""
    logits = logit_scale.exp().clamp(max=100) * F.normalize(img, dim=-1) @ F.normalize(txt, dim=-1).T
    same = (labels[:, None] == labels[None, :]).float()
    target = same / same.sum(1, keepdim=True)
    return 0.5 * (torch.sum(-target * F.log_softmax(logits, 1), 1).mean()
                  + torch.sum(-target * F.log_softmax(logits.T, 1), 1).mean())


# the arguments a resumed run must share with the run that wrote the resume state
RECIPE_ARGS = ("init_image", "epochs", "views", "unlock_epochs", "batch", "lr", "unlock_lr", "wd", "seed", "limit",
               "captions", "hypernyms", "unlock_blocks")


class Stopped(Exception):
    """`--stop-after` epochs were trained in this invocation; the resume state is on disk."""


class ResumeState:
    """What a stopped or killed run continues from, in `work`: `features.pt` (the locked phase's image features)
    and `state.pt` (after every epoch: the weights, optimiser, schedule and generator, the finished epochs),
    each written to a temporary name and renamed, so a kill leaves the previous epoch's state whole."""

    def __init__(self, work: Path | None, args):
        self.work, self.recipe = work, {k: getattr(args, k) for k in RECIPE_ARGS}
        self.state = None
        if work is not None and (work / "state.pt").exists():
            self.state = torch.load(work / "state.pt", weights_only=False)
            differ = [f"--{k.replace('_', '-')} {v} there, {self.recipe.get(k)} here"
                      for k, v in self.state["recipe"].items() if self.recipe.get(k) != v]
            if differ:
                raise SystemExit(f"{work / 'state.pt'} was written by a run with other settings ({'; '.join(differ)}):"
                                 f" run with those settings to continue it, or remove {work} to start again")

    def _save(self, obj, name: str) -> None:
        if self.work is None:
            return
        self.work.mkdir(parents=True, exist_ok=True)
        tmp = self.work / (name + ".tmp")
        torch.save(obj, tmp)
        tmp.replace(self.work / name)

    def features(self, compute, name: str = "features.pt"):
        path = None if self.work is None else self.work / name
        if path is not None and path.exists():
            log(f"image features from {path}")
            return torch.load(path)
        feats = compute()
        self._save(feats, name)
        return feats

    def done(self, phase: str) -> int:
        """Epochs of `phase` already trained (all of an earlier phase: it is finished)."""
        if self.state is None:
            return 0
        return self.state["epochs"].get(phase, 0)

    def save(self, model, phase, epochs_done: dict, opt, sched, gen, history) -> None:
        self.state = {"recipe": self.recipe, "epochs": dict(epochs_done), "model": model.state_dict(),
                      "opt": opt.state_dict(), "sched": sched.state_dict(), "gen": gen.get_state(),
                      "history": list(history), "phase": phase}
        self._save(self.state, "state.pt")


def train(model, x, y, tokens, caps_per_class, args, device, work: Path | None = None,
          stop_after: int | None = None) -> dict:
    """Train as the recipe says; with `work`, resumable after every epoch (a run stopped or killed continues
    where its last finished epoch left it, drawing the same batches); `stop_after`: stop (Stopped) after that
    many epochs in this call."""
    n = len(y)
    resume = ResumeState(work, args)
    gen = torch.Generator().manual_seed(args.seed)
    yt = torch.from_numpy(y)
    steps_per_epoch = n // args.batch
    history, epochs_done, trained_here = [], {}, 0
    if resume.state is not None:
        st = resume.state
        model.load_state_dict(st["model"])
        gen.set_state(st["gen"])
        history, epochs_done = list(st["history"]), dict(st["epochs"])
        log(f"resuming from {work}: {', '.join(f'{k} {v} epochs' for k, v in epochs_done.items())} done")

    def run_phase(phase: str, epochs: int, params: list, lr: float, feats=None, encode=None):
        """With `feats` (views, N, ...) cached per image, a batch's image embeddings are `encode` of one random view
        each; without, the augmented images go through the whole tower."""
        nonlocal trained_here
        start = resume.done(phase)
        if epochs <= 0 or start >= epochs:
            return
        decay = [p for p in params if p.ndim >= 2]
        other = [p for p in params if p.ndim < 2]
        opt = torch.optim.AdamW([{"params": decay, "weight_decay": args.wd}, {"params": other, "weight_decay": 0}],
                                lr=lr, betas=(0.9, 0.98), eps=1e-6)
        total = epochs * steps_per_epoch
        warm = min(200, total // 10)
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, lambda s: (s + 1) / warm if s < warm else 0.5 * (1 + math.cos(math.pi * (s - warm) / (total - warm))))
        if start:
            opt.load_state_dict(resume.state["opt"])
            sched.load_state_dict(resume.state["sched"])
        before = next((h["seconds"] for h in reversed(history) if h["phase"] == phase), 0.0)
        t0, step = time.time() - before, start * steps_per_epoch
        for ep in range(start, epochs):
            if stop_after is not None and trained_here >= stop_after:
                raise Stopped()
            perm = torch.randperm(n, generator=gen)
            run_loss = 0.0
            for k in range(steps_per_epoch):
                idx = perm[k * args.batch:(k + 1) * args.batch]
                lab = yt[idx]
                cap = lab * caps_per_class + torch.randint(0, caps_per_class, (len(idx),), generator=gen)
                txt = model.encode_text(tokens[cap].to(device))
                if feats is not None:
                    view = torch.randint(0, len(feats), (len(idx),), generator=gen)
                    img = encode(feats[view, idx].to(device))
                else:
                    xb = augment(torch.from_numpy(x[idx.numpy()]), gen).to(device)
                    img = model.encode_image(to_input(xb))
                loss = clip_loss(img, txt, lab.to(device), model.logit_scale)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
                step += 1
                run_loss += loss.item()
                if not math.isfinite(loss.item()):
                    raise SystemExit(f"loss is {loss.item()} at {phase} step {step}; the last finished epoch is "
                                     f"in {work}" if work else f"loss is {loss.item()} at {phase} step {step}")
            ep_loss = run_loss / steps_per_epoch
            history.append({"phase": phase, "epoch": ep + 1, "loss": round(ep_loss, 4),
                            "temperature": round(1 / model.logit_scale.exp().item(), 4),
                            "seconds": round(time.time() - t0, 1)})
            epochs_done[phase] = ep + 1
            trained_here += 1
            resume.save(model, phase, epochs_done, opt, sched, gen, history)
            log(f"{phase} epoch {ep + 1}/{epochs} loss {ep_loss:.4f} "
                f"T {1 / model.logit_scale.exp().item():.4f} {time.time() - t0:.0f}s")

    text_params = [p for n_, p in model.named_parameters() if not n_.startswith("visual.")]
    if args.epochs > 0 and resume.done("locked") < args.epochs:
        def compute():
            t0 = time.time()
            f = every_image(pooled(model.visual), x, device, args.views)
            log(f"image features of {n} images x {args.views} views in {time.time() - t0:.0f}s")
            if not any(h["phase"] == "features" for h in history):
                history.append({"phase": "features", "seconds": round(time.time() - t0, 1)})
            return f

        feats = resume.features(compute)
        run_phase("locked", args.epochs, text_params + [model.visual.proj], args.lr, feats, lambda f: f @ model.visual.proj)
        del feats
    if args.unlock_epochs > 0 and args.unlock_blocks:
        head, tail = split_at(model.visual, args.unlock_blocks)
        block_in = resume.features(lambda: every_image(head, x, device, args.views, torch.float16), "tokens.pt")
        v = model.visual
        trained = (text_params + [v.proj] + list(v.ln_post.parameters())
                   + list(v.transformer.resblocks[-args.unlock_blocks:].parameters()))
        run_phase("unlocked", args.unlock_epochs, trained, args.unlock_lr, block_in, lambda t: tail(t.float()))
        del block_in
    elif args.unlock_epochs > 0:
        run_phase("unlocked", args.unlock_epochs, list(model.parameters()), args.unlock_lr)
    return {"history": history}


# ---------------------------------------------------------------------------------------------- evaluation

@torch.no_grad()
def zero_shot(model, tokenizer, images, targets, names, template, device, batch=500) -> tuple[float, list[int]]:
    prompts = [template.replace("{c}", c) if "{c}" in template else template.format(c) for c in names]
    txt = F.normalize(model.encode_text(tokenizer(prompts).to(device)).float(), dim=-1)
    preds = []
    for k in range(0, len(images), batch):
        xb = torch.from_numpy(np.stack(images[k:k + batch])).to(device)
        img = F.normalize(model.encode_image(to_input(xb)).float(), dim=-1)
        preds += (img @ txt.T).argmax(1).tolist()
    acc = float(np.mean(np.asarray(preds) == np.asarray(targets)))
    return acc, preds


def load_rgb32(img: Image.Image) -> np.ndarray:
    img = img.convert("RGB")
    if img.size != (32, 32):
        img = img.resize((32, 32), Image.BICUBIC)
    return np.asarray(img)


def handful(assets: Path) -> list[tuple[str, int]]:
    """The fixed handful the test re-scores: the first image of every 4th class of the bundled
    Tiny-ImageNet val sample (assets/tiny-imagenet-val-5), 50 images, classified over all 200 classes."""
    wnids = [l.split("\t")[1] for l in (assets / "tiny-imagenet-val-5" / "classes.tsv").read_text().splitlines()
             if l and not l.startswith("index")]
    out = []
    for c in range(0, len(wnids), 4):
        f = sorted((assets / "tiny-imagenet-val-5" / wnids[c]).iterdir())[0]
        out.append((str(f.relative_to(assets)), c))
    return out


def evaluate(model, tokenizer, rows, data_root: Path, device) -> dict:
    sys.path.insert(0, str(ROOT))
    from loracl.config import DatasetSpec
    from loracl.data import datasets as D
    import loracl.data.mtil  # noqa: F401  (MTIL names and templates for CIFAR-100 and MNIST)

    names = [class_name(r) for r in rows]
    res = {}
    # Tiny-ImageNet val, 200 classes, first lemma in "a photo of a {c}."
    wnid_to = {r["wnid"]: r["index"] for r in rows}
    val = data_root / "tiny_imagenet32" / "val"
    imgs, tg = [], []
    for d in sorted(val.iterdir()):
        if d.is_dir():
            for f in sorted(d.iterdir()):
                with Image.open(f) as im:
                    imgs.append(load_rgb32(im))
                tg.append(wnid_to[d.name])
    res["tiny_imagenet_val"] = {"top1": zero_shot(model, tokenizer, imgs, tg, names, "a photo of a {c}.", device)[0],
                                "classes": 200, "images": len(tg), "template": "a photo of a {c}."}
    # the local datasets, through loracl's registry: the class names and first template its runs use
    specs = [("cifar10", {"name": "cifar10", "root": str(data_root / "cifar10")}),
             ("cifar100", {"name": "cifar100", "root": str(data_root / "cifar100")}),
             ("mnist", {"name": "mnist", "root": str(data_root / "mnist")}),
             ("fashion_mnist", {"name": "fashion_mnist", "root": str(data_root / "fashion_mnist")})]
    specs += [(f"pacs-{d}", {"name": "pacs", "root": str(data_root / "pacs"), "domain": d, "holdout": 0.2,
                             "holdout_seed": 0}) for d in ("photo", "art_painting", "cartoon", "sketch")]
    for label, spec in specs:
        ds = D.load_dataset(DatasetSpec(**spec))
        template = (ds.templates or [ds.template or "a photo of a {c}."])[0]
        test = ds.test
        imgs = [load_rgb32(test.image(i)) for i in range(len(test))]
        acc, _ = zero_shot(model, tokenizer, imgs, test.targets.tolist(), ds.class_names, template, device)
        res[label] = {"top1": acc, "classes": len(ds.class_names), "images": len(test), "template": template,
                      "chance": 1 / len(ds.class_names)}
        log(f"zero-shot {label}: {100 * acc:.2f}% ({len(ds.class_names)} classes)")
    return res


def md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", default=str(ROOT.parent / "shared" / "data"), help="the ../shared/data folder")
    p.add_argument("--init-image", default=str(ROOT / "assets" / "vit-s6-tin32" / "model.safetensors"),
                   help="timm ViT state dict for the image tower, or 'none'")
    p.add_argument("--epochs", type=int, default=24, help="epochs with the image tower locked")
    p.add_argument("--views", type=int, default=2, choices=(1, 2),
                   help="locked phase: features of the image only (1) or also of its mirror (2)")
    p.add_argument("--unlock-epochs", type=int, default=0, help="epochs of training every weight afterwards")
    p.add_argument("--captions", type=int, default=24, help="captions per class (half lemmas, a quarter hypernyms, "
                                                            "a quarter the gloss)")
    p.add_argument("--hypernyms", type=int, default=3, help="the nearest non-generic hypernyms captions name (0: the "
                                                            "whole chain up to 'animal', 'vehicle', ...)")
    p.add_argument("--unlock-blocks", type=int, default=0,
                   help="unlocked phase: train only the image tower's last N blocks (and ln_post, proj) on the cached "
                        "inputs of those blocks for each image and its mirror (--views), no crop: about N/6 of a "
                        "whole-tower step on a CPU; 0: every weight, with crop and flip")
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--unlock-lr", type=float, default=2e-4)
    p.add_argument("--wd", type=float, default=0.05)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", default=str(ROOT / "assets" / "clip-tin32"))
    p.add_argument("--limit", type=int, default=None, help="train on a random subset of this many images (smoke runs)")
    p.add_argument("--work", default=None, help="resume state (default: OUT/.resume): a stopped or killed run "
                                                "continues from its last finished epoch when run again")
    p.add_argument("--stop-after", type=int, default=None, help="stop after this many epochs (continue later with "
                                                                "the same command)")
    args = p.parse_args(argv)
    layers = MODEL_CFG["vision_cfg"]["layers"]
    if not 0 <= args.unlock_blocks <= layers:
        p.error(f"--unlock-blocks {args.unlock_blocks}: the image tower has {layers} blocks (0: all of them train)")
    if args.unlock_blocks and args.unlock_epochs <= 0:
        p.error(f"--unlock-blocks {args.unlock_blocks} needs --unlock-epochs N > 0 (it says which blocks that phase trains)")
    if args.hypernyms < 0 or args.captions < 4:
        p.error(f"--hypernyms {args.hypernyms} / --captions {args.captions}: hypernyms >= 0 (0: the whole chain), "
                f"captions >= 4 (a quarter of them name hypernyms)")
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    random.seed(args.seed)
    import open_clip
    from safetensors.torch import load_file, save_file

    t_start = time.time()
    out = Path(args.out)
    data = Path(args.data)
    cfg_path = register_config(out)
    rows = read_wordnet(data / "tiny_imagenet32" / "wordnet.tsv")
    model = open_clip.create_model(NAME).to(args.device)
    if args.init_image != "none":
        vit_fixture_to_open_clip(model.visual, load_file(args.init_image))
    model.to(args.device)
    tokenizer = open_clip.get_tokenizer(NAME)

    t0 = time.time()
    x, y = decode_zip(data / "tiny_imagenet32" / "train.zip", [r["wnid"] for r in rows])
    log(f"decoded {len(y)} training images in {time.time() - t0:.0f}s")
    if args.limit:
        keep = np.sort(np.random.default_rng(args.seed).permutation(len(y))[:args.limit])
        x, y = x[keep], y[keep]
    caps = [captions(r, args.captions, args.hypernyms) for r in rows]
    k = len(caps[0])
    tokens = tokenizer([c for cs in caps for c in cs])

    t0 = time.time()
    work = Path(args.work) if args.work else out / ".resume"
    try:
        info = train(model, x, y, tokens, k, args, args.device, work, args.stop_after)
    except Stopped:
        log(f"stopped after {args.stop_after} epochs; the same command continues from {work}")
        return
    train_s = sum(h["seconds"] for h in info["history"] if h["phase"] == "features") + sum(
        max((h["seconds"] for h in info["history"] if h["phase"] == ph), default=0) for ph in ("locked", "unlocked"))
    del x

    # stored in fp16 (half the file); everything below scores the weights as they are stored and loaded
    model.cpu().eval()
    wfile = out / "model.safetensors"
    save_file({n: t.detach().half().contiguous() for n, t in model.state_dict().items()}, str(wfile))
    model = open_clip.create_model(NAME, pretrained=str(wfile)).to(args.device).eval()

    hand = handful(ROOT / "assets")
    imgs = []
    for f, _ in hand:
        with Image.open(ROOT / "assets" / f) as im:
            imgs.append(load_rgb32(im))
    names = [class_name(r) for r in rows]
    h_acc, h_pred = zero_shot(model, tokenizer, imgs, [c for _, c in hand], names, "a photo of a {c}.", args.device)
    zs = evaluate(model, tokenizer, rows, data, args.device)

    card = {
        "name": NAME,
        "open_clip": {"config": cfg_path.name, "weights": wfile.name, "version": open_clip.__version__,
                      "load": f"open_clip.add_model_config('{cfg_path.name}'); "
                              f"open_clip.create_model('{NAME}', pretrained='{wfile.name}')"},
        "architecture": MODEL_CFG,
        "parameters": {"image": sum(p.numel() for p in model.visual.parameters()),
                       "total": sum(p.numel() for p in model.parameters())},
        "storage": "fp16 safetensors (open_clip casts to the model's fp32 parameters on load)",
        "preprocessing": {"size": 32, "mean": MEAN, "std": STD, "note": "open_clip's defaults; no resize for 32 px"},
        "data": {"images": "Tiny-ImageNet-200 train, 100,000 images at 32 px (../shared/data/tiny_imagenet32/train.zip)",
                 "captions": f"{k} per class from wordnet.tsv: lemma templates {LEMMA_TEMPLATES}, hypernym "
                             f"templates {HYPERNYM_TEMPLATES} "
                             f"({args.hypernyms or 'all'} nearest non-generic hypernyms), gloss",
                 "example_captions": caps[2][::4]},
        "recipe": {"image_tower_init": Path(args.init_image).name if args.init_image != "none" else "random",
                   "locked_epochs": args.epochs, "locked_views": args.views, "unlocked_epochs": args.unlock_epochs, "batch": args.batch,
                   "optimizer": f"AdamW lr {args.lr} (unlocked {args.unlock_lr}) wd {args.wd} betas (0.9, 0.98), "
                                f"warmup then cosine per step",
                   "loss": "symmetric InfoNCE, learned temperature (init 0.07), same-class pairs positive",
                   "locked": "image tower frozen, its pooled features of each image (and its mirror with 2 views) computed "
                             "once; "
                             "trained: text tower, both projections, temperature",
                   "unlocked": (f"the image tower's last {args.unlock_blocks} blocks, ln_post and both projections, the "
                                f"text tower and temperature, on the cached inputs of those blocks ({args.views} views)"
                                if args.unlock_blocks else "every weight, random crop (pad 4) + flip"),
                   "seed": args.seed,
                   "device": args.device, "threads": torch.get_num_threads()},
        "history": info["history"],
        "seconds": {"train": round(train_s, 1), "total": round(time.time() - t_start, 1)},
        "zero_shot": zs,
        "handful": {"what": "first image of every 4th class of assets/tiny-imagenet-val-5, over all 200 classes, "
                            "'a photo of a {c}.' with each class's first lemma", "top1": h_acc,
                    "class_names": names,
                    "files": [f for f, _ in hand], "predictions": h_pred},
        "temperature": 1 / model.logit_scale.exp().item(),
    }
    (out / "card.json").write_text(json.dumps(card, indent=1) + "\n")
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    except OSError:
        commit = "unknown"
    (out / "PROVENANCE.md").write_text(
        f"# clip-tin32\n\nMade by `python {' '.join(['scripts/make_clip_fixture.py'] + sys.argv[1:])}` at git "
        f"commit {commit} in {card['seconds']['total']:.0f} s.\n\n"
        f"| file | md5 |\n|---|---|\n" + "".join(f"| {f.name} | `{md5(f)}` |\n" for f in (wfile, cfg_path)))
    shutil.rmtree(work, ignore_errors=True)  # the card is written: nothing left to resume
    log(f"wrote {out}: {wfile.stat().st_size / 2**20:.1f} MiB; zero-shot TIN val "
        f"{100 * zs['tiny_imagenet_val']['top1']:.2f}%, handful {100 * h_acc:.1f}%")


if __name__ == "__main__":
    main()
