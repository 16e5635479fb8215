"""What bounds the CLIP fixture's zero-shot accuracy: for each class of CIFAR-10 and PACS photo, how often its name
occurs in the fixture's pretraining captions, its zero-shot accuracy and how often it is predicted; then, per data
set, zero-shot top-1 with the first template and with an ensemble of templates, against a linear probe on the
same image features (the ceiling the image tower allows).

    python docs/scripts/clip_vocabulary.py [FIXTURE_DIR] [--captions 24 --hypernyms 3]

The caption options must be those the fixture was made with (its card's recipe)."""

import argparse
import importlib.util
import re
from pathlib import Path

import numpy as np
import open_clip
import torch
import torch.nn.functional as F

from loracl.config import DatasetSpec
from loracl.data import datasets as D
import loracl.data.mtil  # noqa: F401  (the registry's CIFAR templates)

ROOT = Path(__file__).resolve().parents[2]
spec = importlib.util.spec_from_file_location("make_clip_fixture", ROOT / "scripts" / "make_clip_fixture.py")
fixture = importlib.util.module_from_spec(spec)
spec.loader.exec_module(fixture)
ENSEMBLE = ["a photo of a {c}.", "a blurry photo of a {c}.", "a photo of the {c}.", "a good photo of a {c}.",
            "a photo of a small {c}.", "a photo of a big {c}.", "a low resolution photo of a {c}.",
            "a close-up photo of a {c}."]

p = argparse.ArgumentParser()
p.add_argument("fixture", nargs="?", default=str(ROOT / "assets" / "clip-tin32"))
p.add_argument("--data", default=str(ROOT.parent / "shared" / "data"))
p.add_argument("--captions", type=int, default=24)
p.add_argument("--hypernyms", type=int, default=3)
args = p.parse_args()
torch.set_num_threads(1)
fx, data = Path(args.fixture), Path(args.data)
open_clip.add_model_config(fx / f"{fixture.NAME}.json")
model = open_clip.create_model(fixture.NAME, pretrained=str(fx / "model.safetensors")).eval()
tokenizer = open_clip.get_tokenizer(fixture.NAME)
rows = fixture.read_wordnet(data / "tiny_imagenet32" / "wordnet.tsv")
corpus = " ".join(c.lower() for r in rows for c in fixture.captions(r, args.captions, args.hypernyms))


@torch.no_grad()
def image_features(images) -> torch.Tensor:
    x = torch.from_numpy(np.stack([fixture.load_rgb32(im) for im in images]))
    return F.normalize(torch.cat([model.encode_image(fixture.to_input(b)).float() for b in x.split(500)]), dim=-1)


@torch.no_grad()
def class_embeddings(names, templates) -> torch.Tensor:
    emb = [F.normalize(model.encode_text(tokenizer([t.replace("{c}", c) for t in templates])).float(), dim=-1).mean(0)
           for c in names]
    return F.normalize(torch.stack(emb), dim=-1)


def linear_probe(x, y, x_test, y_test) -> float:
    """Multinomial logistic regression (L-BFGS, a small L2 penalty) on the normalised features."""
    w = torch.zeros(x.shape[1], int(y.max()) + 1, requires_grad=True)
    b = torch.zeros(w.shape[1], requires_grad=True)
    opt = torch.optim.LBFGS([w, b], max_iter=300, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(10 * x @ w + b, y) + 1e-4 * w.square().sum()
        loss.backward()
        return loss

    opt.step(closure)
    return float(((10 * x_test @ w + b).argmax(1) == y_test).float().mean())


specs = {"cifar10": {"name": "cifar10", "root": str(data / "cifar10")}}
specs.update({f"pacs-{d}": {"name": "pacs", "root": str(data / "pacs"), "domain": d, "holdout": 0.2, "holdout_seed": 0}
              for d in ("photo", "art_painting")})
for label, s in specs.items():
    ds = D.load_dataset(DatasetSpec(**s))
    x_test = image_features(ds.test.image(i) for i in range(len(ds.test)))
    y_test = torch.as_tensor(ds.test.targets)
    first = (ds.templates or [ds.template or "a photo of a {c}."])[:1]
    pred = (x_test @ class_embeddings(ds.class_names, first).T).argmax(1)
    ensemble = (x_test @ class_embeddings(ds.class_names, ENSEMBLE).T).argmax(1)
    x = image_features(ds.train.image(i) for i in range(len(ds.train)))
    probe = linear_probe(x, torch.as_tensor(ds.train.targets), x_test, y_test)
    print(f"{label}: zero-shot {100 * float((pred == y_test).float().mean()):.1f}% (template ensemble "
          f"{100 * float((ensemble == y_test).float().mean()):.1f}%), linear probe on {len(x)} training images "
          f"{100 * probe:.1f}%")
    if label == "pacs-art_painting":
        continue
    for c, name in enumerate(ds.class_names):
        n = len(re.findall(rf"\b{re.escape(name.lower())}\b", corpus))
        print(f"  {name:12s} named {n:4d}x in the captions   zero-shot {100 * float((pred[y_test == c] == c).float().mean()):5.1f}%"
              f"   predicted for {100 * float((pred == c).float().mean()):5.1f}% of the images")
