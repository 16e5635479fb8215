"""iCaRL on CLIP: herding on plain tensors (a hand example and the greedy mean-matching property), the memory's
equal shares by prefixes, and a tiny run where exemplars of the first task are distilled while the second trains."""

import itertools

import numpy as np
import pytest
import torch

from conftest import TINY_CLIP, clip_datasets, smoke_sets
from loracl.cl.herding import herding_order, keep_herded
from loracl.cl.memory import EpisodicMemory
from loracl.runs.assembly import load_config


def test_herding_hand_example():
    f = torch.tensor([[1.0, 0.0], [-1.0, 0.0], [0.0, 1.0]])
    # mean (0, 1/3): e2 is nearest (4/9 against 10/9); then e1 and -e1 tie at 0.25 + 1/36 and the first wins
    assert herding_order(f, 3).tolist() == [2, 0, 1]
    assert herding_order(f, 1).tolist() == [2]
    assert herding_order(f, 10).tolist() == [2, 0, 1]  # never more than there are


def test_herding_is_greedy_mean_matching_on_normalised_features():
    f = torch.randn(12, 5, generator=torch.Generator().manual_seed(0)) * torch.linspace(0.5, 3, 12)[:, None]
    order = herding_order(f, 6).tolist()
    u = torch.nn.functional.normalize(f.double(), dim=-1)
    mu = u.mean(0)
    for k in range(1, 7):
        rest = [i for i in range(12) if i not in order[:k - 1]]
        gap = {i: float(((mu - u[order[:k - 1] + [i]].mean(0)) ** 2).sum()) for i in rest}
        assert gap[order[k - 1]] == pytest.approx(min(gap.values()))
    # and the herded 6 match the mean better than most random 6
    best = float(((mu - u[order].mean(0)) ** 2).sum())
    others = [float(((mu - u[list(c)].mean(0)) ** 2).sum()) for c in itertools.islice(itertools.combinations(range(12), 6), 200)]
    assert np.mean([best <= o for o in others]) > 0.9



def test_memory_keeps_equal_prefixes_of_each_task(monkeypatch):
    mem = EpisodicMemory.__new__(EpisodicMemory)
    mem.rows, mem.candidates, mem.stream_seen = np.zeros(0, np.int64), {}, 0
    keep_herded(mem, 0, np.array([15, 13, 11, 10, 12, 14, 16, 17]), capacity=6)
    assert mem.rows.tolist() == [15, 13, 11, 10, 12, 14]
    keep_herded(mem, 1, np.array([27, 20, 25, 21]), capacity=6)
    assert mem.rows.tolist() == [15, 13, 11, 27, 20, 25]  # 3 each: the best of each order
    keep_herded(mem, 2, np.array([31]), capacity=6)
    # shares of 2; task 2 has one row, its spare slot goes to the first task
    assert mem.rows.tolist() == [15, 13, 11, 27, 20, 31]
    keep_herded(mem, 3, np.array([40, 41]), capacity=0)
    assert len(mem) == 0


CLIP = TINY_CLIP + [clip_datasets(5, 3)]


@pytest.mark.slow
@pytest.mark.shared
def test_icarl_distils_herded_exemplars_of_earlier_tasks(tmp_path, monkeypatch, one_thread):
    import loracl.methods.icarl as mod
    from loracl.runs.runner import Runner

    calls = []
    distil = mod.clip_distillation

    def recording(student, teacher, texts, *a, **k):
        calls.append((student.shape[0], texts.shape[0]))
        return distil(student, teacher, texts, *a, **k)

    monkeypatch.setattr(mod, "clip_distillation", recording)
    cfg = load_config(preset="mini-mtil", method="icarl",
                      sets=smoke_sets(**{"data.batch_size": 4, "eval.max_per_task": None}) + CLIP
                      + ["method.memory_size=6"])
    runner = Runner(cfg, tmp_path, progress=False, log=lambda *a, **k: None)
    r = runner.run()
    assert r["status"] == "complete"
    m, tasks = runner.method, runner.scenario.tasks
    # 3 steps a task (smoke settings), distilled only while task 1 trains: 4 exemplars (the batch size) a step
    assert calls == [(4, len(tasks[1].class_ids))] * 3
    task_of = np.searchsorted(m.memory.offsets, m.memory.rows, side="right") - 1
    assert task_of.tolist() == [0, 0, 0, 1, 1, 1]
    # task 1's exemplars: the herding order of the final model's features of its training images
    feats = []
    m.model.eval()
    with torch.no_grad():
        for x, _ in runner.data.eval_batches(tasks[1].train):
            feats.append(m.model.features(x).float())
    want = m.memory.pool_rows(1, herding_order(torch.cat(feats), 3))
    assert m.memory.rows[3:].tolist() == want.tolist()
    ex = r["method_extras"]["exemplars"]
    assert ex[0]["count"] == 6 and ex[1]["per_task"] == {"0": 3, "1": 3} and ex[1]["uint8_bytes"] > 6 * 8
