"""MTIL baselines on a tiny open_clip CLIP over real images: zeroshot, seq-ft, seq-lora on both encoders."""

import numpy as np
import pytest
import torch

from conftest import TINY_CLIP, smoke_sets
from loracl.runs.assembly import load_config
from loracl.errors import ConfigError
from loracl.runs.runner import Runner

CLIP = TINY_CLIP

pytestmark = [pytest.mark.slow, pytest.mark.shared, pytest.mark.usefixtures("one_thread")]



def _run(tmp_path, method, clip=True, **extra):
    cfg = load_config(preset="mini-mtil", method=method, sets=smoke_sets(**{"eval.max_per_task": 20, **extra})
                      + (CLIP if clip else []))
    r = Runner(cfg, tmp_path, progress=False, log=lambda *a, **k: None)
    for t in r.scenario.tasks:
        t.train = t.train.subset(np.arange(0, len(t.train), max(len(t.train) // 32, 1))[:32])
    return r


def _text_and_image(r):
    m = r.model.backbone.model
    return (m.transformer.resblocks[0].attn.in_proj_weight.detach().clone(),
            m.visual.transformer.resblocks[0].attn.in_proj_weight.detach().clone())


def test_zeroshot_rows_are_the_zero_shot_row(tmp_path):
    res = _run(tmp_path, "zeroshot").run()
    assert res["acc_before"] is not None
    for row in res["acc_matrix"]:
        assert row == res["acc_before"]
    assert res["metrics"]["average"] == pytest.approx(res["metrics"]["last"])
    assert all(f == 0 for f in res["cost"]["train_flops_per_task"])


def test_zeroshot_needs_a_text_head(tmp_path):
    with pytest.raises(ConfigError, match="head.kind: text"):  # refused by its capabilities, before anything is built
        _run(tmp_path, "zeroshot", clip=False)


@pytest.mark.parametrize("method,extra", [("seq-ft", {}),
                                          ("seq-lora", {"method.targets": ["q", "k", "v", "out"]})])
def test_both_encoders_learn(tmp_path, method, extra):
    r = _run(tmp_path, method, **{"train.epochs": 1, "train.max_steps_per_epoch": 2, **extra})
    t0, i0 = _text_and_image(r)
    scale = r.model.backbone.logit_scale.detach().clone()
    res = r.run()
    t1, i1 = _text_and_image(r)
    assert (t1 - t0).abs().max() > 0 and (i1 - i0).abs().max() > 0
    torch.testing.assert_close(r.model.backbone.logit_scale, scale)
    assert res["metrics"]["transfer"] is not None
    if method == "seq-lora":
        assert {s.encoder for s in r.model.adapter.sites} == {"image", "text"}


@pytest.mark.parametrize("method", ["ncm", "sd-lora", "o-lora"])
def test_lora_comparison_rows_run_on_clip(tmp_path, method):
    """The issue-13 rows on CLIP's text head: each runs and gives Transfer; NCM has no prototype for a dataset
    before its task, so until then the text head scores it (its Transfer is the zero-shot one), and after its
    task the prototypes do."""
    res = _run(tmp_path, method, **{"train.epochs": 1, "train.max_steps_per_epoch": 2}).run()
    assert res["status"] == "complete" and res["metrics"]["transfer"] is not None
    if method == "ncm":
        zs = _run(tmp_path / "zs", "zeroshot").run()
        assert res["acc_before"] == zs["acc_before"]
        n = len(res["acc_matrix"])
        assert all(res["acc_matrix"][j][i] == zs["acc_before"][i] for j in range(n) for i in range(j + 1, n))
        assert res["acc_matrix"][0][0] != zs["acc_before"][0]  # the first dataset, by its prototypes
