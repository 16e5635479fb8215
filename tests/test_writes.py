"""Writes stay inside the run folder and the lock is atomic (issue 27): a symlink planted in a run folder is
replaced, never written through; a folder that leads out of the run is refused; of runs started together on
one folder exactly one takes it; a checkpoint holding NaN is never restored."""

import multiprocessing as mp
import time

import pytest
import torch

from loracl.errors import CheckpointError, LoraclError
from loracl.runs.files import WriteError, write_file
from loracl.runs.lock import LOCK, run_lock
from loracl.runs.statefile import atomic_save, load


def test_a_symlink_planted_at_a_file_name_is_replaced_not_followed(tmp_path):
    run, outside = tmp_path / "run", tmp_path / "outside"
    run.mkdir()
    outside.mkdir()
    victim = outside / "victim.txt"
    victim.write_text("keep me")
    for name in ("results.json", "report.html", "config.yaml"):
        (run / name).symlink_to(victim)
        write_file(run / name, "loracl's", root=run)
        assert not (run / name).is_symlink() and (run / name).read_text() == "loracl's"
    (run / "checkpoints").mkdir()
    (run / "checkpoints" / "task_00.pt").symlink_to(victim)
    atomic_save({"x": torch.ones(2)}, run / "checkpoints" / "task_00.pt", root=run)
    assert torch.equal(load(run / "checkpoints" / "task_00.pt")["x"], torch.ones(2))
    assert victim.read_text() == "keep me"
    assert sorted(p.name for p in run.rglob("*")) == ["checkpoints", "config.yaml", "report.html", "results.json",
                                                       "task_00.pt"]  # no temporary file left behind


def test_a_folder_leading_out_of_the_run_is_refused(tmp_path):
    run, outside = tmp_path / "run", tmp_path / "outside"
    run.mkdir()
    outside.mkdir()
    (run / "checkpoints").symlink_to(outside)
    with pytest.raises(CheckpointError, match="leads out of"):
        atomic_save({"x": torch.ones(1)}, run / "checkpoints" / "task_00.pt", root=run)
    with pytest.raises(WriteError, match="leads out of"):
        write_file(run / "checkpoints" / "step.pt", b"x", root=run)
    assert list(outside.iterdir()) == []


def test_a_write_that_fails_leaves_the_old_file_and_no_debris(tmp_path, monkeypatch):
    import os

    write_file(tmp_path / "results.json", "old")

    def full(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(WriteError, match="disk is full"):
        write_file(tmp_path / "results.json", "new")
    assert (tmp_path / "results.json").read_text() == "old" and len(list(tmp_path.iterdir())) == 1


def _take(out, ready, results):
    ready.wait()
    try:
        with run_lock(out):
            results.put("took")
            time.sleep(1.0)
    except LoraclError as e:
        results.put(str(e))


def test_of_runs_started_together_exactly_one_takes_the_folder(tmp_path):
    ctx = mp.get_context("fork")
    ready, results = ctx.Event(), ctx.Queue()
    procs = [ctx.Process(target=_take, args=(tmp_path / "run", ready, results)) for _ in range(6)]
    for p in procs:
        p.start()
    ready.set()
    for p in procs:
        p.join(30)
    got = [results.get(timeout=5) for _ in procs]
    assert got.count("took") == 1, got
    assert all("in use by another loracl run" in g for g in got if g != "took")
    assert not (tmp_path / "run" / LOCK).exists()  # released by its holder


def test_a_held_lock_with_its_file_not_yet_written_is_busy(tmp_path):
    """The window in which the holder has the lock but has not written its pid: a second run is refused (the
    old lock took that empty file for a stale one and took it over)."""
    import fcntl
    import os

    out = tmp_path / "run"
    out.mkdir()
    fd = os.open(out / LOCK, os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_EX)  # held, the file still empty
    try:
        with pytest.raises(LoraclError, match="in use by another loracl run"):
            with run_lock(out):
                pass
    finally:
        os.close(fd)
    with run_lock(out):  # released: taken at once
        assert (out / LOCK).read_text().split()[0] == str(os.getpid())
