"""The pretrained CLIP fixture in assets/clip-tin32 (scripts/make_clip_fixture.py): it loads through loracl
offline and scores what its card says, and KeepLoRA on both of its encoders leaves protected inputs alone."""

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from loracl.config import BackboneConfig
from loracl.runs.assembly import load_config
from loracl.models.backbones import create_backbone
from loracl.runs.runner import Runner

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]

REPO = Path(__file__).resolve().parent.parent
ASSETS = REPO / "assets"
FIXTURE = Path(os.environ.get("LORACL_CLIP_FIXTURE", ASSETS / "clip-tin32"))
NAME = "loracl-clip-tin32"


def _images(files, mean, std) -> torch.Tensor:
    x = torch.stack([torch.from_numpy(np.array(Image.open(f).convert("RGB"))) for f in files])
    x = x.permute(0, 3, 1, 2).float() / 255
    return (x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)


def test_fixture_zero_shot_on_the_handful_equals_the_card():
    card = json.loads((FIXTURE / "card.json").read_text())
    bb = create_backbone(BackboneConfig(kind="open_clip", name=NAME, file=str(FIXTURE / "model.safetensors"))).eval()
    dc = bb.data_config()
    assert dc["size"] == 32
    rows = [l.split("\t") for l in (ASSETS / "tiny-imagenet-val-5" / "classes.tsv").read_text().splitlines() if l]
    wordnet_names = card["handful"]["class_names"]
    assert len(wordnet_names) == len(rows) == 200
    hand = card["handful"]
    x = _images([ASSETS / f for f in hand["files"]], dc["mean"], dc["std"])
    with torch.no_grad():
        txt = torch.nn.functional.normalize(bb.encode_text(bb.tokenize([f"a photo of a {c}." for c in wordnet_names])), dim=-1)
        img = torch.nn.functional.normalize(bb.features(x), dim=-1)
    pred = (img @ txt.T).argmax(1).tolist()
    assert pred == hand["predictions"]
    target = [[r[1] for r in rows].index(Path(f).parent.name) for f in hand["files"]]
    assert np.mean(np.asarray(pred) == np.asarray(target)) == pytest.approx(hand["top1"], abs=1e-12)
    # well above chance (1/200), or the fixture would not stand for a pretrained CLIP
    assert hand["top1"] > 0.1


def _two_task_run(tmp_path, **method_sets):
    """KeepLoRA on both encoders of the fixture over two 3-class tasks of the bundled CIFAR-100 images; returns
    the zero-shot logits of task 0's test images over task 0's classes after each task."""
    root = ASSETS / "cifar100-20"
    datasets = (f"[{{name: imagefolder, root: '{root}', classes: [0, 1, 2], max_per_class: {{train: 8, test: 4}}, "
                f"label: a}}, {{name: imagefolder, root: '{root}', classes: [3, 4, 5], max_per_class: "
                f"{{train: 8, test: 4}}, label: b}}]")
    sets = [f"backbone.file={FIXTURE / 'model.safetensors'}", f"benchmark.datasets={datasets}",
            "train.epochs=1", "train.max_steps_per_epoch=8", "data.batch_size=8", "train.amp=none",
            "method.encoders=[image, text]", "train.optimizer.lr=0.05"] + [f"{k}={v}" for k, v in method_sets.items()]
    cfg = load_config(preset="mini-mtil-clip", method="keeplora", sets=sets)
    r = Runner(cfg, tmp_path, progress=False, log=lambda *a, **k: None)
    t0 = r.scenario.tasks[0]
    dc = r.model.backbone.data_config()
    x = _images([t0.test.describe(i) for i in range(len(t0.test))], dc["mean"], dc["std"])
    ids = torch.tensor(t0.class_ids)
    logits = []
    end_task = r.method.end_task

    def end_task_and_score(task):
        end_task(task)
        with torch.no_grad():
            logits.append(r.method.logits(x, ids).clone())

    r.method.end_task = end_task_and_score
    r.run()
    return logits


def test_keeplora_keeps_the_zero_shot_logits_of_a_protected_task(tmp_path):
    """After task 0, KeepLoRA protects the input directions of every adapted layer that hold eps_f of the
    energy of task 0's image tokens and prompts; task 1's update lives in the rest, so task 0's zero-shot
    logits stay nearly where they were (what moves them is the 0.1% of energy left unprotected). The same
    training with the protection off (no principal subspace, eps_f tiny) moves them ten times as far."""
    kept = _two_task_run(tmp_path / "kept", **{"method.eps_f": 0.999})
    loose = _two_task_run(tmp_path / "loose", **{"method.eps_w": "{image: 0.0, text: 0.0}", "method.eps_f": 1e-6})
    moved_kept = (kept[1] - kept[0]).abs().max().item()
    moved_loose = (loose[1] - loose[0]).abs().max().item()
    assert moved_loose > 0.05  # task 1 did train both encoders
    assert moved_kept < 0.25 * moved_loose, (moved_kept, moved_loose)


def _fixture_script():
    import importlib.util

    spec = importlib.util.spec_from_file_location("make_clip_fixture", REPO / "scripts" / "make_clip_fixture.py")
    mcf = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mcf)
    return mcf


def test_fixture_script_tower_split_is_the_tower(tmp_path):
    """`--unlock-blocks`: the cached inputs of the last blocks, run through them, give the whole tower's output."""
    import open_clip

    mcf = _fixture_script()
    mcf.register_config(tmp_path)
    torch.manual_seed(0)
    visual = open_clip.create_model(mcf.NAME).visual.eval()
    x = torch.randn(4, 3, 32, 32)
    for blocks in (1, 3):
        head, tail = mcf.split_at(visual, blocks)
        with torch.no_grad():
            torch.testing.assert_close(tail(head(x)), visual(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("unlock_blocks", [0, 2])
def test_fixture_script_resumes_to_the_same_weights(tmp_path, unlock_blocks):
    """scripts/make_clip_fixture.py stopped after one epoch (and after two) and run again ends with the weights of
    an uninterrupted run, through both phases; another recipe refuses to continue the state. With
    `--unlock-blocks 2` the first blocks of the image tower keep their weights."""
    import argparse

    import open_clip

    mcf = _fixture_script()
    mcf.register_config(tmp_path / "cfg")
    g = np.random.default_rng(0)
    x = g.integers(0, 256, (192, 32, 32, 3), dtype=np.uint8)
    y = np.repeat(np.arange(3), 64)
    tokens = open_clip.get_tokenizer(mcf.NAME)([f"a photo of a thing {c} {k}." for c in range(3) for k in range(2)])
    args = argparse.Namespace(init_image="none", epochs=2, views=2, unlock_epochs=1, batch=64, lr=2e-3,
                              unlock_lr=2e-4, wd=0.05, seed=0, limit=None, captions=24, hypernyms=3,
                              unlock_blocks=unlock_blocks)

    def model():
        torch.manual_seed(0)
        return open_clip.create_model(mcf.NAME)

    whole = model()
    mcf.train(whole, x, y, tokens, 2, args, "cpu")
    work, parts = tmp_path / "resume", model()
    for _ in range(2):  # one epoch per call: locked 1, then locked 2, then (below) the unlocked epoch
        with pytest.raises(mcf.Stopped):
            mcf.train(parts, x, y, tokens, 2, args, "cpu", work, stop_after=1)
        parts = model()  # a new process: everything comes from the resume state
    info = mcf.train(parts, x, y, tokens, 2, args, "cpu", work)
    assert [h["phase"] for h in info["history"]] == ["features", "locked", "locked", "unlocked"]
    a, b = whole.state_dict(), parts.state_dict()
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=0, atol=0, msg=k)
    init, first = model().state_dict(), "visual.transformer.resblocks.0.attn.in_proj_weight"
    last = "visual.transformer.resblocks.5.attn.in_proj_weight"
    assert not torch.equal(a[last], init[last]) and torch.equal(a[first], init[first]) == (unlock_blocks > 0)
    args.lr = 1e-3
    with pytest.raises(SystemExit, match="--lr 0.002 there, 0.001 here"):
        mcf.train(model(), x, y, tokens, 2, args, "cpu", work)


@pytest.mark.shared
def test_mini_mtil_clip_is_a_protocol_where_fine_tuning_matters(tmp_path):
    """Issue 23's protocol: at least 4 datasets, each with the fixture's zero-shot accuracy at least twice chance
    before any training (the values docs/keeplora.md reports), and hundreds of steps a task (PACS photo 132)."""
    cfg = load_config(preset="mini-mtil-clip", method="zeroshot", sets=["threads=1"])
    r = Runner(cfg, tmp_path, progress=False, log=lambda *a, **k: None)
    tasks = r.scenario.tasks
    steps = [-(-len(t.train) // cfg.data.batch_size) * cfg.train.epochs for t in tasks]
    assert len(tasks) >= 4 and steps == [252, 132, 252, 252], steps
    r.run()
    before = json.loads((tmp_path / "results.json").read_text())["acc_before"]
    assert before == pytest.approx([25.8, 32.47, 26.75, 26.25], abs=0.01)
    assert all(acc / 100 >= 2 / len(t.class_ids) for acc, t in zip(before, tasks)), before


@pytest.mark.parametrize("argv,words", [
    (["--unlock-blocks", "7", "--unlock-epochs", "1"], ["--unlock-blocks 7", "6 blocks"]),
    (["--unlock-blocks", "2"], ["--unlock-blocks 2", "--unlock-epochs"]),
    (["--hypernyms", "-1"], ["--hypernyms -1", "hypernyms >= 0"]),
])
def test_fixture_script_refuses_bad_options_in_one_line(argv, words, capsys):
    with pytest.raises(SystemExit):
        _fixture_script().main(argv)
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert all(w in err for w in words), err
