"""Classifier alignment in the run loop, on real images and the fixture backbone: it changes the heads after the
second task, and a run killed during alignment resumes to the same results."""

import json

import pytest
import torch

from conftest import smoke_sets
from loracl.cl.alignment import ClassifierAlignment
from loracl.runs.assembly import load_config
from loracl.runs.runner import Runner

pytestmark = [pytest.mark.slow, pytest.mark.shared]

# 3 tasks of 5 CIFAR-100 classes, 20 training and 5 test images per class
TINY = ["benchmark.num_tasks=3", "align.enabled=true", "align.samples_per_class=32", "align.epochs=2",
        "benchmark.datasets=[{name: cifar100, root: '{data_root}/cifar100', classes: "
        f"{list(range(15))}, max_per_class: {{train: 20, test: 5}}}}]"]


def runner(out, method="seq-lora", resume=False, *extra):
    cfg = load_config(preset="cifar100-mini", method=method,
                      sets=smoke_sets(**{"eval.max_per_task": None}) + TINY + list(extra))
    return Runner(cfg, out, resume=resume, progress=False, log=lambda *a, **k: None)


def same_results(a: dict, b: dict) -> bool:
    return a["acc_matrix"] == b["acc_matrix"] and a["acc_matrix_task_aware"] == b["acc_matrix_task_aware"] and \
        {k: v for k, v in a["metrics"].items()} == {k: v for k, v in b["metrics"].items()}


def test_resume_after_a_kill_during_alignment_gives_the_same_results(tmp_path, monkeypatch):
    torch.set_num_threads(1)
    whole = runner(tmp_path / "whole").run()

    calls = []
    real_align = ClassifierAlignment.align

    def killed(self, t):
        calls.append(t)
        if t == 2:
            raise KeyboardInterrupt  # the process dies while aligning after the last task
        return real_align(self, t)

    monkeypatch.setattr(ClassifierAlignment, "align", killed)
    with pytest.raises(KeyboardInterrupt):
        runner(tmp_path / "killed").run()
    assert calls == [1, 2]
    monkeypatch.setattr(ClassifierAlignment, "align", real_align)
    resumed = runner(tmp_path / "killed", resume=True).run()
    assert same_results(whole, resumed)
    assert same_results(whole, json.loads((tmp_path / "killed" / "results.json").read_text()))


def test_alignment_changes_the_heads_only_from_the_second_task(tmp_path):
    torch.set_num_threads(1)
    off = runner(tmp_path / "off", "seq-lora", False, "align.enabled=false").run()
    on = runner(tmp_path / "on").run()
    a_off, a_on = off["acc_matrix"], on["acc_matrix"]
    assert a_on[0] == a_off[0]  # after the first task: statistics only, the heads untouched
    assert a_on[1] != a_off[1] and a_on[2] != a_off[2]  # evaluation sees the aligned heads
    assert "align" in on["cost"]["phase_seconds_per_task"][1] and "align" not in on["cost"]["phase_seconds_per_task"][0]


def test_eval_ncm_of_a_frozen_backbone_equals_the_ncm_method(tmp_path):
    torch.set_num_threads(1)
    probe = runner(tmp_path / "probe", "linear-probe", False, "eval.ncm=true", "align.enabled=false").run()
    ncm = runner(tmp_path / "ncm", "ncm", False, "align.enabled=false").run()
    assert probe["metrics"]["final_acc_ncm"] == pytest.approx(ncm["metrics"]["final_acc"], abs=1e-3)
    assert "final_acc_ncm" not in ncm["metrics"]
