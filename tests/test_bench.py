"""`loracl bench`: the three ways of holding earlier branches compute the same function, and the command runs
end to end on the fixture (no timing is asserted: it is a benchmark, not a timed test)."""

import json

import pytest
import torch

from loracl.bench.dense import DenseSum, dense_sums


def test_official_dense_sum_equals_low_rank_sum_and_merge(tiny_vit):
    from loracl.models.backbones import TimmViT

    bb = TimmViT.__new__(TimmViT)
    torch.nn.Module.__init__(bb)
    bb.model = tiny_vit
    ad = bb.inject_lora(["k", "v"])
    g = torch.Generator().manual_seed(0)
    for s in ad.sites:
        for k in range(3):
            s.add_lora(torch.randn(4, s.d_in, generator=g) * 0.1, torch.randn(s.d_out, 4, generator=g) * 0.1,
                       tag=f"task{k}")
    x = torch.randn(2, 3, 32, 32, generator=g)
    with torch.no_grad():
        low_rank = tiny_vit(x)
        with dense_sums(ad):
            assert all(list(s.branches) == ["dense"] and isinstance(s.branches["dense"], DenseSum) for s in ad.sites)
            dense = tiny_vit(x)  # the dense sum is what runs
        assert all(list(s.branches) == ["task0", "task1", "task2"] for s in ad.sites)
        ad.merge_all()
        merged = tiny_vit(x)
    torch.testing.assert_close(dense, low_rank, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(merged, low_rank, atol=1e-5, rtol=1e-5)


@pytest.mark.slow
@pytest.mark.shared
def test_bench_command_runs(capsys):
    from loracl.cli import main

    torch.set_num_threads(1)
    rc = main(["bench", "--steps", "1", "--warmup", "0", "--tasks", "1", "3", "--batch-size", "8",
               "--set", "eval.retention=null", "--set",
               "benchmark.datasets=[{name: cifar100, root: '{data_root}/cifar100', max_per_class: {train: 2, test: 1}}]"])
    out = capsys.readouterr().out
    assert rc == 0
    for text in ("share of a task at 3 epochs", "merged into W (loracl)", "kept, summed dense (official code)",
                 "task 1", "task 3", "stats-before", "stats-after"):
        assert text in out


@pytest.mark.slow
@pytest.mark.shared
def test_bench_tasks_section_times_the_method_itself(capsys):
    """SD-LoRA through three of its own tasks: a step time per task, its frozen directions in place."""
    from loracl.cli import main

    torch.set_num_threads(1)
    rc = main(["bench", "--method", "sd-lora", "--sections", "tasks", "--steps", "1", "--warmup", "0",
               "--tasks", "1", "3", "--batch-size", "4", "--images", "8", "--set", "eval.retention=null"])
    out = capsys.readouterr().out
    assert rc == 0 and "seconds per training step of the method itself" in out
    assert "task 3" in out and "last / first task" in out



@pytest.mark.slow
def test_bench_tasks_section_times_a_prompt_methods_query(tmp_path, capsys):
    """L2P: the query forward's share of a step and an evaluation batch with and without the query memo."""
    from loracl.cli import main

    torch.set_num_threads(1)
    rc = main(["bench", "--method", "l2p", "--sections", "tasks", "--steps", "1", "--warmup", "0", "--tasks", "2",
               "--batch-size", "4", "--images", "8", "--set", "eval.retention=null", "--json", str(tmp_path / "b.json")])
    out = capsys.readouterr().out
    assert rc == 0 and "the query forward alone" in out and "held by the query memo" in out
    res = json.loads((tmp_path / "b.json").read_text())
    assert all(res[k] > 0 for k in ("query_seconds", "eval_batch_seconds", "eval_batch_seconds_memo"))

# ---- the throughput section and --json --------------------------------------------------------------------

KEYS = ("train_images_per_s", "reference_train_images_per_s", "speedup", "eval_images_per_s",
        "reference_eval_images_per_s", "stats_images_per_s", "step_seconds_first_task", "step_seconds_last_task",
        "stats_fraction_of_task", "peak_memory_bytes", "machine")
TINY = ["--threads", "1", "--images", "16", "--batch-size", "8", "--steps", "1", "--warmup", "0", "--tasks", "1", "2"]


def _bench_json(tmp_path, *extra):
    import json

    from loracl.cli import main

    torch.set_num_threads(1)
    path = tmp_path / "bench.json"
    assert main(["bench", *TINY, "--json", str(path), *extra]) == 0
    return json.loads(path.read_text())


def _check_figures(res):
    for k in KEYS:
        assert k in res, k
    for k in ("train_images_per_s", "reference_train_images_per_s", "eval_images_per_s",
              "reference_eval_images_per_s", "stats_images_per_s", "step_seconds_first_task",
              "step_seconds_last_task", "peak_memory_bytes"):
        assert res[k] > 0, k
    assert res["speedup"] == pytest.approx(res["train_images_per_s"] / res["reference_train_images_per_s"])
    assert 0 < res["stats_fraction_of_task"] < 1
    assert res["peak_memory_kind"] == "cpu_process_max_rss"
    assert res["train_images"] == 16 and res["tasks"] == 2 and res["step_tasks"] == [1, 2]
    m = res["machine"]
    assert m["threads"] == 1 and m["cpu_count"] >= 1 and m["torch"] == torch.__version__ and m["platform"]


@pytest.mark.slow
@pytest.mark.shared
def test_bench_json_on_the_fixture(tmp_path, capsys):
    res = _bench_json(tmp_path, "--set", "eval.retention=null")
    _check_figures(res)
    assert res["backbone"] == "vit_tiny_patch16_224" and res["img_size"] == 32 and not res["synthetic_data"]
    assert "stats passes" in capsys.readouterr().out


@pytest.mark.slow
def test_bench_any_timm_vit_random_weights_synthetic_data(tmp_path):
    """--backbone builds the named timm ViT with random weights at --img-size; with no data (an empty data
    root) the bench times random images of that size."""
    res = _bench_json(tmp_path, "--backbone", "vit_tiny_patch16_224", "--img-size", "32",
                      "--set", f"data_root={tmp_path / 'no-data'}")
    _check_figures(res)
    assert res["img_size"] == 32 and res["synthetic_data"]
    assert res["sections"]["throughput"]["rank"] == 10  # the preset's InfLoRA settings still apply


@pytest.mark.slow
def test_reference_and_fast_path_compute_the_same_loss(tmp_path):
    """Earlier branches merged into W + the live branch (loracl) and every branch summed dense in each forward
    (the reference), fp32 on the CPU: the method's own loss is the same on the same batch."""
    import argparse

    from loracl.bench.run import _config
    from loracl.bench.sections import holding, reference_train
    from loracl.data.synthetic import synthetic_scenario
    from loracl.engine import Batch
    from loracl.runs.runner import Runner

    torch.set_num_threads(1)
    args = argparse.Namespace(config=None, preset="cifar100-mini", method="inflora", backbone="vit_tiny_patch16_224",
                              img_size=32, batch_size=8, threads=1, device="cpu", set=["train.amp=none"])
    run = Runner(_config(args), tmp_path, progress=False, log=lambda *a, **k: None,
                 scenario=synthetic_scenario(3, 10, 8, 8, 32))
    run.method.setup()
    task = run.scenario.tasks[0]
    run.trainer.current_task = task
    run.method.begin_task(task)
    batch = Batch(*next(iter(run.data.batches(task.train, train=False, shuffle=False))))
    losses = {}
    for way in ("merged", "branches", "official", "none"):
        with holding(run, 3 if way != "none" else 1, 4, way if way != "none" else "merged", seed=1) as ups:
            with torch.no_grad():  # a live branch that counts too, the same in every way
                g = torch.Generator().manual_seed(2)
                for u in ups:
                    u.copy_(0.05 * torch.randn(u.shape, generator=g))
            with run.precision.context():
                losses[way] = run.method.loss(run.model, batch, task).item()
    assert losses["official"] == pytest.approx(losses["merged"], rel=1e-5)
    assert losses["branches"] == pytest.approx(losses["merged"], rel=1e-5)
    assert abs(losses["official"] - losses["none"]) > 1e-4  # the earlier branches do change the loss
    w0 = run.model.adapter.sites[0].weight().clone()
    with holding(run, 3, 4, "official") as ups:  # the reference loop trains the live branch, not W
        params = [*ups, *run.method.param_groups(task)["head"]]
        run.model.set_trainable("lora")
        assert reference_train(run, task, task.train, params, warmup=0) > 0
        assert float(ups[0].detach().abs().sum()) > 0
    torch.testing.assert_close(run.model.adapter.sites[0].weight(), w0)
