"""Many runs at once (issue 26): the grid and its folders, the local process pool (skips what is complete, resumes
what was interrupted: a sweep killed midway and run again ends as an uninterrupted one), the submitit backend on
its local executor (a job interrupted mid-run is requeued and its run resumed), validation splits and selection on
them, and `loracl data check`."""

import json
import os
import signal
import subprocess
import sys
import threading
import time
from argparse import Namespace
from pathlib import Path

import pytest

from conftest import REPO, smoke_sets
from loracl.cli import main
from loracl.errors import ConfigError
from loracl.runs.sweep import Point, SweepSpec, parse_seeds, split_values

TINY = smoke_sets(**{"benchmark.num_tasks": 2, "train.max_steps_per_epoch": 2, "eval.max_per_task": 10})
SMALL = "benchmark.datasets=[{name: cifar100, root: '{data_root}/cifar100', classes: [0, 1, 2, 3], " \
        "max_per_class: {train: 10, test: 4}}]"


def test_grid_values_seeds_and_folders():
    assert split_values("0.001,5e-4") == ["0.001", "5e-4"]
    assert split_values("[5,2,5],[1,1,1]") == ["[5,2,5]", "[1,1,1]"]
    assert split_values("'a,b',c") == ["'a,b'", "c"]
    assert parse_seeds(["0-2", "7"]) == [0, 1, 2, 7]
    with pytest.raises(ConfigError, match="seed 'x'"):
        parse_seeds(["x"])
    spec = SweepSpec(["cifar100-mini"], ["seq-lora", "inflora"], [0, 1],
                     ["train.epochs=1", "train.optimizer.lr=0.001,0.0005", "method.rank=4,8"])
    points = spec.points()
    assert len(points) == 2 * 2 * 2 * 2 and len(set(points)) == len(points)
    p = points[0]
    assert p.sets == ("train.epochs=1",) and p.label == "train.optimizer.lr=0.001,method.rank=4"
    assert p.out(Path("R")) == Path("R/cifar100-mini/seq-lora/train.optimizer.lr=0.001,method.rank=4/seed0")
    argv = p.argv(Path("R"), resume=True, threads=2)
    assert argv[:4] == ["run", "--preset", "cifar100-mini", "--method"] and argv[-1] == "--resume"
    assert "threads=2" in argv and "method.rank=4" in argv
    long = Point("cifar100-mini", "seq-lora", 0, tuple((f"method.k{i}", "x" * 20) for i in range(6)))
    assert len(long.out(Path(".")).parent.name) <= 96  # a readable prefix and a hash


def _sweep(tmp_path, *extra, name="sw"):
    argv = ["sweep", "--preset", "cifar100-mini", "--method", "seq-lora", "linear-probe", "--seed", "0-1",
            "--jobs", "2", "--out", str(tmp_path / name)]
    for s in TINY + [SMALL]:
        argv += ["--set", s]
    return argv + list(extra)


def _results(root: Path) -> dict:
    out = {}
    for f in sorted(root.rglob("results.json")):
        r = json.loads(f.read_text())
        out[str(f.relative_to(root))] = (r["status"], r["acc_matrix"], r["metrics"], r["cost"]["train_flops_per_task"])
    return out


@pytest.mark.slow
@pytest.mark.shared
def test_local_sweep_killed_midway_and_run_again_equals_an_uninterrupted_one(tmp_path, capsys):
    assert main(_sweep(tmp_path, name="whole")) == 0
    out = capsys.readouterr().out
    assert "4 of 4 runs complete" in out and (tmp_path / "whole" / "comparison.md").is_file()
    assert all((p.parent / "run.log").is_file() for p in (tmp_path / "whole").rglob("results.json"))
    # killed (SIGTERM, as a cluster's pre-emption) once the first run is complete: the others stop with their
    # finished tasks saved; the same command again skips what is done and resumes the rest
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.Popen([sys.executable, "-m", "loracl", *_sweep(tmp_path, name="cut")], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 300
    while time.time() < deadline and not any(
            json.loads(f.read_text()).get("status") == "complete" for f in (tmp_path / "cut").rglob("results.json")):
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    proc.wait(60)
    cut = _results(tmp_path / "cut")
    assert any(v[0] == "complete" for v in cut.values()) and proc.returncode != 0
    assert main(_sweep(tmp_path, name="cut")) == 0
    assert "complete, skipped" in capsys.readouterr().out
    assert _results(tmp_path / "cut") == _results(tmp_path / "whole")
    assert main(_sweep(tmp_path, name="cut")) == 0  # a finished sweep: nothing runs
    assert "4 complete, skipped" in capsys.readouterr().out


@pytest.mark.slow
@pytest.mark.shared
def test_submitit_job_interrupted_mid_run_is_requeued_and_resumes(tmp_path):
    """submitit's local executor: the job gets the pre-emption signal after a step checkpoint; its run stops as
    on Ctrl-C, the job is requeued and the run resumes, ending as a run never interrupted."""
    from loracl.runs.cluster import run_submitit

    sets = tuple(TINY + [SMALL, "train.checkpoint_every=1", "train.max_steps_per_epoch=5", "train.epochs=3",
                         "threads=1"])
    point = Point("cifar100-mini", "seq-lora", 0, (), sets)
    ref = tmp_path / "ref"
    assert main(point.argv(ref, False, None)) == 0  # the same run, never interrupted
    root = tmp_path / "sub"
    interrupted = []

    def interrupt(jobs):
        def wait_then_signal():
            out = point.out(root)
            deadline = time.time() + 300
            while time.time() < deadline and not (out / "checkpoints" / "step.pt").exists():
                time.sleep(0.05)
            # what SLURM sends the job's processes before a time limit or a pre-emption: the job process (the
            # parent of the run, whose pid the run's lock file holds) checkpoints and is requeued
            run_pid = int((out / ".loracl.lock").read_text().split()[0])
            job_pid = int(Path(f"/proc/{run_pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
            os.kill(job_pid, signal.SIGUSR2)
            interrupted.append(True)
        threading.Thread(target=wait_then_signal, daemon=True).start()

    spec = Namespace(jobs=1, cluster={"timeout_min": 10})
    outcome = run_submitit([point], root, spec, cluster="local", log=lambda *a: None, on_submit=interrupt)
    assert outcome == {point: None} and interrupted == [True]
    log = (point.out(root) / "run.log").read_text()
    assert "interrupted" in log and "resuming" in log  # stopped cleanly, then continued from its checkpoint
    a, b = (json.loads((d / "results.json").read_text()) for d in (point.out(ref), point.out(root)))
    assert a["acc_matrix"] == b["acc_matrix"] and a["metrics"] == b["metrics"]


@pytest.mark.slow
@pytest.mark.shared
def test_validation_split_and_selection_on_it(tmp_path, capsys):
    argv = ["sweep", "--preset", "cifar100-mini", "--method", "linear-probe", "--seed", "0", "--jobs", "2",
            "--out", str(tmp_path / "sel"), "--select", "val_metrics.final_acc",
            "--set", "train.optimizer.lr=0.01,0.00001", "--set", "data.val_fraction=0.2"]
    for s in TINY + [SMALL]:
        argv += ["--set", s]
    assert main(argv) == 0
    text = (tmp_path / "sel" / "selection.md").read_text()
    runs = {f.parent.parent.name: json.loads(f.read_text()) for f in (tmp_path / "sel").rglob("results.json")}
    for r in runs.values():
        assert [t["train_size"] for t in r["tasks"]] == [16, 16] and [t["val_size"] for t in r["tasks"]] == [4, 4]
        assert set(r["val_metrics"]) >= {"final_acc", "forgetting"} and len(r["val_acc_matrix"]) == 2
    best = max(runs, key=lambda k: runs[k]["val_metrics"]["final_acc"])
    assert f"| {best} |" in text and "val_metrics.final_acc" in text


@pytest.mark.shared
def test_data_check_says_what_is_there_and_what_is_missing(tmp_path, capsys):
    assert main(["data", "check", "cifar100-mini"]) == 0
    out = capsys.readouterr().out
    assert "20000 train / 10000 test images, 100 classes (as expected)" in out and "complete" in out
    assert main(["data", "check", "inflora-imagenet-r-10", "--data-root", str(tmp_path)]) == 1
    out = capsys.readouterr().out
    assert "MISSING" in out and "benchmark.datasets[0].root" in out and "imagenet-r.tar" in out


def test_a_sweep_with_a_typo_stops_before_anything_runs(tmp_path, capsys):
    rc = main(["sweep", "--preset", "cifar100-mini", "--method", "seq-lora", "--out", str(tmp_path / "s"),
               "--set", "train.epochz=1,2"])
    err = capsys.readouterr().err
    assert rc == 2 and "epochz" in err and not (tmp_path / "s").exists()
