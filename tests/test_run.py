"""End to end on real images with the real fixture backbone: outputs, resume, errors, CLI."""

import json

import pytest

from conftest import interrupted_at_step_checkpoint, smoke_sets
from loracl.cli import main
from loracl.methods import register
from loracl.methods.baselines import SeqLoRA

pytestmark = [pytest.mark.slow, pytest.mark.shared]


def run(tmp_path, *extra, preset="cifar100-mini", method="seq-lora", sets=None, name="run"):
    out = tmp_path / name
    args = ["run", "--preset", preset, "--method", method, "--out", str(out)]
    for s in (sets if sets is not None else smoke_sets()):
        args += ["--set", s]
    return main(args + list(extra)), out


def results(out):
    return json.loads((out / "results.json").read_text())


def test_run_writes_results_checkpoints_and_report(tmp_path):
    rc, out = run(tmp_path, sets=smoke_sets(**{"benchmark.num_tasks": 2}))
    assert rc == 0
    r = results(out)
    assert r["status"] == "complete" and r["method"] == "seq-lora" and r["benchmark"] == "cifar100-mini"
    a = r["acc_matrix"]
    assert len(a) == 2 and a[0][1] is None and all(isinstance(v, float) for v in (a[0][0], a[1][0], a[1][1]))
    assert {"final_acc", "final_acc_task_avg", "avg_inc_acc", "forgetting", "bwt", "fwt"} <= set(r["metrics"])
    # task-aware accuracy: the same logits restricted to the task's own classes can only be right more often
    aw = r["acc_matrix_task_aware"]
    assert aw[0][0] == a[0][0] and aw[1][0] >= a[1][0] and aw[1][1] >= a[1][1] and aw[1][0] + aw[1][1] > a[1][0] + a[1][1]
    assert r["metrics"]["final_acc_task_aware"] == pytest.approx((aw[1][0] + aw[1][1]) / 2, abs=1e-3)
    c = r["cost"]
    assert all(x > 0 for x in c["train_flops_per_task"]) and all(x > 0 for x in c["train_seconds_per_task"])
    assert c["trainable_params_per_task"][0] > 0 and c["peak_memory_bytes"] > 0
    assert r["tasks"][1]["class_names"][0] == "mouse" and r["tasks"][0]["train_size"] == 10000
    assert r["versions"]["torch"] and "git_commit" in r["versions"]
    assert (out / "config.yaml").exists()
    assert (out / "checkpoints" / "task_00.pt").exists() and (out / "checkpoints" / "task_01.pt").exists()
    html = (out / "report.html").read_text()
    assert html.count("data:image/png;base64,") >= 3 and "accuracy matrix" in html.lower()


def test_saved_config_reproduces_the_run(tmp_path):
    rc, out = run(tmp_path, method="linear-probe", sets=smoke_sets(**{"benchmark.num_tasks": 2}))
    assert main(["run", str(out / "config.yaml"), "--out", str(tmp_path / "again")]) == 0
    a, b = results(out), results(tmp_path / "again")
    assert a["acc_matrix"] == b["acc_matrix"] and a["metrics"] == b["metrics"]


def test_tensorboard_logging_or_clear_error(tmp_path, capsys):
    rc, out = run(tmp_path, method="linear-probe", sets=smoke_sets(**{"benchmark.num_tasks": 2, "tensorboard": True}))
    try:
        import tensorboard  # noqa: F401
    except ImportError:
        assert rc == 2 and "pip install loracl[tensorboard]" in capsys.readouterr().err
    else:
        assert rc == 0 and any((out / "tensorboard").iterdir())


def test_flops_of_a_lora_step_match_hand_count(tmp_path):
    """Forward+backward FLOPs of one task's training, against the count from the model's shapes."""
    rc, out = run(tmp_path, sets=smoke_sets(**{"benchmark.num_tasks": 2, "train.max_steps_per_epoch": 2,
                                               "data.batch_size": 8}))
    r_ = results(out)
    # ViT fixture: 65 tokens, width 128, 6 blocks, MLP 512; LoRA rank 8 on q and v; 50-class head. MACs:
    tok, d, L, h, r, C = 65, 128, 6, 512, 8, 50
    frozen = tok * (3 * d * d + d * d + 2 * d * h)  # qkv, proj, fc1, fc2
    attn = 2 * tok * tok * d  # q k^T and attn v
    lora = 2 * tok * (d * r + r * d)  # two branches (q, v), down and up
    patch, head = 64 * (48 * d), d * C
    fwd = L * (frozen + attn + lora) + patch + head
    # backward: frozen weights need only input gradients (1x); attention and LoRA need both operands' (2x);
    # the head needs weight and input gradients (2x); the patch embedding needs none (its input is the image)
    bwd = L * (frozen + 2 * attn + 2 * lora) + 2 * head
    per_img = r_["cost"]["flops_by_phase_per_task"][0]["train"] / 16
    assert per_img == pytest.approx(2 * (fwd + bwd), rel=0.01)


def test_resume_equals_uninterrupted(tmp_path):
    sets = smoke_sets(**{"benchmark.num_tasks": 4, "train.max_steps_per_epoch": 3, "train.epochs": 2,
                         "train.checkpoint_every": 2, "data.batch_size": 8})
    rc, full = run(tmp_path, sets=sets, name="full")
    assert rc == 0
    sets = sets + ["train.keep_checkpoints=1"]  # the interrupted run keeps only its newest task checkpoint
    with interrupted_at_step_checkpoint(4):  # second step checkpoint of task 1
        rc, part = run(tmp_path, sets=sets, name="part")
    assert rc == 130 and (part / "checkpoints" / "step.pt").exists()
    rc, part = run(tmp_path, "--resume", sets=sets, name="part")
    assert rc == 0
    a, b = results(full), results(part)
    assert a["acc_matrix"] == b["acc_matrix"] and a["metrics"] == b["metrics"]
    assert a["cost"]["train_flops_per_task"] == b["cost"]["train_flops_per_task"]
    assert not (part / "checkpoints" / "step.pt").exists()
    assert sorted(p.name for p in (full / "checkpoints").glob("task_*.pt")) == [f"task_0{i}.pt" for i in range(4)]
    assert [p.name for p in (part / "checkpoints").glob("task_*.pt")] == ["task_03.pt"]


@register
class NaNAtStep(SeqLoRA):
    """Test-only: the loss becomes NaN at the third step of task 1."""

    name = "test-nan"
    steps = 0

    def loss(self, net, batch, task):
        loss = super().loss(net, batch, task)
        if task.index == 1:
            NaNAtStep.steps += 1
            if NaNAtStep.steps == 3:
                return loss * float("nan")
        return loss


def test_nan_loss_stops_and_keeps_finished_work(tmp_path, capsys):
    rc, out = run(tmp_path, method="test-nan", sets=smoke_sets(**{"benchmark.num_tasks": 4}))
    err = capsys.readouterr().err
    assert rc == 2
    line = [l for l in err.splitlines() if l.startswith("error:")][0]
    assert "non-finite loss in task 1" in line and "step 2" in line and "task_00.pt" in line
    r = results(out)
    assert r["status"] == "running" and r["acc_matrix"][0][0] is not None and r["acc_matrix"][1][1] is None
    assert (out / "checkpoints" / "task_00.pt").exists() and not (out / "checkpoints" / "task_01.pt").exists()


def test_joint_trains_once_on_all_tasks(tmp_path):
    rc, out = run(tmp_path, method="joint", sets=smoke_sets(**{"benchmark.num_tasks": 4}))
    r = results(out)
    assert r["acc_matrix"][0] == [None] * 4 and all(v is not None for v in r["acc_matrix"][3])
    assert r["metrics"]["final_acc"] is not None and r["metrics"]["forgetting"] is None


def test_domain_and_cross_dataset_presets_run(tmp_path):
    rc, out = run(tmp_path, preset="pacs-domains", method="linear-probe", name="pacs")
    r = results(out)
    assert rc == 0 and all(v is not None for v in r["acc_matrix"][0])  # later domains scored by the shared head
    rc, out = run(tmp_path, preset="mini-mtil", method="seq-lora", name="mtil")
    r = results(out)
    assert rc == 0 and r["scenario"] == "cross-dataset" and len(r["tasks"]) == 5
    assert r["acc_matrix"][0][1] is None  # linear heads cannot score a dataset before training on it
    assert r["metrics"]["last"] is not None and r["metrics"]["transfer"] is None


def test_retention_metric(tmp_path):
    from conftest import DATA

    sets = smoke_sets(**{"benchmark.num_tasks": 2, "eval.retention_per_class": 8})
    sets = [s for s in sets if not s.startswith("eval.retention=")] + [
        f"eval.retention={DATA}/tiny_imagenet32/val", f"eval.retention_classes={DATA}/tiny_imagenet32/classes.tsv"]
    rc, out = run(tmp_path, method="linear-probe", sets=sets)
    m = results(out)["metrics"]
    # a frozen backbone keeps its pretrained head's accuracy exactly (card: 32.9% on the full 10k val set;
    # 1,600 images here, so a wider band)
    assert m["pretrained_retention"] == m["pretrained_retention_initial"]
    assert 26 < m["pretrained_retention"] < 40


def test_compare_two_seeds(tmp_path, capsys):
    for seed in (0, 1):
        rc, _ = run(tmp_path, "--seed", str(seed), method="linear-probe",
                    sets=smoke_sets(**{"benchmark.num_tasks": 2}), name=f"lp/seed{seed}")
    assert main(["compare", str(tmp_path / "lp")]) == 0
    text = capsys.readouterr().out
    assert "linear-probe" in text and "±" in text and "0,1" in text
    assert (tmp_path / "lp" / "comparison.md").exists()


def test_cli_errors_and_help(tmp_path, capsys):
    for argv in (["--help"], ["run", "--help"], ["compare", "--help"], ["report", "--help"], ["list", "--help"]):
        with pytest.raises(SystemExit) as e:
            main(argv)
        assert e.value.code == 0
    assert main(["run", "--preset", "cifar100-mini", "--set", "train.lr=0.1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "train.lr" in err[0] and "cifar100-mini.yaml" in err[0]
    rc, out = run(tmp_path, sets=smoke_sets(**{"benchmark.num_tasks": 2, "benchmark.datasets": "[{name: cifar100, root: /no/such/dir}]"}))
    assert rc == 2 and "/no/such/dir" in capsys.readouterr().err
    rc, _ = run(tmp_path, sets=smoke_sets(**{"backbone.file": "/no/weights.safetensors"}), name="w")
    assert rc == 2 and "/no/weights.safetensors" in capsys.readouterr().err
    assert main(["list"]) == 0 and "cifar100-mini" in capsys.readouterr().out


def test_corrupt_image_in_a_worker_is_one_line(tmp_path, capsys):
    import shutil
    from conftest import DATA

    root = tmp_path / "data"
    for part in ("train", "test"):
        for c in ("airplane", "bird", "cat", "dog"):
            (root / part / c).mkdir(parents=True)
            for f in sorted((DATA / "cifar10" / part / c).iterdir())[:6]:
                shutil.copy(f, root / part / c / f.name)
    (root / "train" / "cat" / "zz-broken.jpg").write_bytes(b"\xff\xd8 truncated")
    sets = smoke_sets(**{"benchmark.num_tasks": 2, "data.num_workers": 1, "data.batch_size": 64,
                         "benchmark.datasets": f"[{{name: imagefolder, root: {root}}}]"})
    rc, out = run(tmp_path, sets=sets)
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "zz-broken.jpg" in err[0] and err[0].startswith("error: cannot read image")
    assert (out / "checkpoints" / "task_00.pt").exists()  # the task before the broken image is kept


def test_demo_runs_on_the_bundled_assets_and_prints_the_table(tmp_path, capsys):
    """`make demo`'s job on the repository's own bundle (no ../shared), shortened."""
    args = ["demo", "--out", str(tmp_path / "demo"), "--methods", "seq-lora", "inflora-ca"]
    for s in smoke_sets(**{"benchmark.num_tasks": 2}):
        args += ["--set", s]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "| demo-cifar100-20 | inflora-ca | 0 |" in out and "| demo-cifar100-20 | seq-lora | 0 |" in out
    assert (tmp_path / "demo" / "comparison.md").exists() and (tmp_path / "demo" / "inflora-ca" / "seed0" / "report.html").exists()
    assert main(args) == 0 and "already done" in capsys.readouterr().out  # a second call reuses finished runs


@pytest.mark.parametrize("preset,method,sets,words", [
    # a per-task list shorter than the benchmark: refused before task 0 trains, not after it
    ("cifar100-mini", "seq-lora", ["benchmark.num_tasks=2", "train.epochs=[1]"], ["train.epochs", "2 tasks"]),
    # what a method declares it runs on (task arithmetic needs tasks with their own classes)
    ("pacs-domains", "ta-lora", [], ["ta-lora", "domain-incremental"]),
    # a CLIP method scoring against text embeddings, given a linear head
    ("mini-mtil-clip", "zscl", ["head.kind=linear"], ["zscl", "head.kind: text", "head.kind: linear"]),
    # a LoRA target no backbone has
    ("cifar100-mini", "seq-lora", ["method.targets=[foo]"], ["foo", "method.targets"]),
])
def test_what_cannot_run_stops_before_training_in_one_line(tmp_path, capsys, preset, method, sets, words):
    rc, out = run(tmp_path, preset=preset, method=method, sets=smoke_sets() + sets)
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert rc == 2 and len(err) == 1 and err[0].startswith("error:") and all(w in err[0] for w in words), err
    assert not (out / "checkpoints").exists()
