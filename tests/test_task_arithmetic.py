"""Task arithmetic with LoRA: task vectors as factors, the combination, memory fine-tuning, resume."""


import pytest
import torch

from loracl.runs.statefile import load as load_checkpoint
from loracl.runs.assembly import load_config
from loracl.cl.task_vectors import (LowRankDelta, combine, combine_dense, combined_delta, resolve_lambda,
                                 task_vector, task_vector_of_branches)

from conftest import DATA, smoke_sets


needs_data = pytest.mark.skipif(not DATA.exists(), reason=f"needs the shared data at {DATA}")


def tiny_sets(train: int = 20, test: int = 10, **extra):
    """Two tasks of two CIFAR-10 classes, `train` training images per class: a run takes seconds."""
    ds = (f"[{{name: cifar10, root: {DATA}/cifar10, classes: [0, 1, 2, 3], "
          f"max_per_class: {{train: {train}, test: {test}}}}}]")
    return smoke_sets(**{"benchmark.datasets": ds, "benchmark.num_tasks": 2, "train.max_steps_per_epoch": 2,
                         **extra})


def _factors(g, d_out, d_in, r, scale):
    return LowRankDelta(torch.randn(r, d_in, generator=g), torch.randn(d_out, r, generator=g), scale)


def test_combination_matches_hand_formula():
    g = torch.Generator().manual_seed(0)
    pre = {"a": torch.randn(6, 5, generator=g), "b": torch.randn(4, 5, generator=g)}
    vecs = [{"a": _factors(g, 6, 5, 2, 0.5), "b": _factors(g, 4, 5, 3, 2.0)} for _ in range(3)]
    vecs[1].pop("b")  # a task vector that leaves "b" alone
    lam = 0.25
    out = combine(pre, vecs, lam)
    hand_a = pre["a"].clone()
    for v in vecs:
        d = v["a"]
        for i in range(6):
            for j in range(5):
                hand_a[i, j] += lam * d.scale * sum(d.up[i, k] * d.down[k, j] for k in range(d.down.shape[0]))
    torch.testing.assert_close(out["a"], hand_a)
    torch.testing.assert_close(out["b"], pre["b"] + lam * (vecs[0]["b"].dense() + vecs[2]["b"].dense()))
    assert resolve_lambda("1/N", 4) == 0.25 and resolve_lambda(0.3, 4) == 0.3
    with pytest.raises(ValueError):
        resolve_lambda("1/T", 2)


def test_merging_from_factors_equals_merging_from_full_differences(tiny_vit):
    """Dense task vectors theta_i - theta_pre (each LoRA merged into a copy of the weights) combined as
    theta_pre + lam sum tau_i give the same weights, and the same function, as the combination from factors."""
    from loracl.models.backbones import TimmViT

    bb = TimmViT.__new__(TimmViT)
    torch.nn.Module.__init__(bb)
    bb.model = tiny_vit
    ad = bb.inject_lora(["q", "v"])
    x = torch.randn(3, 3, 32, 32)
    pre = {s.name: s.weight().detach().clone() for s in ad.sites}
    g = torch.Generator().manual_seed(1)
    taus, vecs = [], []
    for t in range(3):
        for s in ad.sites:
            s.add_lora(torch.randn(4, s.d_in, generator=g) * 0.1, torch.randn(s.d_out, 4, generator=g) * 0.1,
                       tag=f"task{t}")
        vecs.append(task_vector_of_branches(ad.sites, f"task{t}"))
        for s in ad.sites:
            s.merge(f"task{t}")
        taus.append(task_vector({s.name: s.weight().detach().clone() for s in ad.sites}, pre))
        with torch.no_grad():
            for s in ad.sites:
                s.weight().copy_(pre[s.name])
    lam = 0.25
    dense = combine_dense(pre, taus, lam)
    with torch.no_grad():
        for s in ad.sites:
            s.add_to_weight(combined_delta([v[s.name] for v in vecs], lam))
        from_factors = {s.name: s.weight().detach().clone() for s in ad.sites}
        y_factors = tiny_vit(x)
        for s in ad.sites:
            s.weight().copy_(dense[s.name])
        y_dense = tiny_vit(x)
    for k in pre:
        torch.testing.assert_close(from_factors[k], dense[k], atol=1e-6, rtol=1e-5)
        assert (dense[k] - pre[k]).abs().max() > 1e-4
    torch.testing.assert_close(y_factors, y_dense, atol=1e-5, rtol=1e-5)


def test_feature_kl_direction_and_reduction():
    from loracl.methods.ta_lora import feature_kl

    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(4, 10, generator=g), torch.randn(4, 10, generator=g)
    P, Q = a.softmax(-1), b.softmax(-1)
    kl_pq = (P * (P.log() - Q.log())).sum(-1).mean()
    torch.testing.assert_close(feature_kl(a, b, "pretrained", "batchmean"), kl_pq)
    torch.testing.assert_close(feature_kl(a, b, "lora", "batchmean"), (Q * (Q.log() - P.log())).sum(-1).mean())
    torch.testing.assert_close(feature_kl(a, b, "pretrained", "mean"), kl_pq / 10)
    assert float(feature_kl(a, a)) == pytest.approx(0.0, abs=1e-7)


def _runner(tmp_path, method="ta-lora", sets=()):
    from loracl.runs.runner import Runner

    cfg = load_config(preset="cifar10-mini-5", method=method, sets=tiny_sets() + list(sets))
    return Runner(cfg, tmp_path, progress=False, log=lambda *a, **k: None)


@pytest.mark.slow
@needs_data
def test_method_forms_the_combination_from_stored_factors(tmp_path):
    run = _runner(tmp_path)
    m = run.method
    m.setup()
    sites = m.model.adapter.sites
    pre = {s.name: s.weight().detach().clone() for s in sites}
    g = torch.Generator().manual_seed(0)
    m.task_vectors = [{s.name: _factors(g, s.d_out, s.d_in, 16, 1.0) for s in sites} for _ in range(2)]
    m.form_combined_model(0.25)
    want = combine(pre, m.task_vectors, 0.25)
    for s in sites:
        torch.testing.assert_close(s.weight(), want[s.name], atol=1e-5, rtol=1e-5)
    # the k slices of the fused qkv weight are untouched; the next task starts again from theta_pre
    qkv = sites[0].layer
    d = qkv.weight.shape[0] // 3
    k_before = next(saved for p, saved in m.theta_pre if p is qkv.weight)[d:2 * d]
    torch.testing.assert_close(qkv.weight[d:2 * d].cpu(), k_before)
    m.restore_pretrained()
    for s in sites:
        torch.testing.assert_close(s.weight(), pre[s.name])


@pytest.mark.slow
@needs_data
@pytest.mark.parametrize("variant", [
    ["method.memory_train=full"],
    ["method.memory_train=lora", "method.kl_weight=0.4", "method.lam=[0.25, 1/N]"],
])
def test_ta_lora_run_fills_the_matrix_counts_memory_flops_and_resumes(tmp_path, variant):
    from loracl.runs.runner import Runner

    sets = tiny_sets(train=12, test=5) + ["method.memory_per_class=3", "method.memory_epochs=1",
                                          "train.max_steps_per_epoch=null"] + variant
    cfg = load_config(preset="cifar10-mini-5", sets=sets)
    out = tmp_path / "run"
    res = Runner(cfg, out, progress=False, log=lambda *a, **k: None).run()
    a = res["acc_matrix"]
    assert all(a[j][i] is not None for j in range(2) for i in range(j + 1))
    phases = res["cost"]["flops_by_phase_per_task"]
    for t in range(2):
        assert phases[t]["train"] > 0 and phases[t]["memory"] > 0
        assert res["cost"]["train_flops_per_task"][t] == pytest.approx(sum(phases[t].values()))
    # memory fine-tuning sees 3 images per class of every seen class: 6 images after task 0, 12 after task 1
    # (one epoch each); per image it costs the same, so the ratio of its FLOPs is that of the memory sizes
    assert phases[1]["memory"] / phases[0]["memory"] == pytest.approx(2.0, rel=0.01)
    ex = res["method_extras"]
    assert ex["acc_matrix_before_memory"][1][0] is not None
    if "lambda_memory_accuracy" in ex:
        scores = ex["lambda_memory_accuracy"][1]
        assert ex["lambda"][1] == float(max(scores, key=scores.get))
        assert "lambda-select" in phases[1]
    state = load_checkpoint(out / "checkpoints" / "task_01.pt")["method"]
    assert len(state["task_vectors"]) == 2
    tv = state["task_vectors"][0]
    assert len(tv) == 12 and all(d["down"].shape == (16, 128) and d["up"].shape == (128, 16) for d in tv.values())
    import numpy as np
    counts = np.unique(run_targets(cfg, state["memory"]["rows"]), return_counts=True)[1]
    assert list(counts) == [3, 3, 3, 3]
    if variant != ["method.memory_train=full"]:
        return

    # resume after task 0: the same numbers as the uninterrupted run
    (out / "checkpoints" / "task_01.pt").unlink()
    res2 = Runner(cfg, out, resume=True, progress=False, log=lambda *a, **k: None).run()
    assert res2["acc_matrix"] == a
    assert res2["cost"]["train_flops_per_task"] == res["cost"]["train_flops_per_task"]

    # fine-tuning after every task only fills the accuracy matrix: the final model and the last fine-tuning's
    # FLOPs are those of the paper's protocol (one fine-tuning after the last task)
    cfg = load_config(preset="cifar10-mini-5", sets=sets + ["method.memory_every_task=false"])
    once = Runner(cfg, tmp_path / "once", progress=False, log=lambda *a, **k: None).run()
    assert once["acc_matrix"][1] == a[1]
    f_once = once["cost"]["flops_by_phase_per_task"]
    assert "memory" not in f_once[0] and f_once[1]["memory"] == phases[1]["memory"]
    assert once["acc_matrix"][0] == once["method_extras"]["acc_matrix_before_memory"][0]


def run_targets(cfg, rows):
    from loracl.data.scenarios import build_scenario
    from loracl.cl.memory import EpisodicMemory

    mem = EpisodicMemory(build_scenario(cfg.benchmark, cfg.seed).tasks)
    return mem.pool.targets[rows]


def test_presets_of_the_paper_load():
    for preset, tasks in (("ta-lora-pets", [6, 6, 6, 6, 6, 7]), ("ta-lora-flowers", [10] * 9 + [12])):
        for method in ("ta-lora", "er", "agem", "joint", "joint-full"):
            cfg = load_config(preset=preset, method=method)
            assert cfg.benchmark.task_sizes == tasks
            assert cfg.train.optimizer.lr == 5e-6 and cfg.train.optimizer.weight_decay == 1e-6
            assert cfg.data.batch_size == 32
    cfg = load_config(preset="ta-lora-cifar10")
    assert cfg.benchmark.num_tasks == 5 and cfg.benchmark.class_order == "fixed"
    assert cfg.method.rank == 16 and cfg.method.alpha == 16 and cfg.method.targets == ["q", "v"]
    assert cfg.method.lam == 0.25 and cfg.method.memory_per_class == 10
    assert load_config(preset="ta-lora-cifar10", method="er").method.memory_size == 200
    assert load_config(preset="ta-lora-cifar10", method="agem").method.patterns_per_task == 100
    assert load_config(preset="ta-lora-flowers").train.epochs == 30

