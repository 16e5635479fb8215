"""Bad inputs and faults a user meets, each with its one-line message and nothing finished lost.

Every row of the table: the command exits non-zero (2), stderr holds no traceback and its last line is
`error: ...` naming what and where, and whatever a run had finished before the fault is still there. Rows that
are not errors (odd but usable data, a stale lock) assert that the run goes on and what it reports. Runs are
tiny: a 4-class image folder cut from ../shared's CIFAR-10, the pretrained ViT fixture, two steps per task.
"""

from __future__ import annotations

import errno
import json
import os
import pickle
import shutil
import socket
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import DATA, REPO, WEIGHTS
from loracl.runs import statefile as checkpoint
from loracl.cli import main
from loracl.runs.lock import LOCK
from loracl.errors import LoraclError

pytestmark = [pytest.mark.slow, pytest.mark.shared, pytest.mark.usefixtures("one_thread")]

CLASSES = ("airplane", "bird", "cat", "dog")


def tiny_sets(root, **extra) -> list[str]:
    base = {"train.epochs": 1, "train.max_steps_per_epoch": 2, "data.batch_size": 4, "data.num_workers": 0,
            "eval.max_per_task": None, "eval.retention": None, "benchmark.num_tasks": 2,
            "benchmark.datasets": f"[{{name: imagefolder, root: {root}}}]"}
    base.update(extra)
    return [f"{k}={'null' if v is None else v}" for k, v in base.items()]


def cli(capsys, *argv):
    """(exit status, stderr lines) of `loracl ARGV` run in this process."""
    rc = main([str(a) for a in argv])
    return rc, capsys.readouterr().err.strip().splitlines()


def run(capsys, out, root, *extra, method="seq-lora", **sets):
    argv = ["run", "--preset", "cifar100-mini", "--method", method, "--out", out]
    for s in tiny_sets(root, **sets):
        argv += ["--set", s]
    return cli(capsys, *argv, *extra)


def one_line(rc, err, *words):
    """The failure contract: status 2, no traceback, the last line is the error and names every word."""
    text = "\n".join(err)
    assert rc == 2, text
    assert "Traceback" not in text, text
    assert err and err[-1].startswith("error: "), text
    for w in words:
        assert str(w) in err[-1], (w, err[-1])
    return err[-1]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """root/{train,test}/<class>/: 8 training and 4 test images of 4 CIFAR-10 classes."""
    root = tmp_path_factory.mktemp("data") / "four"
    for part, n in (("train", 8), ("test", 4)):
        for c in CLASSES:
            (root / part / c).mkdir(parents=True)
            for f in sorted((DATA / "cifar10" / part / c).iterdir())[:n]:
                shutil.copy(f, root / part / c / f.name)
    return root


def copy_folder(folder, tmp_path):
    dst = tmp_path / "data"
    shutil.copytree(folder, dst)
    return dst


@pytest.fixture(scope="module")
def finished(folder, tmp_path_factory):
    """One complete two-task run, started over a stale lock left by a killed run (which it takes over)."""
    out = tmp_path_factory.mktemp("runs") / "done"
    out.mkdir()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (out / LOCK).write_text(f"{dead.pid} {socket.gethostname()}\n")
    argv = ["run", "--preset", "cifar100-mini", "--method", "seq-lora", "--out", str(out)]
    for s in tiny_sets(folder):
        argv += ["--set", s]
    assert main(argv) == 0
    assert not (out / LOCK).exists()  # released when the run ended
    return out


def copy_run(finished, tmp_path, name="run"):
    dst = tmp_path / name
    shutil.copytree(finished, dst, ignore=shutil.ignore_patterns("export"))
    return dst


# ------------------------------------------------------------------------------------------------
# checkpoints and resume


class Planted:
    """A pickle that would create a file when unpickled."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_planted_pickle_checkpoint_is_never_executed(finished, tmp_path, capsys):
    out = copy_run(finished, tmp_path)
    marker = tmp_path / "pwned"
    ck = out / "checkpoints" / "task_01.pt"
    ck.write_bytes(pickle.dumps({"task": 1, "x": Planted(marker)}))
    torch.save({"task": 1, "x": Planted(marker)}, out / "checkpoints" / "step.pt")  # the zip format too
    main(["run", "--resume", "--out", str(out)])
    text = "\n".join(capsys.readouterr())  # refused on stderr, or passed over (and named) in the run's log
    assert not marker.exists()
    assert "Traceback" not in text and ("task_01.pt" in text or "step.pt" in text), text
    assert checkpoint.load(out / "checkpoints" / "task_00.pt")["task"] == 0  # the finished task is intact


@pytest.mark.parametrize("damage", ["truncated", "empty", "foreign-safetensors", "text"])
def test_broken_checkpoint_is_refused_naming_the_file(finished, tmp_path, capsys, damage):
    out = copy_run(finished, tmp_path)
    ck = out / "checkpoints" / "task_01.pt"
    data = ck.read_bytes()
    ck.write_bytes({"truncated": data[: len(data) // 2], "empty": b"", "text": b"not a checkpoint\n",
                    "foreign-safetensors": WEIGHTS.read_bytes()}[damage])
    with pytest.raises(LoraclError, match="task_01.pt"):
        checkpoint.load(ck)
    rc = main(["run", "--resume", "--out", str(out)])
    text = "\n".join(capsys.readouterr())
    assert "Traceback" not in text and "task_01.pt" in text  # refused (2) or named as passed over on fallback
    assert rc in (0, 2)
    assert checkpoint.load(out / "checkpoints" / "task_00.pt")["task"] == 0


def test_checkpoint_round_trips_optimizer_rng_and_odd_values(tmp_path):
    lin = torch.nn.Linear(3, 2)
    opt = torch.optim.Adam(lin.parameters(), betas=(0.8, 0.9))
    lin(torch.randn(4, 3)).sum().backward()
    opt.step()
    state = {"opt": opt.state_dict(), "rng": torch.get_rng_state(), "nums": [float("nan"), float("inf"), -0.5, None, True],
             "keys": {(0, 1): np.arange(3), 7: "x"}, "t": (1, "a"), "empty": torch.zeros(0, 2), "half": torch.ones(2).half()}
    checkpoint.atomic_save(state, tmp_path / "c.pt")
    back = checkpoint.load(tmp_path / "c.pt")
    opt2 = torch.optim.Adam(lin.parameters())
    opt2.load_state_dict(back["opt"])
    assert opt2.param_groups[0]["betas"] == (0.8, 0.9) and set(back["opt"]["state"]) == {0, 1}
    assert torch.equal(back["rng"], state["rng"]) and np.isnan(back["nums"][0]) and back["nums"][1:] == state["nums"][1:]
    assert back["keys"][7] == "x" and np.array_equal(back["keys"][(0, 1)], np.arange(3)) and back["t"] == (1, "a")
    assert back["empty"].shape == (0, 2) and back["half"].dtype == torch.float16


def test_checkpoint_whose_header_length_looks_like_a_pickle_loads(tmp_path):
    """A safetensors header length whose low byte is 0x80 (a pickle's first byte) is still a checkpoint."""
    for pad in range(300):
        checkpoint.atomic_save({"pad": "x" * pad, "t": torch.ones(2)}, tmp_path / "c.pt")
        if (tmp_path / "c.pt").read_bytes()[:1] == b"\x80":
            break
    assert (tmp_path / "c.pt").read_bytes()[:1] == b"\x80"
    assert checkpoint.load(tmp_path / "c.pt")["pad"] == "x" * pad


def test_disk_full_during_a_checkpoint_keeps_the_previous_one(folder, tmp_path, capsys, monkeypatch):
    real = os.fsync

    def fsync(fd):  # the disk fills up while task 1's checkpoint is written (its temporary file)
        if "task_01.pt" in os.readlink(f"/proc/self/fd/{fd}"):
            raise OSError(errno.ENOSPC, "No space left on device")
        real(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    rc, err = run(capsys, tmp_path / "full", folder)
    one_line(rc, err, "task_01.pt", "disk is full")
    ck = tmp_path / "full" / "checkpoints"
    assert checkpoint.load(ck / "task_00.pt")["task"] == 0
    assert sorted(p.name for p in ck.iterdir()) == ["task_00.pt"]  # no partial file, no temporary left


# ------------------------------------------------------------------------------------------------
# output folder


def test_output_path_under_a_file_is_one_line(folder, tmp_path, capsys):
    (tmp_path / "afile").write_text("x")
    rc, err = run(capsys, tmp_path / "afile" / "out", folder)
    one_line(rc, err, "afile")


def test_second_run_into_a_busy_folder_is_refused(finished, tmp_path, capsys):
    out = copy_run(finished, tmp_path)
    before = (out / "results.json").read_bytes()
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (out / LOCK).write_text(f"{live.pid} {socket.gethostname()}\n")
        rc, err = cli(capsys, "run", "--preset", "cifar100-mini", "--out", out, "--overwrite")
        one_line(rc, err, "in use by another loracl run", str(live.pid))
    finally:
        live.kill()
        live.wait()
    assert (out / "results.json").read_bytes() == before and (out / "checkpoints" / "task_01.pt").exists()


def test_lock_of_another_host_is_refused_naming_it(finished, tmp_path, capsys):
    out = copy_run(finished, tmp_path)
    (out / LOCK).write_text("12345 node-17\n")
    rc, err = cli(capsys, "run", "--out", out, "--resume")
    one_line(rc, err, "node-17", LOCK)


def test_folder_that_already_holds_a_run(finished, tmp_path, capsys):
    out = copy_run(finished, tmp_path)
    rc, err = cli(capsys, "run", "--preset", "cifar100-mini", "--out", out)
    one_line(rc, err, "already holds a run", "--resume")


# ------------------------------------------------------------------------------------------------
# backbone weights


@pytest.mark.parametrize("kind", ["truncated", "foreign", "other-shape", "missing-keys", "absent"])
def test_bad_weights_file_is_one_line(folder, tmp_path, capsys, kind):
    from safetensors.torch import load_file, save_file

    f = tmp_path / "w.safetensors"
    if kind == "truncated":
        f.write_bytes(WEIGHTS.read_bytes()[:50_000])
        words = ["truncated", str(f)]
    elif kind == "foreign":
        f.write_text("<html>Not found</html>\n")
        words = ["not a weights file", str(f)]
    elif kind == "other-shape":
        sd = load_file(WEIGHTS)
        sd["blocks.0.attn.qkv.weight"] = torch.zeros(12, 12)
        save_file(sd, f)
        words = ["blocks.0.attn.qkv.weight", "(12, 12)", "(384, 128)"]
    elif kind == "missing-keys":
        save_file({k: v for k, v in load_file(WEIGHTS).items() if not k.startswith("blocks.5.")}, f)
        words = ["lacks", "blocks.5."]
    else:
        f = tmp_path / "nowhere.safetensors"
        words = ["not found", str(f)]
    rc, err = run(capsys, tmp_path / "out", folder, **{"backbone.file": f})
    one_line(rc, err, *words)


# ------------------------------------------------------------------------------------------------
# data


def test_corrupt_image_stops_and_keeps_the_finished_task(folder, tmp_path, capsys):
    root = copy_folder(folder, tmp_path)
    (root / "train" / "dog" / "zz-broken.jpg").write_bytes(b"\xff\xd8 truncated")  # task 1 (cat, dog)
    rc, err = run(capsys, tmp_path / "out", root, **{"train.max_steps_per_epoch": 10})
    one_line(rc, err, "zz-broken.jpg", "cannot read image")
    assert checkpoint.load(tmp_path / "out" / "checkpoints" / "task_00.pt")["task"] == 0


def test_image_too_large_to_decode(folder, tmp_path, capsys, monkeypatch):
    root = copy_folder(folder, tmp_path)
    Image.new("L", (64, 64)).save(root / "train" / "airplane" / "zz-huge.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1100)  # 64 x 64 > 2 x 1100 > 32 x 32: only this one fails
    rc, err = run(capsys, tmp_path / "out", root, **{"train.max_steps_per_epoch": 10})
    one_line(rc, err, "zz-huge.png", "too large to decode")


def test_unreadable_image_on_the_tensor_pipeline(folder, tmp_path, capsys):
    root = copy_folder(folder, tmp_path)
    (root / "test" / "cat" / "zz-broken.png").write_bytes(b"\x89PNG nothing")
    rc, err = run(capsys, tmp_path / "out", root, **{"data.pipeline": "tensor"})
    one_line(rc, err, "zz-broken.png")


@pytest.mark.parametrize("layout", ["empty-root", "only-empty-classes", "classes-differ", "zero-class-task"])
def test_unusable_folders_are_one_line_before_training(folder, tmp_path, capsys, layout):
    root = tmp_path / "data"
    extra = {}
    if layout == "empty-root":
        (root / "train").mkdir(parents=True)
        (root / "test").mkdir()
        words = ["no class sub-folders", "train"]
    elif layout == "only-empty-classes":
        for part in ("train", "test"):
            for c in CLASSES:
                (root / part / c).mkdir(parents=True)
        words = ["no class sub-folders with images"]
    elif layout == "classes-differ":
        root = copy_folder(folder, tmp_path)
        shutil.rmtree(root / "test" / "dog")
        words = ["differ", "dog"]
    else:
        root = folder
        extra = {"benchmark.task_sizes": "[4, 0]", "benchmark.num_tasks": None}
        words = ["task_sizes", "at least one class"]
    rc, err = run(capsys, tmp_path / "out", root, **extra)
    one_line(rc, err, *words)
    assert not (tmp_path / "out" / "checkpoints").exists()


def split_root(folder, tmp_path, lines_train, lines_test=None):
    root = copy_folder(folder, tmp_path)
    tr, te = tmp_path / "train.txt", tmp_path / "test.txt"
    tr.write_text("\n".join(lines_train) + "\n")
    te.write_text("\n".join(lines_test or [f"test/{c}/{f.name} {k}" for k, c in enumerate(CLASSES)
                                           for f in sorted((root / "test" / c).iterdir())]) + "\n")
    return root, tr, te


def good_lines(root):
    return [f"train/{c}/{f.name} {k}" for k, c in enumerate(CLASSES) for f in sorted((root / "train" / c).iterdir())]


@pytest.mark.parametrize("fault", ["bad-label", "negative-label", "missing-images", "missing-file"])
def test_split_file_faults_are_one_line_before_training(folder, tmp_path, capsys, fault):
    lines = good_lines(folder)
    if fault == "bad-label":
        lines[5] = lines[5].rsplit(" ", 1)[0] + " cat"
        words = ["train.txt", "line 6", "'cat'"]
    elif fault == "negative-label":
        lines[2] = lines[2].rsplit(" ", 1)[0] + " -1"
        words = ["train.txt", "line 3", "'-1'"]
    elif fault == "missing-images":
        lines += ["train/dog/gone-1.png 3", "train/dog/gone-2.png 3"]
        words = ["train.txt", "2 images that do not exist", "gone-1.png"]
    else:
        words = ["split file", "absent.txt", "does not exist"]
    root, tr, te = split_root(folder, tmp_path, lines)
    if fault == "missing-file":
        tr = tmp_path / "absent.txt"
    ds = f"[{{name: imagefolder, root: {root}, split_files: {{train: {tr}, test: {te}}}}}]"
    rc, err = run(capsys, tmp_path / "out", root, **{"benchmark.datasets": ds})
    one_line(rc, err, *words)
    assert not (tmp_path / "out" / "checkpoints").exists()


def test_odd_folder_is_reported_by_name_and_trains_on_the_rest(folder, tmp_path, capsys):
    root = copy_folder(folder, tmp_path)
    for part in ("train", "test"):
        (root / part / "__MACOSX" / "bird").mkdir(parents=True)
        (root / part / ".ipynb_checkpoints").mkdir()
        (root / part / "zebra").mkdir()  # an empty class folder
        (root / part / "cat" / "README.txt").write_text("notes")
        (root / part / "cat" / ".DS_Store").write_bytes(b"\0")
        Image.new("I;16", (32, 32), 40000).save(root / part / "bird" / "zz-16bit.png")
        Image.new("RGBA", (32, 32), (10, 20, 30, 0)).save(root / part / "dog" / "zz-rgba.png")
    rc, err = run(capsys, tmp_path / "out", root)
    text = "\n".join(err)
    assert rc == 0 and "Traceback" not in text, text
    assert "__MACOSX" in text and ".ipynb_checkpoints" in text and "zebra" in text and "cat/README.txt" in text
    r = json.loads((tmp_path / "out" / "results.json").read_text())
    assert [n for t in r["tasks"] for n in t["class_names"]] == list(CLASSES)


def test_odd_folder_notes_come_before_training(folder, tmp_path, capsys):
    from loracl.data.datasets import scan_folder

    root = copy_folder(folder, tmp_path) / "train"
    (root / "empty").mkdir()
    (root / "bird" / "sub").mkdir()
    classes, paths, _ = scan_folder(root)
    err = capsys.readouterr().err
    assert classes == list(CLASSES) and len(paths) == 32
    assert "empty" in err and "bird/sub" in err


@pytest.mark.parametrize("mode", ["1", "L", "LA", "P", "PA", "RGBA", "CMYK", "I;16", "I", "F", "YCbCr", "HSV"])
def test_every_pil_mode_loads_as_8bit_rgb(tmp_path, mode):
    """A mid-grey written in each mode comes back as 8-bit RGB grey (not clipped to white or black)."""
    from loracl.data.datasets import load_image

    a = np.full((8, 8), 0.5)
    if mode in ("I;16", "I"):
        im = Image.fromarray((a * 65535).astype(np.uint16)).convert(mode) if mode == "I;16" else \
            Image.fromarray((a * 65535).astype(np.int32))
    elif mode == "F":
        im = Image.fromarray(a.astype(np.float32))
    elif mode == "1":
        im = Image.new("1", (8, 8), 1)
    elif mode in ("P", "PA"):
        im = Image.new("RGB", (8, 8), (128, 128, 128)).convert("P", palette=Image.Palette.ADAPTIVE)
        if mode == "PA":
            im = im.convert("PA")
        else:
            im.info["transparency"] = 0  # the grey itself is the transparent entry
    else:
        im = Image.new("RGB", (8, 8), (128, 128, 128)).convert(mode)
    path = tmp_path / ("x.tif" if mode in ("I", "F", "CMYK", "I;16") else "x.png")
    if mode in ("YCbCr", "HSV", "PA"):  # no file format keeps these modes: check the conversion itself
        from loracl.data.datasets import to_rgb

        out = to_rgb(im)
    else:
        im.save(path)
        out = load_image(str(path))
    px = np.asarray(out)
    assert out.mode == "RGB" and px.dtype == np.uint8 and px.shape == (8, 8, 3)
    want = 255 if mode == "1" else 128
    assert abs(int(px[..., 0].mean()) - want) <= 2, (mode, px[0, 0])


# ------------------------------------------------------------------------------------------------
# export, predict, compare


def test_export_and_predict_refuse_an_unfinished_run(finished, tmp_path, capsys):
    out = copy_run(finished, tmp_path)
    r = json.loads((out / "results.json").read_text())
    r["status"] = "running"
    (out / "results.json").write_text(json.dumps(r))
    one_line(*cli(capsys, "export", out), "did not finish", "running")
    one_line(*cli(capsys, "predict", out, DATA / "cifar10" / "test" / "cat"), "did not finish")


def test_export_of_a_run_whose_config_names_another_method_is_one_line(finished, tmp_path, capsys):
    import yaml

    out = copy_run(finished, tmp_path)
    cfg = yaml.safe_load((out / "config.yaml").read_text())
    cfg["method"] = {"name": "keeplora+"}
    (out / "config.yaml").write_text(yaml.safe_dump(cfg))
    one_line(*cli(capsys, "export", out), "task_01.pt", "does not fit")


@pytest.mark.parametrize("fault", ["no-such-image", "empty-folder", "unwritable-out", "not-a-run"])
def test_predict_faults_are_one_line(finished, tmp_path, capsys, fault):
    args = ["predict", finished, DATA / "cifar10" / "test" / "cat" / sorted(os.listdir(DATA / "cifar10" / "test" / "cat"))[0]]
    if fault == "no-such-image":
        args[2], words = tmp_path / "nope.jpg", ["nope.jpg"]
    elif fault == "empty-folder":
        (tmp_path / "empty").mkdir()
        args[2], words = tmp_path / "empty", ["no images", "empty"]
    elif fault == "unwritable-out":
        (tmp_path / "f").write_text("x")
        args += ["--out", tmp_path / "f" / "p.csv"]
        words = ["p.csv"]
    else:
        args[1], words = tmp_path, ["not a run folder"]
    one_line(*cli(capsys, *args), *words)


def test_compare_with_a_damaged_results_file(finished, tmp_path, capsys):
    out = copy_run(finished, tmp_path, "a/seed0")
    (out / "results.json").write_text('{"status": "compl')
    one_line(*cli(capsys, "compare", tmp_path / "a"), "results.json")


def test_export_loads_in_plain_timm_and_predicts_as_loracl(finished, tmp_path, capsys):
    """The README's three lines, in a process without loracl, give the probabilities `loracl predict` gives."""
    assert main(["export", str(finished), "--out", str(tmp_path / "export")]) == 0
    images = DATA / "cifar10" / "test" / "cat"
    assert main(["predict", str(finished), str(images), "--top-k", "2", "--out", str(tmp_path / "p.json")]) == 0
    ours = json.loads((tmp_path / "p.json").read_text())
    assert len(ours) == len(os.listdir(images)) and all(len(r["top"]) == 2 for r in ours)
    code = f"""
import json, sys, timm, torch
from PIL import Image
from safetensors.torch import load_file
meta = json.load(open("{tmp_path}/export/model.json"))
model = timm.create_model(meta["name"], **meta["kwargs"]).eval(); model.load_state_dict(load_file("{tmp_path}/export/model.safetensors"))
transform = timm.data.create_transform(**meta["preprocess"])
assert not any(m.startswith("loracl") for m in sys.modules)
paths = [r["path"] for r in json.load(open("{tmp_path}/p.json"))[:16]]
with torch.no_grad():
    p = model(torch.stack([transform(Image.open(f).convert("RGB")) for f in paths])).softmax(-1)
top = p.topk(2)
print(json.dumps([[[meta["classes"][i], v] for i, v in zip(ii, vv)] for ii, vv in zip(top.indices.tolist(), top.values.tolist())]))
"""
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert res.returncode == 0, res.stderr
    plain = json.loads(res.stdout)
    for mine, theirs in zip(ours[:16], plain):
        assert [t["class"] for t in mine["top"]] == [c for c, _ in theirs]
        assert [t["prob"] for t in mine["top"]] == pytest.approx([v for _, v in theirs], abs=1e-4)
    # the accuracy of the exported model on the run's test images is the run's final accuracy
    r = json.loads((finished / "results.json").read_text())
    capsys.readouterr()
    assert main(["predict", str(finished), str(r_root(finished) / "test"), "--top-k", "1", "--format", "json"]) == 0
    rows = [(os.path.basename(os.path.dirname(x["path"])), x["top"][0]["class"]) for x in json.loads(capsys.readouterr().out)]
    assert len(rows) == 4 * len(CLASSES)
    acc = 100 * sum(a == b for a, b in rows) / len(rows)
    assert acc == pytest.approx(r["metrics"]["final_acc"], abs=1e-6)



def test_export_of_sd_lora_merges_its_shared_magnitudes(folder, tmp_path, capsys):
    """SD-LoRA's magnitudes are an owned module, but all of their effect is in the merged weights: the export
    predicts the run's test images with the run's final accuracy."""
    out = tmp_path / "sd"
    argv = ["run", "--preset", "cifar100-mini", "--method", "sd-lora", "--out", str(out)]
    for s in tiny_sets(folder):
        argv += ["--set", s]
    assert main(argv) == 0
    assert main(["export", str(out), "--out", str(tmp_path / "export")]) == 0
    capsys.readouterr()
    assert main(["predict", str(out), str(folder / "test"), "--top-k", "1", "--format", "json"]) == 0
    rows = [(os.path.basename(os.path.dirname(x["path"])), x["top"][0]["class"]) for x in json.loads(capsys.readouterr().out)]
    acc = 100 * sum(a == b for a, b in rows) / len(rows)
    assert acc == pytest.approx(json.loads((out / "results.json").read_text())["metrics"]["final_acc"], abs=1e-6)


def test_export_refuses_a_prompt_method_in_one_line(folder, tmp_path, capsys):
    out = tmp_path / "dp"
    argv = ["run", "--preset", "cifar100-mini", "--method", "dualprompt", "--out", str(out)]
    for s in tiny_sets(folder):
        argv += ["--set", s]
    assert main(argv) == 0
    one_line(*cli(capsys, "export", out), "dualprompt", "plain timm", "predict works")

def r_root(run_dir):
    import yaml

    return __import__("pathlib").Path(yaml.safe_load((run_dir / "config.yaml").read_text())["benchmark"]["datasets"][0]["root"])


def test_compare_prints_published_numbers_beside_measured(finished, tmp_path, capsys):
    import yaml

    out = copy_run(finished, tmp_path, "c/seed0")
    cfg = yaml.safe_load((out / "config.yaml").read_text())
    cfg["published"] = [{"method": "seq-lora", "metric": "final_acc", "value": 10.0, "source": "Table 9 of a paper"},
                        {"method": "l2p", "metric": "final_acc", "value": 62.54, "source": "Table 1"}]
    (out / "config.yaml").write_text(yaml.safe_dump(cfg))
    assert main(["compare", str(tmp_path / "c")]) == 0
    text = capsys.readouterr().out
    measured = json.loads((out / "results.json").read_text())["metrics"]["final_acc"]
    line = [l for l in text.splitlines() if "Table 9" in l][0]
    assert "| seq-lora | final_acc | 10.00 |" in line and f"{measured - 10:+.2f}" in line
    assert "| l2p | final_acc | 62.54 | – | – | Table 1 |" in text


def test_paper_presets_carry_published_rows():
    from loracl.runs.assembly import load_config

    for preset, method, metric, value in (("inflora-imagenet-r-10", "inflora", "final_acc", 75.65),
                                          ("inflora-cifar100", "inflora", "avg_inc_acc", 91.70),
                                          ("keeplora-mtil-1", "keeplora", "transfer", 69.0),
                                          ("ta-lora-pets", "er", "final_acc", 88.25)):
        rows = load_config(preset=preset).published
        assert any(r.method == method and r.metric == metric and r.value == value and r.source for r in rows)


def test_cli_in_a_subprocess_prints_one_line(folder, tmp_path):
    """As a user sees it: a real process, a bad weights file, exit status 2 and one line on stderr."""
    bad = tmp_path / "w.safetensors"
    bad.write_bytes(b"\0" * 100)
    argv = [sys.executable, "-m", "loracl", "run", "--preset", "cifar100-mini", "--out", str(tmp_path / "o")]
    for s in tiny_sets(folder, **{"backbone.file": bad}):
        argv += ["--set", s]
    res = subprocess.run(argv, capture_output=True, text=True, cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"})
    lines = res.stderr.strip().splitlines()
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert lines[-1].startswith("error: ") and str(bad) in lines[-1]


def test_export_of_a_clip_run_loads_in_plain_open_clip(folder, tmp_path, capsys):
    """open_clip's own `local-dir:` loader takes the export; with the text head's matrix it scores as loracl."""
    clip = {"backbone.kind": "open_clip", "backbone.name": "loracl-tiny-clip", "backbone.pretrained": "false",
            "backbone.file": None, "backbone.kwargs": "{}", "backbone.cfg_overlay": "{}", "head.kind": "text"}
    rc, _ = run(capsys, tmp_path / "clip", folder, **clip)
    assert rc == 0
    assert main(["export", str(tmp_path / "clip"), "--out", str(tmp_path / "export")]) == 0
    img = sorted((folder / "test" / "cat").iterdir())[0]
    assert main(["predict", str(tmp_path / "clip"), str(img), "--format", "json", "--top-k", "4"]) == 0
    ours = json.loads(capsys.readouterr().out.split("\n", 1)[1])[0]["top"]
    code = f"""
import json, sys, open_clip, torch
from PIL import Image
meta = json.load(open("{tmp_path}/export/model.json"))
model, _, transform = open_clip.create_model_and_transforms("local-dir:{tmp_path}/export"); head = torch.tensor(meta["head"]["weight"])
assert not any(m.startswith("loracl") for m in sys.modules)
with torch.no_grad():
    p = (torch.nn.functional.normalize(model.eval().encode_image(transform(Image.open("{img}"))[None]), dim=-1) @ head.T).softmax(-1)[0]
print(json.dumps({{meta["classes"][i]: float(v) for i, v in enumerate(p)}}))
"""
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert res.returncode == 0, res.stderr
    theirs = json.loads(res.stdout)
    assert {t["class"]: t["prob"] for t in ours} == pytest.approx(theirs, abs=1e-4)


def test_sigterm_stops_like_ctrl_c(folder, tmp_path):
    """A cluster's preemption: SIGTERM mid-task stops with one line, keeps task 0 and releases the lock."""
    import signal
    import time

    out = tmp_path / "term"
    argv = [sys.executable, "-m", "loracl", "run", "--preset", "cifar100-mini", "--out", str(out)]
    for s in tiny_sets(folder, **{"train.epochs": "[1, 200]", "train.max_steps_per_epoch": None}):
        argv += ["--set", s]
    p = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, cwd=REPO,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    deadline = time.time() + 120
    while not (out / "checkpoints" / "task_00.pt").exists() and p.poll() is None and time.time() < deadline:
        time.sleep(0.2)
    time.sleep(0.5)
    p.send_signal(signal.SIGTERM)
    err = p.communicate(timeout=60)[1].strip().splitlines()
    assert p.returncode == 130 and "Traceback" not in "\n".join(err), err
    assert err[-1].startswith("interrupted") and not (out / LOCK).exists()
    assert checkpoint.load(out / "checkpoints" / "task_00.pt")["task"] == 0


def test_out_of_memory_is_one_line(folder, tmp_path, capsys, monkeypatch):
    from loracl.methods.baselines import SeqLoRA

    def oom(self, net, batch, task):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(SeqLoRA, "loss", oom)
    rc, err = run(capsys, tmp_path / "oom", folder)
    one_line(rc, err, "out of memory", "data.batch_size")


def test_split_file_paths_with_spaces_crlf_and_bom(tmp_path):
    from loracl.data.datasets import read_split_file

    f = tmp_path / "s.txt"
    f.write_bytes("\ufeffmy cat/x 1.jpg 3\r\nb/y.png 0\r\n\r\n".encode())
    assert read_split_file(f, tmp_path) == (["my cat/x 1.jpg", "b/y.png"], [3, 0])
    f.write_text("my cat/x 1.jpg\nb/y.png\n")
    assert read_split_file(f, tmp_path) == (["my cat/x 1.jpg", "b/y.png"], None)


def test_a_checkpoint_holding_nan_is_never_restored_or_exported(finished, tmp_path, capsys):
    """loracl writes only finite checkpoints: one holding NaN was damaged or tampered with. Resume passes over it
    to the task before (saying so), and export / predict refuse the run in one line instead of writing NaN."""
    from loracl.runs.statefile import atomic_save, load

    out = copy_run(finished, tmp_path)
    last = out / "checkpoints" / "task_01.pt"
    state = load(last)
    key = next(k for k, v in state["model"].items() if v.is_floating_point())
    state["model"][key] = state["model"][key] * float("nan")
    atomic_save(state, last)
    one_line(*cli(capsys, "export", out), "task_01.pt", "NaN")
    image = next((DATA / "cifar10" / "test" / "cat").iterdir())
    one_line(*cli(capsys, "predict", out, image), "task_01.pt", "NaN")
    lines = []
    from loracl.runs.assembly import load_config
    from loracl.runs.runner import Runner

    r = Runner(load_config(out / "config.yaml"), out, resume=True, progress=False, log=lines.append)
    start, _ = r.prepare()
    assert start == 1 and any("task_01.pt holds NaN" in m and "falling back" in m for m in lines)


@pytest.mark.parametrize("damage,words", [
    (lambda r: [r], ["(top level)", "JSON object"]),
    (lambda r: {k: v for k, v in r.items() if k != "acc_matrix"}, ["acc_matrix"]),
    (lambda r: {**r, "metrics": {**r["metrics"], "final_acc": "high"}}, ["metrics"]),
    (lambda r: {**r, "acc_matrix": r["acc_matrix"][:1]}, ["acc_matrix", "2 x 2"]),
    (lambda r: {**r, "tasks": [{**r["tasks"][0], "class_names": ["x"]}, r["tasks"][1]]}, ["tasks[0]"]),
])
@pytest.mark.parametrize("command", ["compare", "report", "export"])
def test_results_json_of_the_wrong_shape_is_one_line(finished, tmp_path, capsys, damage, words, command):
    out = copy_run(finished, tmp_path)
    r = json.loads((out / "results.json").read_text())
    (out / "results.json").write_text(json.dumps(damage(r)))
    one_line(*cli(capsys, command, out), "results.json", *words)


def test_published_rows_and_configs_of_the_wrong_shape_are_one_line(finished, tmp_path, capsys):
    import yaml

    out = copy_run(finished, tmp_path)
    cfg = yaml.safe_load((out / "config.yaml").read_text())
    cfg["published"] = [{"method": "seq-lora", "metric": "final_acc", "source": "a paper"}]  # no value
    (out / "config.yaml").write_text(yaml.safe_dump(cfg))
    one_line(*cli(capsys, "compare", out), "published[0].value")
    (out / "config.yaml").write_text("- a list\n- not a config\n")
    rc, err = cli(capsys, "compare", out)  # compared as a run without a config
    assert rc == 0, err
    one_line(*cli(capsys, "compare", out, "--ref", "inflora"), "--ref inflora", "seq-lora")


def test_a_class_list_edited_in_results_json_is_refused_by_export_and_predict(finished, tmp_path, capsys):
    out = copy_run(finished, tmp_path)
    r = json.loads((out / "results.json").read_text())
    names = r["tasks"][0]["class_names"]
    r["tasks"][0]["class_names"] = names[1:] + names[:1]  # shifted: every exported name would be wrong
    (out / "results.json").write_text(json.dumps(r))
    one_line(*cli(capsys, "export", out), "results.json", "differ")
    image = next((DATA / "cifar10" / "test" / "cat").iterdir())
    one_line(*cli(capsys, "predict", out, image), "results.json", "differ")


@pytest.mark.parametrize("flag,value,word", [("--top-k", "0", "--top-k"), ("--batch-size", "-4", "--batch-size"),
                                             ("--workers", "-1", "--workers"), ("--device", "tpu", "--device")]
                         + ([] if torch.cuda.is_available() else [("--device", "cuda", "CUDA is not available")]))
def test_predict_flags_out_of_range_are_one_line(finished, capsys, flag, value, word):
    image = next((DATA / "cifar10" / "test" / "cat").iterdir())
    one_line(*cli(capsys, "predict", finished, image, flag, value), word)


def test_disk_full_while_writing_the_report_is_one_line_and_keeps_the_old_one(finished, tmp_path, capsys,
                                                                             monkeypatch):
    out = copy_run(finished, tmp_path)
    before = (out / "report.html").read_bytes()

    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)
    one_line(*cli(capsys, "report", out), "report.html", "disk is full")
    assert (out / "report.html").read_bytes() == before


@pytest.mark.parametrize("damage,words", [
    (lambda st: st["structure"]["lora"][0].append({"kind": "lora", "tag": "x", "d_in": 128, "d_out": 128,
                                                   "rank": 10 ** 9, "scale": 1.0, "train_down": True,
                                                   "train_up": True}), ["rank 1000000000"]),
    (lambda st: st["structure"]["head"]["chunk_ids"].append([10 ** 12]), ["outside the 4"]),
    (lambda st: st["structure"]["lora"].pop(), ["adapted projections"]),
])
def test_a_checkpoint_describing_another_or_absurd_model_is_refused_before_allocating(finished, tmp_path, capsys,
                                                                                      damage, words):
    from loracl.runs.statefile import atomic_save, load

    out = copy_run(finished, tmp_path)
    last = out / "checkpoints" / "task_01.pt"
    state = load(last)
    state["structure"]["lora"] = state["structure"]["lora"] or [[] for _ in range(12)]
    damage(state)
    atomic_save(state, last)
    one_line(*cli(capsys, "export", out), "task_01.pt", "does not fit", *words)
