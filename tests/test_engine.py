"""The engine's seams: branch kinds and tags round-trip through a checkpoint's structure, merges refuse
non-finite branches, methods own their extra modules once, the registry refuses a second method of one name,
`fit` leaves the model in eval mode even when a step fails, and precision is decided once."""

import pytest
import torch

from conftest import smoke_sets
from loracl.runs.assembly import load_config
from loracl.engine.trainer import Precision
from loracl.methods import Method, list_methods, register
from loracl.bench.dense import DenseSum, dense_sums
from loracl.models.branches import Branch, branch_from_spec
from loracl.models.heads import LinearHead


def _adapter(tiny_vit):
    from loracl.models.backbones import TimmViT

    bb = TimmViT.__new__(TimmViT)
    torch.nn.Module.__init__(bb)
    bb.model = tiny_vit
    return bb.inject_lora(["q", "v"])


def test_branch_kinds_rebuild_from_their_specs(tiny_vit):
    ad = _adapter(tiny_vit)
    g = torch.Generator().manual_seed(0)
    for s in ad.sites:
        s.add_lora(torch.randn(3, s.d_in, generator=g), torch.randn(s.d_out, 3, generator=g), tag="task0",
                   scale=0.5, train_down=False)
    x = torch.randn(2, 3, 32, 32, generator=g)
    with torch.no_grad():
        want = tiny_vit(x)
    with dense_sums(ad):
        specs = ad.structure()
        assert all(sp[0]["kind"] == "dense-sum" and sp[0]["tag"] == "dense" for sp in specs)
        dense = {k: v.clone() for k, v in tiny_vit.state_dict().items() if ".lora." in k}
        ad.rebuild(specs)  # empty branches of the same kinds, shapes and tags ...
        assert all(isinstance(s.branches["dense"], DenseSum) for s in ad.sites)
        tiny_vit.load_state_dict(dense, strict=False)  # ... that take the saved tensors back
        with torch.no_grad():
            torch.testing.assert_close(tiny_vit(x), want)
        s0 = ad.sites[0].branches["dense"].parts[0]
        assert s0.scale == 0.5 and not s0.train_down and s0.train_up
    old = branch_from_spec({"d_in": 4, "d_out": 6, "rank": 2, "scale": 1.0, "train_down": True, "train_up": True})
    assert isinstance(old, Branch) and old.delta_weight().shape == (6, 4)  # checkpoints written before kinds
    with pytest.raises(ValueError, match="unknown LoRA branch kind"):
        branch_from_spec({"kind": "nope"})


def test_merge_refuses_a_non_finite_branch(tiny_vit):
    ad = _adapter(tiny_vit)
    s = ad.sites[0]
    w0 = s.weight().detach().clone()
    up = torch.zeros(s.d_out, 2)
    up[0, 0] = float("nan")
    s.add_lora(torch.ones(2, s.d_in), up, tag="task0")
    with pytest.raises(FloatingPointError, match="non-finite"):
        s.merge("task0")
    assert torch.equal(s.weight(), w0) and list(s.branches) == ["task0"]


def test_registry_refuses_a_second_method_of_one_name():
    list_methods()  # every method file registered

    class Twin(Method):
        name = "seq-lora"

    with pytest.raises(ValueError, match="two methods are named 'seq-lora'"):
        register(Twin)


def test_precision_is_decided_once():
    cpu = torch.device("cpu")
    assert Precision("auto", cpu).mode == "none" and Precision("bf16", cpu).mode == "bf16"
    assert not Precision("auto", cpu).scaler().is_enabled()


@pytest.mark.slow
@pytest.mark.shared
def test_owned_modules_and_fit_restores_the_net(tmp_path, one_thread):
    from loracl.runs.runner import Runner

    cfg = load_config(preset="cifar100-mini", method="seq-lora", sets=smoke_sets(**{"benchmark.num_tasks": 2}))
    r = Runner(cfg, tmp_path, progress=False, log=lambda *a, **k: None)
    extra = r.model.own("extra head", LinearHead(r.model.backbone.feature_dim))
    with pytest.raises(ValueError, match="already owns"):
        r.model.own("extra head", LinearHead(4))
    extra.add_classes([0, 1])
    assert any(k.startswith("owned.extra head.") for k in r.model.state_dict())
    assert r.model.structure()["owned"]["extra head"] == extra.structure()
    r.method.setup()
    task = r.scenario.tasks[0]
    r.trainer.current_task = task
    r.method.begin_task(task)

    def boom(net, batch, task):
        assert net is r.model  # one process: the forward handed to the loss is the model itself
        raise RuntimeError("a step failed")

    with pytest.raises(RuntimeError, match="a step failed"):
        r.services.fit(task, phase="train", images=task.train, epochs=1, groups=r.method.param_groups(task),
                       loss=boom)
    assert not r.model.training  # left in eval mode


@pytest.mark.slow
@pytest.mark.shared
def test_divergence_stops_at_that_step_and_never_saves_a_nan_state(tmp_path, one_thread):
    from loracl.errors import TrainingDiverged
    from loracl.runs.runner import Runner

    sets = smoke_sets(**{"benchmark.num_tasks": 2, "train.max_steps_per_epoch": 6, "data.batch_size": 4})
    r = Runner(load_config(preset="cifar100-mini", method="seq-lora", sets=sets), tmp_path, progress=False,
               log=lambda *a, **k: None)
    r.method.setup()
    task = r.scenario.tasks[0]
    r.trainer.current_task = task
    r.method.begin_task(task)
    calls = []

    def nan_at_step_2(net, batch, task):
        calls.append(1)
        loss = r.method.loss(net, batch, task)
        return loss * float("nan") if len(calls) == 3 else loss

    with pytest.raises(TrainingDiverged, match=r"step 2 of the epoch"):
        r.services.fit(task, phase="train", images=task.train, epochs=1, groups=r.method.param_groups(task),
                       loss=nan_at_step_2)
    assert len(calls) == 3  # stopped at that step, not at the end of the epoch
    assert all(torch.isfinite(p).all() for p in r.model.parameters())  # the NaN step updated nothing
    with torch.no_grad():
        r.model.head.chunks[0].weight[0, 0] = float("nan")
    with pytest.raises(TrainingDiverged, match="not saved"):
        r.checkpoints.save_task(0, r.method.state_dict(), {})
    assert not (tmp_path / "checkpoints" / "task_00.pt").exists()


@pytest.mark.slow
@pytest.mark.shared
def test_resume_falls_back_from_a_broken_newest_checkpoint(tmp_path, one_thread):
    from loracl.cli import main
    from loracl.runs.runner import Runner

    sets = smoke_sets(**{"benchmark.num_tasks": 4})
    args = ["run", "--preset", "cifar100-mini", "--method", "seq-lora", "--out", str(tmp_path / "run")]
    assert main(args + [a for s in sets for a in ("--set", s)]) == 0
    newest = tmp_path / "run" / "checkpoints" / "task_03.pt"
    newest.write_bytes(newest.read_bytes()[:1000])  # truncated, as by a crash of the disk
    lines = []
    r = Runner(load_config(preset="cifar100-mini", method="seq-lora", sets=sets), tmp_path / "run", resume=True,
               progress=False, log=lines.append)
    r.method.setup()
    start, state, step = r.checkpoints.restore()
    assert start == 3 and state["task"] == 2 and step is None
    assert any("task_03.pt" in m and "falling back" in m for m in lines)
    assert any("task_02.pt" in m for m in lines)
