"""DIKI: the Gaussian task selection and its weight on plain tensors; on a tiny real CLIP run, that a prompt with
zero values or zero weight leaves CLIP exactly zero-shot, that the frozen CLIP is untouched and that test images
pick the prompt of the task they come from."""

import math

import pytest
import torch
from torch.distributions import MultivariateNormal

from conftest import TINY_CLIP, clip_datasets, smoke_sets
from loracl.methods.diki import gaussian, log_likelihoods, prompt_weight
from loracl.runs.assembly import load_config

CLIP = TINY_CLIP + [clip_datasets(40, 5)]


def test_log_likelihoods_equal_torch_multivariate_normal():
    g = torch.Generator().manual_seed(0)
    feats = [torch.randn(50, 6, generator=g, dtype=torch.float64) * s + m for s, m in ((0.5, 1.0), (2.0, -3.0))]
    stats = [gaussian(f, 1e-7) for f in feats]
    assert torch.allclose(stats[0][1], torch.cov(feats[0].t()) + 1e-7 * torch.eye(6), atol=1e-12)
    x = torch.randn(7, 6, generator=g, dtype=torch.float64)
    got = log_likelihoods(x, torch.stack([m for m, _ in stats]), torch.stack([c for _, c in stats]))
    want = torch.stack([MultivariateNormal(m, c).log_prob(x) for m, c in stats], 1)
    assert torch.allclose(got, want, atol=1e-9)


def test_selection_picks_the_gaussian_an_image_comes_from_and_weights_it():
    g = torch.Generator().manual_seed(1)
    centres = torch.eye(4, dtype=torch.float64)[:3] * 5
    stats = [gaussian(c + 0.1 * torch.randn(80, 4, generator=g, dtype=torch.float64), 1e-7) for c in centres]
    means, covs = torch.stack([m for m, _ in stats]), torch.stack([c for _, c in stats])
    x = centres[[2, 0, 1, 2]] + 0.1 * torch.randn(4, 4, generator=g, dtype=torch.float64)
    logp = log_likelihoods(x, means, covs)
    assert logp.argmax(1).tolist() == [2, 0, 1, 2]
    # far from every Gaussian: the weight vanishes (zero-shot); at log p = 512 it is sigmoid(0) = 1/2
    far = log_likelihoods(torch.full((1, 4), 40.0, dtype=torch.float64), means, covs).max()
    assert float(prompt_weight(far, 512.0)) < 1e-6
    assert float(prompt_weight(torch.tensor(512.0), 512.0)) == pytest.approx(0.5)
    assert float(prompt_weight(torch.tensor(0.0), 512.0)) == pytest.approx(1 / (1 + math.e))


@pytest.mark.slow
@pytest.mark.shared
def test_diki_keeps_clip_frozen_and_an_empty_prompt_is_zero_shot(tmp_path):
    from loracl.runs.runner import Runner

    cfg = load_config(preset="mini-mtil", method="diki",
                      sets=smoke_sets(**{"eval.max_per_task": None, "train.max_steps_per_epoch": 4}) + CLIP
                      + ["train.optimizer={name: sgd, lr: 5.0, momentum: 0.0, weight_decay: 0.0}"])
    runner = Runner(cfg, tmp_path / "diki", progress=False, log=lambda *a, **k: None)
    before = {k: v.clone() for k, v in runner.model.backbone.state_dict().items()}
    r = runner.run()
    assert r["status"] == "complete"
    m = runner.method
    after = runner.model.backbone.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # CLIP itself never moves
    p = m.prompts
    assert int(p.learned) == 2 and all(p.values[k].abs().max() > 0 for k in p.values)  # both tasks trained
    task1 = runner.scenario.tasks[1]
    x = next(iter(runner.data.batches(task1.test, train=False, shuffle=False, batch_size=8)))[0]
    ids = torch.tensor(task1.class_ids)
    with torch.no_grad():
        zero_shot = runner.model(x, ids)
        assert not torch.allclose(m.forward(x, ids, 1, None), zero_shot, atol=1e-3)  # the trained prompt acts
        assert torch.allclose(m.forward(x, ids, 1, torch.zeros(len(x))), zero_shot, rtol=0, atol=1e-5)  # unselected
        for v in p.values.values():
            v.zero_()
        assert torch.allclose(m.forward(x, ids, 1, None), zero_shot, rtol=0, atol=1e-5)  # untrained (zero values)
        chosen, w = m.select(x)  # MNIST digits pick MNIST's prompt, not CIFAR-10's
    assert chosen == 1 and w.shape == (len(x),) and bool(((w >= 0) & (w <= 1)).all())
