"""ZSCL's pieces (cl/distill.py) and the rows built from them: LwF's distillation (zero gradient while the model
is its reference, the text side is the transposed logits) and WiSE-FT's interpolation (a run at alpha 0.8 ends
at 0.8 x the alpha-1 run's weights + 0.2 x the starting ones)."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import TINY_CLIP, clip_datasets, smoke_sets
from loracl.cl.distill import clip_distillation, interpolate_, soft_cross_entropy
from loracl.engine import Batch
from loracl.runs.assembly import load_config
from loracl.runs.runner import Runner

CLIP = TINY_CLIP + [clip_datasets(4, 3)]


def test_soft_cross_entropy_is_kl_plus_entropy_times_t_squared():
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(5, 7, generator=g), torch.randn(5, 7, generator=g)
    p = F.softmax(t / 2, -1)
    kl = F.kl_div(F.log_softmax(s / 2, -1), p, reduction="batchmean")
    entropy = -(p * p.log()).sum(-1).mean()
    torch.testing.assert_close(soft_cross_entropy(s, t, 2.0), (kl + entropy) * 4)
    s.requires_grad_(True)
    soft_cross_entropy(s, s.detach(), 2.0).backward()  # at the reference: no pull
    assert s.grad.abs().max() < 1e-7


def test_clip_distillation_image_and_text_sides():
    g = torch.Generator().manual_seed(1)
    fs, ft = torch.randn(6, 8, generator=g), torch.randn(6, 8, generator=g)
    text = F.normalize(torch.randn(3, 8, generator=g), dim=-1)
    s, t = 10 * F.normalize(fs, dim=-1) @ text.t(), 10 * F.normalize(ft, dim=-1) @ text.t()
    both = clip_distillation(fs, ft, text, 10.0, 2.0)
    torch.testing.assert_close(both, soft_cross_entropy(s, t, 2.0) + soft_cross_entropy(s.t(), t.t(), 2.0))
    torch.testing.assert_close(clip_distillation(fs, ft, text, 10.0, 2.0, text_side=False), soft_cross_entropy(s, t, 2.0))


def test_interpolate():
    m = torch.nn.Linear(3, 2)
    before = {n: p.detach().clone() for n, p in m.named_parameters()}
    ref = {"weight": torch.ones(2, 3)}
    interpolate_(m, ref, 0.8)
    torch.testing.assert_close(m.weight, 0.8 * before["weight"] + 0.2)
    assert torch.equal(m.bias, before["bias"])  # not named in the reference: untouched


def _runner(tmp_path, method, preset, sets):
    cfg = load_config(preset=preset, method=method, sets=smoke_sets(**{"eval.max_per_task": 12}) + sets)
    return Runner(cfg, tmp_path, progress=False, log=lambda *a, **k: None)


@pytest.mark.shared
@pytest.mark.slow
def test_lwf_reference_is_the_model_at_the_task_start(tmp_path, one_thread):
    r = _runner(tmp_path, "lwf", "mini-mtil", CLIP)
    r.prepare()
    task = r.scenario.tasks[0]
    r.method.begin_task(task)
    x, y = next(iter(r.data.eval_batches(task.train)))
    batch = Batch(x, y, torch.arange(len(y)))

    def grads(**cfg):
        for k, v in cfg.items():
            setattr(r.method.cfg, k, v)
        r.model.zero_grad()
        loss = r.method.loss(r.model, batch, task)
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in r.model.parameters() if p.grad is not None]

    (with_kd, g), (ce, g_ce) = grads(image_loss=True, text_loss=True), grads(image_loss=False, text_loss=False)
    assert with_kd > ce  # the soft cross-entropy is the reference's entropy, not 0
    for a, b in zip(g, g_ce):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)  # but pulls nowhere while the model is its reference
    with torch.no_grad():  # a step away from the reference: now it pulls back
        w = next(p for n, p in r.model.backbone.named_parameters() if "visual" in n and p.ndim == 2)
        w.add_(0.1 * torch.randn(w.shape, generator=torch.Generator().manual_seed(0)))
    (_, g), (_, g_ce) = grads(image_loss=True, text_loss=True), grads(image_loss=False, text_loss=False)
    assert max(float((a - b).abs().max()) for a, b in zip(g, g_ce)) > 1e-4


@pytest.mark.shared
@pytest.mark.slow
def test_wise_ft_interpolates_with_the_start(tmp_path, one_thread):
    one_task = ["benchmark.num_tasks=1", "train.max_steps_per_epoch=3", "benchmark.datasets=[{name: cifar100, "
                "root: '{data_root}/cifar100', classes: [0, 1, 2, 3], max_per_class: {train: 8, test: 3}}]"]
    ends, start = {}, None
    for alpha in (1.0, 0.8):
        r = _runner(tmp_path / str(alpha), "wise-ft", "cifar100-mini", one_task + [f"method.alpha={alpha}"])
        start = {n: p.detach().clone() for n, p in r.model.backbone.named_parameters()}
        r.run()
        ends[alpha] = {n: p.detach().clone() for n, p in r.model.backbone.named_parameters()}
    moved = 0
    for n, p in ends[0.8].items():
        torch.testing.assert_close(p, 0.8 * ends[1.0][n] + 0.2 * start[n], rtol=1e-5, atol=1e-6)
        moved += int(not torch.equal(ends[1.0][n], start[n]))
    assert moved > 0
    assert np.isfinite(r.results["metrics"]["final_acc"])


@pytest.mark.shared
def test_zscl_without_its_reference_set_stops_before_training(tmp_path, capsys):
    from loracl.cli import main

    rc = main(["run", "--preset", "mini-mtil", "--method", "zscl", "--out", str(tmp_path / "z"), "--set",
               "method.reference=null", *[a for s in CLIP for a in ("--set", s)]])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "method.reference" in err[0]
    assert not (tmp_path / "z" / "checkpoints").exists() or not any((tmp_path / "z" / "checkpoints").iterdir())


@pytest.mark.shared
@pytest.mark.slow
def test_zscl_weight_ensemble_and_l2(tmp_path, one_thread):
    r = _runner(tmp_path, "zscl", "mini-mtil", CLIP + ["method.we_every=2"])
    r.prepare()
    m, task = r.method, r.scenario.tasks[0]
    m.begin_task(task)
    name, p = next((n, p) for n, p in r.model.backbone.named_parameters() if p.requires_grad)
    start, snaps = p.detach().clone(), []
    x, y = next(iter(r.data.eval_batches(task.train)))
    batch = Batch(x, y, torch.arange(len(y)))
    m.cfg.we_every, grads = 0, []
    for l2 in (1.0, 0.0):  # at the task's start the L2 term is zero, and so is its gradient
        m.cfg.l2 = l2
        r.model.zero_grad()
        m.loss(r.model, batch, task).backward()
        grads.append(p.grad.clone())
    torch.testing.assert_close(grads[0], grads[1])
    m.cfg.we_every, m.cfg.l2, m.steps = 2, 1.0, 0
    for k in range(5):  # five steps; the optimiser's step replaced by a known change
        m.loss(r.model, batch, task)
        with torch.no_grad():
            p.add_(float(k + 1))
        snaps.append(p.detach().clone())
    m.end_task(task)  # the mean of the start and the weights after steps 0, 2 and 4
    torch.testing.assert_close(p.detach(), (start + snaps[0] + snaps[2] + snaps[4]) / 4)


@pytest.mark.shared
@pytest.mark.slow
def test_zscl_reference_passes_count_in_flops(tmp_path, one_thread):
    steps = ["train.max_steps_per_epoch=2", "train.epochs=1"]
    flops = {m: _runner(tmp_path / m, m, "mini-mtil", CLIP + steps).run()["cost"]["train_flops_per_task"][0]
             for m in ("seq-ft", "zscl")}
    assert flops["zscl"] > 2 * flops["seq-ft"]  # the reference batch through both models, besides the task's
